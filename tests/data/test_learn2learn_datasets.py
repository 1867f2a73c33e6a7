"""learn2learn's datasets on small copies in each one's exact on-disk format (learn2learn_fakes)."""
import json
import os
import pickle
import re
import shutil

import dataclasses

import pytest
import torch

from imaml_lightning.data.episodes import task_generator
from imaml_lightning.data.cache import source_tag
from imaml_lightning.data.learn2learn_datasets import MODES, SOURCES, Learn2LearnDataModule
from imaml_lightning.errors import SettingError
from tests.data.learn2learn_fakes import FILE_SPLITS, SIZE, WRITERS, l2l_splits, write_fake
from tests.helpers import cli_command, cli_env, run_cli

NAMES = sorted(WRITERS)
L2L_SPLITS = {"cub": ("cu_birds200", "validation"), "aircraft": ("fgvc_aircraft", "valid"),
              "vgg-flowers": ("vgg_flowers", "validation"), "dtd": ("describable_textures", "validation")}


@pytest.fixture(scope="module", params=NAMES)
def fake(request, tmp_path_factory):
    """(name, root, owners, the data module after setup)."""
    name = request.param
    root = tmp_path_factory.mktemp(name)
    owners = write_fake(name, root)
    dm = Learn2LearnDataModule(name=name, root=str(root), image_size=SIZE, ways=5, shots=1,
                               queries=2, download=False,
                               cache_dir=str(tmp_path_factory.mktemp("cache")))
    dm.prepare_data()
    dm.setup("fit")
    return name, root, owners, dm


def learn2learn_class_counts(name, root) -> dict:
    """Classes per split as learn2learn's own class reads the files."""
    counts = {}
    for split, mode in MODES.items():
        reader = SOURCES[name].read(root, mode, False)
        counts[split] = len(set(int(label) for label in reader.labels))
    return counts


def test_class_counts_per_split_are_learn2learns(fake):
    name, root, _, dm = fake
    splits = dm.sampler.splits
    ours = {split: len(classes) for split, classes in splits.items()}
    assert ours == learn2learn_class_counts(name, root)
    if name in FILE_SPLITS:  # ... which are the published ones
        assert tuple(ours.values()) == FILE_SPLITS[name]
    if name in L2L_SPLITS:  # ... which are its published split lists
        module, valid = L2L_SPLITS[name]
        assert ours == {split: len(classes) for split, classes in l2l_splits(module, valid).items()}
    ids = [set(classes.tolist()) for classes in splits.values()]
    assert not ids[0] & ids[1] and not ids[0] & ids[2] and not ids[1] & ids[2]


@pytest.mark.parametrize("split", list(MODES))
def test_every_sampled_image_traces_back_to_its_class_and_split(fake, split):
    name, _, owners, dm = fake
    for index in range(4):
        xs, ys, xq, yq = dm.sampler(split, task_generator(3, split, index))
        assert xs.shape == (5, 3, SIZE, SIZE) and xq.shape == (10, 3, SIZE, SIZE)
        drawn = set()
        for label in range(5):
            images = torch.cat([xs[ys == label], xq[yq == label]])
            found = [owners[tuple(image[:, 0, 0].tolist())] for image in images]
            assert {s for s, _ in found} == {split}
            assert len({n for _, n in found}) == 1  # one class per label
            assert all((image == image[:, :1, :1]).all() for image in images)  # not blended
            drawn.add(found[0][1])
        assert len(drawn) == 5


def test_cache_is_reused_and_nothing_is_written_into_the_root(tmp_path, monkeypatch):
    root, cache = tmp_path / "root", tmp_path / "cache"
    write_fake("fc100", root)
    before = sorted(p.name for p in root.iterdir())
    first = Learn2LearnDataModule(name="fc100", root=str(root), queries=2, download=False,
                                  cache_dir=str(cache))
    first.setup("fit")
    assert first.sampler.images.shape[1:] == (3, 32, 32)  # FC100's usual size by default
    assert sorted(p.name for p in root.iterdir()) == before
    monkeypatch.setattr(Learn2LearnDataModule, "read_split", pytest.fail)  # never read again
    again = Learn2LearnDataModule(name="fc100", root=str(root), queries=2, download=False,
                                  cache_dir=str(cache))
    again.setup("fit")
    assert torch.equal(again.sampler.images, first.sampler.images)
    assert len(list(cache.glob("fc100-*.u8"))) == 1 and len(list(cache.glob("fc100-*.pt"))) == 1


