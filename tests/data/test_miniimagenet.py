"""Mini-ImageNet on a small fake copy in exactly the format of learn2learn's pickles."""
import hashlib
import pickle
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from imaml_lightning.data.episodes import task_generator
from imaml_lightning.data import miniimagenet
from imaml_lightning.data.miniimagenet import MiniImageNetDataModule, load_images
from imaml_lightning.errors import SettingError
from tests.helpers import (
    MINIIMAGENET_FILES as FILES, load, run_cli, small_fake_miniimagenet as small_fake,
    write_fake_miniimagenet as write_fake,
)

PAPER_CLASSES = {"train": 64, "val": 16, "test": 20}
NAMES = [f"mini-imagenet-cache-{mode}.pkl" for mode in FILES.values()]


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    root = tmp_path_factory.mktemp("miniimagenet")
    return root, write_fake(root, PAPER_CLASSES, per_class=20)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def mini(fake, cache):
    dm = MiniImageNetDataModule(root=str(fake[0]), ways=5, shots=2, queries=3,
                                cache_dir=str(cache), download=False)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def owners(owner: dict, x: torch.Tensor) -> list:
    stored = x.permute(0, 2, 3, 1)  # back to the pickle's HWC
    return [owner[image.numpy().tobytes()] for image in stored]


def test_episode_shapes_labels_and_value_range(mini):
    xs, ys, xq, yq = mini.sampler("train", task_generator(0, "train", 0))
    assert xs.shape == (10, 3, 84, 84) and xq.shape == (15, 3, 84, 84)
    assert ys.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert yq.tolist() == [c for c in range(5) for _ in range(3)]
    assert xs.dtype == xq.dtype == torch.uint8  # made float on the device:
    xs = mini.on_after_batch_transfer((xs, ys, xq, yq), 0)[0]
    assert xs.dtype == torch.float32
    assert 0 <= xs.min() < 0.01 and 0.99 < xs.max() <= 1  # uint8 / 255, not 0..255 nor squashed
    assert mini.out_features == 5


def test_splits_are_the_files_classes(mini, fake, cache):
    splits = {split: set(ids.tolist()) for split, ids in mini.sampler.splits.items()}
    assert {split: len(ids) for split, ids in splits.items()} == PAPER_CLASSES
    assert not splits["train"] & splits["val"] and not splits["train"] & splits["test"]
    assert not splits["val"] & splits["test"]
    names = load_images(fake[0], cache)[0].names
    for split, ids in splits.items():
        assert {names[i] for i in ids} == {n for s, n in fake[1].values() if s == split}


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_each_class_is_one_genuine_class_of_its_split(mini, fake, split):
    for index in range(10):
        xs, ys, xq, yq = mini.sampler(split, task_generator(1, split, index))
        drawn = set()
        for label in range(5):
            images = torch.cat([xs[ys == label], xq[yq == label]])
            found = owners(fake[1], images)  # KeyError: pixels of no image of the pickles
            assert {s for s, _ in found} == {split}
            assert len({n for _, n in found}) == 1  # one class per label
            assert len({img.numpy().tobytes() for img in images}) == 5  # drawn without replacement
            drawn.add(found[0][1])
        assert len(drawn) == 5


def test_cache_lives_in_cache_dir_and_is_reused(mini, fake, cache, monkeypatch):
    assert len(list(cache.glob("miniimagenet-*.pt"))) == 1
    assert sorted(p.name for p in fake[0].iterdir()) == sorted(NAMES)  # nothing written into root
    # A later run reads the cache and never unpickles again.
    monkeypatch.setattr("imaml_lightning.data.miniimagenet.read_pickle", pytest.fail)
    again = MiniImageNetDataModule(root=str(fake[0]), cache_dir=str(cache), download=False)
    again.setup("fit")
    assert torch.equal(again.sampler.images, mini.sampler.images)
    images = again.sampler.images
    assert images.dtype == torch.uint8 and images.shape == (2000, 3, 84, 84)


def test_changed_files_rebuild_the_cache(tmp_path):
    root = small_fake(tmp_path / "root")
    first = MiniImageNetDataModule(root=str(root), ways=2, shots=1, queries=1,
                                   cache_dir=str(tmp_path / "cache"), download=False)
    first.setup("fit")
    write_fake(root, {"train": 3, "val": 2, "test": 3}, per_class=4, seed=1)
    second = MiniImageNetDataModule(root=str(root), ways=2, shots=1, queries=1,
                                    cache_dir=str(tmp_path / "cache"), download=False)
    second.setup("fit")
    assert len(second.sampler.splits["test"]) == 3
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 1  # the new one replaced the old


def corrupt(path: Path, how: str) -> None:
    data = pickle.loads(path.read_bytes())
    if how == "truncated":
        path.write_bytes(path.read_bytes()[:1000])
        return
    if how == "missing key":
        del data["class_dict"]
    elif how == "grayscale":
        data["image_data"] = data["image_data"][..., 0]
    elif how == "float":
        data["image_data"] = data["image_data"].astype(np.float32)
    elif how == "index out of range":
        next(iter(data["class_dict"].values()))[0] = len(data["image_data"])
    path.write_bytes(pickle.dumps(data))


@pytest.mark.parametrize("how", ["truncated", "missing key", "grayscale", "float",
                                 "index out of range"])
def test_corrupt_pickle_is_a_setting_error_naming_the_file(tmp_path, how):
    root = small_fake(tmp_path / "root")
    corrupt(root / "mini-imagenet-cache-validation.pkl", how)
    dm = MiniImageNetDataModule(root=str(root), ways=2, shots=1, queries=1,
                                cache_dir=str(tmp_path / "cache"), download=False)
    named = r"data\.root: .*mini-imagenet-cache-validation\.pkl is corrupt"
    with pytest.raises(SettingError, match=named):
        dm.prepare_data()
    assert not list((tmp_path / "cache").glob("*.pt"))