def test_a_download_builds_the_cache_once(tmp_path, monkeypatch):
    """The cache's key is taken after learn2learn's download, so the next run finds it."""
    root, cache = tmp_path / "root", tmp_path / "cache"
    real = SOURCES["fc100"]

    def downloading_read(at, mode, download):
        if download and not list(at.glob("FC100_*.pickle")):
            write_fake("fc100", at)  # what learn2learn's download leaves
        return real.read(at, mode, download)

    monkeypatch.setitem(SOURCES, "fc100", dataclasses.replace(real, read=downloading_read))
    first = Learn2LearnDataModule(name="fc100", root=str(root), queries=2, cache_dir=str(cache))
    first.prepare_data()
    monkeypatch.setattr(Learn2LearnDataModule, "read_split", pytest.fail)
    again = Learn2LearnDataModule(name="fc100", root=str(root), queries=2, cache_dir=str(cache))
    again.setup("fit")
    assert torch.equal(again.sampler.images, first.sampler.images)


def test_a_killed_build_leaves_nothing_behind(tmp_path, monkeypatch):
    root, cache = tmp_path / "root", tmp_path / "cache"
    write_fake("fc100", root)
    dm = Learn2LearnDataModule(name="fc100", root=str(root), queries=2, download=False,
                               cache_dir=str(cache))
    cache.mkdir()
    (cache / f".fc100-32-{source_tag(root)}-0123.u8.4242.partial").write_bytes(b"SIGKILLed build")
    real_decode = Learn2LearnDataModule.decode
    calls = []

    def interrupted(self, *args):
        calls.append(1)
        if len(calls) == 50:
            raise KeyboardInterrupt
        return real_decode(self, *args)

    monkeypatch.setattr(Learn2LearnDataModule, "decode", interrupted)
    with pytest.raises(KeyboardInterrupt):
        dm.prepare_data()
    assert sorted(p.name for p in cache.iterdir()) == [".fc100-32-" + source_tag(root) + ".lock"]


def test_changed_files_or_size_rebuild_the_cache(tmp_path):
    root, cache = tmp_path / "root", tmp_path / "cache"
    write_fake("fc100", root)
    Learn2LearnDataModule(name="fc100", root=str(root), queries=2, download=False,
                                  cache_dir=str(cache)).setup("fit")
    data = pickle.loads((root / "FC100_test.pickle").read_bytes())
    keep = [i for i, label in enumerate(data["labels"]) if label != data["labels"][0]]  # one class less
    data = {"data": data["data"][keep], "labels": [data["labels"][i] for i in keep]}
    (root / "FC100_test.pickle").write_bytes(pickle.dumps(data))
    dm = Learn2LearnDataModule(name="fc100", root=str(root), queries=2, download=False,
                                  cache_dir=str(cache))
    dm.setup("fit")
    assert len(dm.sampler.splits["test"]) == 19
    assert len(list(cache.glob("fc100-32-*.u8"))) == 1  # the new one replaced the old
    resized = Learn2LearnDataModule(name="fc100", root=str(root), image_size=20, queries=2,
                                    download=False, cache_dir=str(cache))
    resized.setup("fit")
    assert resized.sampler.images.shape[1:] == (3, 20, 20)


def test_episodes_do_not_depend_on_the_directory_listing_order(tmp_path, monkeypatch):
    """learn2learn lists CUB's files with os.listdir, whose order is the file system's."""
    root = tmp_path / "root"
    write_fake("cub", root)

    def episode(cache, listing):
        monkeypatch.setattr(os, "listdir", listing)
        dm = Learn2LearnDataModule(name="cub", root=str(root), image_size=SIZE, queries=2,
                                   download=False, cache_dir=str(tmp_path / cache))
        dm.setup("fit")
        return dm.sampler("test", task_generator(0, "test", 0))

    listdir = os.listdir
    forward = episode("a", lambda path: sorted(listdir(path)))
    backward = episode("b", lambda path: sorted(listdir(path), reverse=True))
    for ours, theirs in zip(forward, backward):
        assert torch.equal(ours, theirs)


def test_the_cache_is_memory_mapped(fake):
    """The images' memory is a mapping of the cache file (resident only where touched)."""
    images = fake[3].sampler.images
    start = images.data_ptr()
    (cache_file,) = {line.split()[-1] for line in open("/proc/self/maps")
                     if line.split()[-1].endswith(".u8")
                     and int(line.split("-")[0], 16) <= start < int(line.split()[0].split("-")[1], 16)}
    assert cache_file.startswith(fake[3].cache_dir.as_posix()) and images.dtype == torch.uint8


def test_missing_files_without_download_is_one_clear_error(tmp_path):
    dm = Learn2LearnDataModule(name="cub", root=str(tmp_path), download=False,
                               cache_dir=str(tmp_path / "cache"))
    with pytest.raises(SettingError, match=r"data\.root=.* no cub there \(looked for "
                                           r"cubirds200/CUB_200_2011/images/\*/\*\) and "
                                           r"data\.download is false"):
        dm.prepare_data()


@pytest.mark.parametrize("name, path", [("fc100", "FC100_val.pickle"),
                                        ("tiered-imagenet", "tiered-imagenet/val_labels.pkl")])