def test_missing_root_without_download_is_one_clear_error(tmp_path):
    dm = MiniImageNetDataModule(root=str(tmp_path / "nowhere"), download=False)
    with pytest.raises(SettingError, match=r"data\.root=.*nowhere.* data\.download is false"):
        dm.prepare_data()


def downloaded(root: Path) -> list:
    """The files in root besides the lock that serializes downloads."""
    return sorted(p.name for p in root.iterdir() if p.name != ".mini-imagenet.lock")


@pytest.fixture
def zenodo(tmp_path, monkeypatch):
    """A stand-in for Zenodo: the fake files as its record publishes them, MD5s included.
    Tests set .download to change what a download writes; .urls records what was fetched."""
    source = small_fake(tmp_path / "source")
    record = {name: hashlib.md5((source / name).read_bytes()).hexdigest() for name in NAMES}
    server = SimpleNamespace(source=source, urls=[], download=None)

    def fetch(url, path):
        server.urls.append(url)
        if server.download:
            return server.download(url, path)
        shutil.copy(source / url.rsplit("/", 1)[1], path)

    monkeypatch.setattr(miniimagenet, "published_md5", lambda: record)
    monkeypatch.setattr("learn2learn.data.utils.download_file", fetch)
    return server


def test_offline_download_is_one_clear_error(tmp_path, monkeypatch):
    def offline():
        raise OSError("Temporary failure in name resolution")

    monkeypatch.setattr(miniimagenet, "published_md5", offline)
    root = tmp_path / "nowhere"
    dm = MiniImageNetDataModule(root=str(root), cache_dir=str(tmp_path / "cache"))
    message = (f"data.root='{root}' is invalid: no Mini-ImageNet there (looked for "
               f"mini-imagenet-cache-{{train,validation,test}}.pkl) and the download failed "
               f"(Temporary failure in name resolution)")
    with pytest.raises(SettingError, match=re.escape(message)):
        dm.prepare_data()
    assert downloaded(root) == []


def test_a_download_cut_short_leaves_nothing_behind(tmp_path, zenodo):
    def cut(url, path):
        Path(path).write_bytes(b"\x80 half a pickle")  # the connection drops mid-download
        raise OSError("Connection reset by peer")

    zenodo.download = cut
    root = tmp_path / "root"
    with pytest.raises(SettingError, match=r"download failed \(Connection reset by peer\)"):
        MiniImageNetDataModule(root=str(root), cache_dir=str(tmp_path / "cache")).prepare_data()
    assert downloaded(root) == []  # no truncated pickle, no partial file


def test_a_download_that_fails_its_checksum_is_rejected(tmp_path, zenodo):
    zenodo.download = lambda url, path: Path(path).write_text("<html>503</html>")
    root = tmp_path / "root"
    with pytest.raises(SettingError, match=r"download failed \(mini-imagenet-cache-train.pkl: "
                                           r"its MD5 \w+ is not the published \w+\)"):
        MiniImageNetDataModule(root=str(root), cache_dir=str(tmp_path / "cache")).prepare_data()
    assert downloaded(root) == []


def test_download_fetches_only_missing_files_from_zenodo(tmp_path, zenodo):
    root = tmp_path / "root"
    root.mkdir()
    shutil.copy(zenodo.source / NAMES[0], root / NAMES[0])
    dm = MiniImageNetDataModule(root=str(root), ways=2, shots=1, queries=1,
                                cache_dir=str(tmp_path / "cache"))
    dm.prepare_data()
    assert zenodo.urls == [f"https://zenodo.org/record/7978538/files/{n}" for n in NAMES[1:]]
    assert downloaded(root) == sorted(NAMES)


def test_more_ways_than_validation_classes_names_data_ways(fake, cache):
    dm = MiniImageNetDataModule(root=str(fake[0]), ways=17, cache_dir=str(cache), download=False)
    message = "data.ways=17 is invalid: must be <= 16, the classes in the val split"
    with pytest.raises(SettingError, match=re.escape(message)):
        dm.setup("fit")


@pytest.mark.parametrize("kwargs, setting", [
    ({"ways": 1}, "data.ways"),
    ({"shots": 0}, "data.shots"),
    ({"queries": 0}, "data.queries"),
    ({"rotations": "some"}, "data.rotations"),
])
def test_invalid_settings_name_the_setting(kwargs, setting):
    with pytest.raises(SettingError, match=re.escape(f"{setting}=")):
        MiniImageNetDataModule(**kwargs)


def test_fit_through_the_cli_with_the_config(fake, cache, workdir):
    run_cli(workdir, "fit", "--config", "configs/miniimagenet_5way_1shot.yaml",
            "--data.init_args.root", str(fake[0]), "--data.init_args.cache_dir", str(cache),
            "--data.init_args.meta_batch_size", "2", "--data.init_args.val_episodes", "2",
            "--data.init_args.eval_batch_size", "2", "--model.solver.inner_steps", "2",
            "--model.net.init_args.hidden", "8", "--trainer.max_steps", "2",
            "--trainer.val_check_interval", "2", "--trainer.enable_progress_bar", "false")
    checkpoint = load(workdir / "checkpoints" / "last.ckpt")
    assert checkpoint["global_step"] == 2
    # 5 ways; 8 channels x 5 x 5 after four 2x2 poolings of 84x84 RGB
    assert checkpoint["state_dict"]["net.classifier.weight"].shape == (5, 200)
    assert checkpoint["state_dict"]["net.features.0.0.weight"].shape == (8, 3, 3, 3)