def test_a_file_in_an_unexpected_format_is_named(tmp_path, name, path):
    root, cache = tmp_path / "root", tmp_path / "cache"
    write_fake(name, root)
    (root / path).write_bytes(b"not a pickle")
    dm = Learn2LearnDataModule(name=name, root=str(root), queries=2, download=False,
                               cache_dir=str(cache))
    named = re.escape(SOURCES[name].split_files("validation"))
    with pytest.raises(SettingError, match=r"data\.root=.* learn2learn could not read " + named):
        dm.prepare_data()
    assert not list(cache.glob("*.u8")) and not list(cache.glob("*.pt"))


def test_a_missing_reader_dependency_is_not_blamed_on_the_root(tmp_path, monkeypatch):
    write_fake("vgg-flowers", tmp_path / "root")

    def read_without_scipy(*_):
        raise ModuleNotFoundError("No module named 'scipy'", name="scipy")

    monkeypatch.setitem(SOURCES, "vgg-flowers", dataclasses.replace(SOURCES["vgg-flowers"], read=read_without_scipy))
    dm = Learn2LearnDataModule(name="vgg-flowers", root=str(tmp_path / "root"), queries=2,
                               download=False, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(SettingError, match=r"data\.name='vgg-flowers' is invalid here: "
                                           r"learn2learn needs the Python module 'scipy'"):
        dm.prepare_data()


def test_a_cifarfs_copy_left_short_by_a_killed_run_is_caught(tmp_path):
    root, cache = tmp_path / "root", tmp_path / "cache"
    write_fake("cifarfs", root)
    Learn2LearnDataModule(name="cifarfs", root=str(root), queries=2, download=False,
                          cache_dir=str(cache)).prepare_data()  # learn2learn's copy: complete
    shutil.rmtree(next((root / "cifarfs/processed/val").iterdir()))
    dm = Learn2LearnDataModule(name="cifarfs", root=str(root), queries=2, download=False,
                               cache_dir=str(tmp_path / "other_cache"))
    with pytest.raises(SettingError, match=r"processed/val holds 15 of the 16 classes"):
        dm.prepare_data()


def test_an_image_that_is_no_image_is_named(tmp_path):
    root, cache = tmp_path / "root", tmp_path / "cache"
    write_fake("dtd", root)
    broken = next((root / "describable_textures/dtd/images").glob("*/*.jpg"))
    broken.write_bytes(b"not an image")
    dm = Learn2LearnDataModule(name="dtd", root=str(root), queries=2, download=False,
                               cache_dir=str(cache))
    with pytest.raises(SettingError, match=rf"cannot read image {broken}"):
        dm.prepare_data()


def test_an_unknown_name_lists_the_known_ones():
    with pytest.raises(SettingError, match=r"data\.name.*'cifarfs'.*'vgg-flowers'"):
        Learn2LearnDataModule(name="imagenet-21k")


@pytest.mark.slow
def test_cross_domain_test_records_the_dataset(tmp_path, workdir):
    """Meta-train on (fake) Mini-ImageNet, test on (fake) CUB with the cross-domain config, which
    takes the network (here 8 channels, not the Mini-ImageNet config's 32) from the checkpoint."""
    import subprocess

    from tests.helpers import small_fake_miniimagenet as small_fake

    cub_root, cache = tmp_path / "cub", tmp_path / "cache"
    write_fake("cub", cub_root)
    run_cli(workdir, "fit", "--config", "configs/miniimagenet_5way_1shot.yaml",
            "--data.root", str(small_fake(tmp_path / "mini")), "--data.cache_dir", str(cache),
            "--data.download", "false", "--data.meta_batch_size", "2", "--data.queries", "1",
            "--data.ways", "2", "--data.val_episodes", "2", "--data.eval_batch_size", "2",
            "--model.solver.inner_steps", "1", "--model.net.init_args.hidden", "8",
            "--trainer.max_steps", "2", "--trainer.val_check_interval", "2",
            "--trainer.enable_progress_bar", "false")
    test = ["test", "--config", "configs/cross_domain_miniimagenet_to_cub.yaml",
            "--data.root", str(cub_root), "--data.cache_dir", str(cache), "--data.download", "false",
            "--data.ways", "2", "--data.queries", "2", "--data.test_episodes", "4",
            "--data.eval_batch_size", "2", "--ckpt_path", "checkpoints/last.ckpt",
            "--trainer.enable_progress_bar", "false"]
    run_cli(workdir, *test)
    (result,) = workdir.glob("lightning_logs/*/test_result.json")
    recorded = json.loads(result.read_text())
    assert recorded["dataset"] == "cub" and recorded["episodes"] == 4
    run_cli(workdir, "report", "lightning_logs", "--out", "report")
    assert "| cub | test/acc |" in (workdir / "report/report.md").read_text()
    # Another image size than the network was trained on: one line naming the settings.
    wrong = subprocess.run(cli_command(*test, "--data.image_size", "40"), cwd=workdir,
                           env=cli_env(), capture_output=True, text=True, timeout=600)
    assert wrong.returncode == 1 and "Traceback" not in wrong.stderr
    assert "data.image_size" in wrong.stderr.strip().splitlines()[-1]
