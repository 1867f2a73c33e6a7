"""FolderDataModule on small ImageFolder-style trees written with PIL: every image is seeded
noise, so its pixels alone say which file (and so which class) an episode image came from."""
import hashlib
import os
from pathlib import Path
import random
import re
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

from imaml_lightning.data.episodes import task_generator
from imaml_lightning.data.folder import FolderDataModule, split_by_ratio
from imaml_lightning.errors import SettingError
from tests.helpers import (
    FOLDER_CLASSES, FOLDER_SIDE, cli_command, cli_env, load, make_root, noise, run_cli)

CLASSES, SIDE = FOLDER_CLASSES, FOLDER_SIDE
EVEN = (0.5, 0.25, 0.25)  # 12 classes -> 6 / 3 / 3
EPISODE = {"ways": 3, "shots": 2, "queries": 3, "split_ratios": EVEN}
SMALL = {"ways": 2, "shots": 1, "queries": 1, "split_ratios": (1 / 3, 1 / 3, 1 / 3)}  # 6 classes


def owners(root, mode: str) -> dict:
    """Pixels (as C x H x W bytes in the given PIL mode) -> the class folder holding them."""
    found = {}
    for path in root.glob("*/*.png"):
        pixels = np.asarray(Image.open(path).convert(mode))
        found[np.atleast_3d(pixels).transpose(2, 0, 1).tobytes()] = path.parent.name
    return found


def classes_by_label(images: torch.Tensor, labels: torch.Tensor, lookup: dict) -> list:
    """For each label, the set of class folders its images come from."""
    return [{lookup[x.numpy().tobytes()] for x in images[labels == label]}
            for label in labels.unique().tolist()]


def sha_order(names):
    return sorted(names, key=lambda name: hashlib.sha256(name.encode()).digest())


def build(root, cache_dir, **settings) -> FolderDataModule:
    dm = FolderDataModule(root=str(root), cache_dir=str(cache_dir), **settings)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def split_names(dm: FolderDataModule) -> dict:
    names = sorted(CLASSES)  # class ids follow ImageFolder's sorted folder names
    return {split: {names[i] for i in ids.tolist()} for split, ids in dm.sampler.splits.items()}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_root(tmp_path_factory.mktemp("images") / "root")


@pytest.mark.parametrize("channels, mode", [(1, "L"), (3, "RGB")])
def test_episode_shapes_labels_range_and_pixels(root, cache_dir, channels, mode):
    dm = build(root, cache_dir, channels=channels, **EPISODE)
    assert dm.out_features == 3
    xs, ys, xq, yq = dm.sampler("train", task_generator(0, "train", 0))
    assert xs.shape == (6, channels, SIDE, SIDE) and xq.shape == (9, channels, SIDE, SIDE)
    assert ys.tolist() == [0, 0, 1, 1, 2, 2] and yq.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert xs.dtype == torch.uint8  # made float on the device
    float_xs = dm.on_after_batch_transfer((xs, ys, xq, yq), 0)[0]
    assert float_xs.dtype == torch.float32 and 0 <= float_xs.min() and float_xs.max() <= 1
    assert torch.equal((float_xs * 255).round().to(torch.uint8), xs)
    lookup = owners(root, mode)  # decoded exactly as PIL converts the file to gray or RGB
    per_label = classes_by_label(torch.cat([xs, xq]), torch.cat([ys, yq]), lookup)
    assert all(len(c) == 1 for c in per_label) and len(set.union(*per_label)) == 3


def test_episodes_hold_genuine_members_of_distinct_classes_of_their_split(root, cache_dir):
    dm = build(root, cache_dir, **EPISODE)
    order = sha_order(CLASSES)
    expected = {"train": set(order[:6]), "val": set(order[6:9]), "test": set(order[9:])}
    lookup = owners(root, "RGB")
    for split in ("train", "val", "test"):
        seen = set()
        for index in range(10):
            xs, ys, xq, yq = dm.sampler(split, task_generator(0, split, index))
            per_label = classes_by_label(torch.cat([xs, xq]), torch.cat([ys, yq]), lookup)
            assert all(len(c) == 1 for c in per_label)  # one class per label...
            drawn = set.union(*per_label)
            assert len(drawn) == 3 and drawn <= expected[split]  # ...distinct, from the split
            seen |= drawn
        assert len(seen) > 3 if split == "train" else seen == expected[split]


def test_ratio_split_is_disjoint_complete_and_fixed_by_the_names(tmp_path):
    forward = make_root(tmp_path / "forward", images=2)
    backward = make_root(tmp_path / "backward", classes=CLASSES[::-1], images=2)
    splits = [split_names(build(r, tmp_path / "cache", ways=2, shots=1, queries=1))
              for r in (forward, backward)]
    assert splits[0] == splits[1]
    order = sha_order(CLASSES)  # default 0.7 / 0.15 / 0.15 of 12 classes: 8 / 2 / 2
    assert splits[0] == {"train": set(order[:8]), "val": set(order[8:10]), "test": set(order[10:])}
    shuffled = random.Random(0).sample(CLASSES, len(CLASSES))
    assert split_by_ratio(shuffled, EVEN) == split_by_ratio(CLASSES, EVEN)


def test_split_classes_are_honored(root, cache_dir):
    chosen = {"train": CLASSES[:4], "val": CLASSES[4:7], "test": CLASSES[7:10]}
    dm = build(root, cache_dir, ways=3, shots=2, queries=3, split_classes=chosen)
    assert split_names(dm) == {split: set(names) for split, names in chosen.items()}
    lookup = owners(root, "RGB")
    for index in range(5):
        xs, ys, xq, yq = dm.sampler("val", task_generator(0, "val", index))
        assert set.union(*classes_by_label(xs, ys, lookup)) == set(chosen["val"])


def test_image_size_resizes_images_of_any_native_size(tmp_path):
    colours = {}
    for c, name in enumerate(CLASSES[:6]):
        folder = tmp_path / "root" / name
        folder.mkdir(parents=True)
        for index, size in enumerate([(16, 16), (20, 12), (9, 31)]):
            colours[name, index] = (20 * c, 80 * index, 255 - c)
            Image.new("RGB", size, colours[name, index]).save(folder / f"{index}.png")
    dm = build(tmp_path / "root", tmp_path / "cache", image_size=8, **SMALL)
    images = dm.sampler.images
    assert images.shape == (18, 3, 8, 8)
    # A plain colour stays that colour under any resize: no cropping, padding or channel swap.
    assert {tuple(x[:, 0, 0].tolist()) for x in images} == set(colours.values())
    assert all((x == x[:, :1, :1]).all() for x in images)


def test_prepare_data_then_setup_read_the_files_once(tmp_path, monkeypatch):
    root = make_root(tmp_path / "root", CLASSES[:6], images=3)
    loads = []
    original = FolderDataModule.load
    monkeypatch.setattr(FolderDataModule, "load", lambda self: loads.append(1) or original(self))
    dm = build(root, tmp_path / "cache", **SMALL)
    assert len(loads) == 1 and dm.sampler is not None


def test_a_damaged_cache_is_rebuilt(tmp_path):
    root = make_root(tmp_path / "root", CLASSES[:6], images=3)
    first = build(root, tmp_path / "cache", **SMALL).sampler.images.clone()
    (cache_file,) = (tmp_path / "cache").glob("folder-root-*.pt")
    cache_file.write_bytes(cache_file.read_bytes()[:100])  # e.g. a full disk, outside our writes
    assert torch.equal(build(root, tmp_path / "cache", **SMALL).sampler.images, first)


def test_cache_lives_in_cache_dir_and_follows_the_files_and_settings(tmp_path):
    root = make_root(tmp_path / "root", CLASSES[:6], images=3)
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    cache = tmp_path / "cache"
    settings = SMALL
    build(root, cache, **settings)
    build(root, cache, **settings)  # reused, not rebuilt
    assert len(list(cache.glob("folder-root-*.pt"))) == 1
    build(root, cache, image_size=8, **settings)
    assert len(list(cache.glob("folder-root-*.pt"))) == 2
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == before  # nothing written in ROOT

    edited = root / CLASSES[0] / "0.png"
    Image.fromarray(noise("edited", 0)).save(edited)
    stat = edited.stat()
    os.utime(edited, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a later edit
    images = build(root, cache, **settings).sampler.images
    assert len(list(cache.glob("folder-root-*.pt"))) == 2  # rebuilt: replaced its predecessor
    assert (images == torch.from_numpy(noise("edited", 0)).permute(2, 0, 1)).all((1, 2, 3)).any()


def test_unreadable_class_folder_is_named(tmp_path, monkeypatch):
    root = make_root(tmp_path / "root", CLASSES[:6], images=3)
    locked = root / "locked"
    locked.mkdir()
    Image.fromarray(noise("locked", 0)).save(locked / "0.png")
    locked.chmod(0)
    # Root (CI's user) reads any folder whatever its mode: there, refuse the way the kernel
    # refuses everybody else, so the test runs for every user.
    real_scandir, real_listdir = os.scandir, os.listdir

    def refuse(real):
        def listing(path="."):
            if Path(path) == locked:
                raise PermissionError(13, "Permission denied", str(path))
            return real(path)
        return listing

    monkeypatch.setattr(os, "scandir", refuse(real_scandir))
    monkeypatch.setattr(os, "listdir", refuse(real_listdir))
    try:
        with pytest.raises(SettingError, match="class folder 'locked' cannot be read"):
            build(root, tmp_path / "cache", **SMALL)
    finally:
        locked.chmod(0o755)


def corrupt_image(root):
    (root / CLASSES[1] / "broken.png").write_bytes(b"these bytes are not an image")
    return re.escape(f"cannot read image {root / CLASSES[1] / 'broken.png'}")


def mismatched_sizes(root):
    Image.fromarray(noise("wide", 0, width=20, height=12)).save(root / CLASSES[2] / "wide.png")
    return re.escape(f"data.image_size=None is invalid: the images differ in size "
                     f"({CLASSES[0]}/0.png is 16x16, {CLASSES[2]}/wide.png is 20x12")


def empty_class(root):
    (root / "empty").mkdir()
    (root / "empty" / "notes.txt").write_text("no images here")
    return "class folder 'empty' holds no images"


def no_class_folders(root):
    for folder in root.iterdir():
        for path in folder.iterdir():
            path.unlink()
        folder.rmdir()
    (root / "loose.png").write_bytes(b"")
    return r"data.root='.*' is invalid: it holds no class folders"


def only_hidden_folders(root):
    for folder in root.iterdir():
        folder.rename(root / f".{folder.name}")  # .ipynb_checkpoints and the like are no classes
    return r"data.root='.*' is invalid: it holds no class folders"


def missing_root(root):
    for folder in root.iterdir():
        for path in folder.iterdir():
            path.unlink()
        folder.rmdir()
    root.rmdir()
    return r"data.root='.*root' is invalid: no such folder"


@pytest.mark.parametrize("damage", [corrupt_image, mismatched_sizes, empty_class,
                                    no_class_folders, only_hidden_folders, missing_root])
def test_bad_folder_is_one_setting_error_naming_the_culprit(tmp_path, damage):
    root = make_root(tmp_path / "root", CLASSES[:6], images=3)
    message = damage(root)
    with pytest.raises(SettingError, match=message):
        build(root, tmp_path / "cache", **SMALL)


@pytest.mark.parametrize("settings, message", [
    ({"ways": 4}, re.escape("data.ways=4 is invalid: must be <= 3, the classes in the val split")),
    ({"shots": 4, "queries": 3}, re.escape("data.shots + data.queries=7 is invalid: must be <= 6")),
    ({"split_ratios": (0.9, 0.05, 0.05)}, re.escape(
        "data.split_ratios=(0.9, 0.05, 0.05) is invalid: gives the val split 0 of the 12 classes")),
    ({"split_classes": {"train": CLASSES[:3], "val": CLASSES[3:6]}},
     "data.split_classes={.*} is invalid: its keys must be exactly train, val, test"),
    ({"split_classes": {"train": ["dog", *CLASSES[:3]], "val": CLASSES[3:6], "test": ["cat"]}},
     r"data.split_classes is invalid: \['cat', 'dog'\] are not class folders"),
    ({"split_classes": {"train": CLASSES[:3], "val": CLASSES[2:6], "test": CLASSES[6:9]}},
     r"data.split_classes is invalid: \['class_02'\] are in both the train and the val split"),
])
def test_split_and_episode_settings_the_data_cannot_serve(root, cache_dir, settings, message):
    with pytest.raises(SettingError, match=message):
        build(root, cache_dir, **{**EPISODE, **settings})


@pytest.mark.parametrize("settings, setting", [
    ({"split_ratios": (0.5, 0.2, 0.2)}, "data.split_ratios"),
    ({"split_ratios": (1.2, -0.1, -0.1)}, "data.split_ratios"),
    ({"channels": 2}, "data.channels"),
    ({"image_size": 0}, "data.image_size"),
    ({"ways": 1}, "data.ways"),
])
def test_invalid_settings_fail_at_construction(settings, setting):
    with pytest.raises(SettingError, match=re.escape(setting)):
        FolderDataModule(root="anywhere", **settings)


def fit_args(root, cache, *overrides):
    return ["fit", "--config", "configs/folder_5way_1shot.yaml",
            "--data.init_args.root", str(root), "--data.init_args.cache_dir", str(cache),
            "--data.init_args.split_ratios", "[0.5, 0.25, 0.25]",
            "--data.init_args.meta_batch_size", "2", "--data.init_args.val_episodes", "2",
            "--data.init_args.eval_batch_size", "2", "--model.solver.inner_steps", "2",
            "--model.net.init_args.hidden", "8", "--trainer.max_steps", "2",
            "--trainer.val_check_interval", "2", "--trainer.enable_progress_bar", "false",
            "--charts.every_n_steps", "0", *overrides]


def test_fit_through_the_cli_with_the_folder_config(workdir, root):
    run_cli(workdir, *fit_args(root, workdir / "cache", "--data.init_args.ways", "3"))
    checkpoint = load(workdir / "checkpoints" / "last.ckpt")
    assert checkpoint["global_step"] == 2
    # The config's conv-4 fits its 84x84 images: 84 -> 42 -> 21 -> 10 -> 5 after 4 poolings.
    assert checkpoint["state_dict"]["net.classifier.weight"].shape == (3, 8 * 5 * 5)
    assert list((workdir / "cache").glob("folder-root-*.pt"))


def test_cli_reports_a_bad_setting_as_one_line(workdir, root):
    run = subprocess.run(cli_command(*fit_args(root, workdir / "cache")), cwd=workdir,
                         env=cli_env(), capture_output=True, text=True, timeout=600)
    assert run.returncode != 0 and "Traceback" not in run.stderr, run.stderr[-3000:]
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: data.ways=5 is invalid: must be <= 3, the classes in the val split"]


def test_dataset_short_name_switches_another_config_to_the_folder(workdir, root):
    """--data.dataset folder over the Omniglot config: its 28x28 gray conv-4 on these images."""
    run_cli(workdir, "fit", "--config", "configs/omniglot_5way_1shot.yaml",
            "--data.dataset", "folder", "--data.root", str(root),
            "--data.cache_dir", str(workdir / "cache"), "--data.image_size", "28",
            "--data.channels", "1", "--data.ways", "2", "--data.split_ratios", "[0.5, 0.25, 0.25]",
            "--data.meta_batch_size", "2", "--data.val_episodes", "2",
            "--model.solver.inner_steps", "1", "--model.net.init_args.hidden", "8",
            "--trainer.max_steps", "1", "--trainer.val_check_interval", "1",
            "--trainer.enable_progress_bar", "false", "--charts.every_n_steps", "0")
    config = (workdir / "lightning_logs" / "version_0" / "config.yaml").read_text()
    assert "class_path: imaml_lightning.data.FolderDataModule" in config
    assert load(workdir / "checkpoints" / "last.ckpt")["state_dict"][
        "net.features.0.0.weight"].shape == (8, 1, 3, 3)


def test_a_network_built_for_other_images_is_one_clear_error(workdir, root):
    run = subprocess.run(cli_command(*fit_args(root, workdir / "cache", "--data.init_args.ways", "3",
                                               "--data.init_args.image_size", "28")),
                         cwd=workdir, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert run.returncode != 0 and "Traceback" not in run.stderr, run.stderr[-3000:]
    (error,) = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert error.startswith("error: model.net is invalid for this data: its inputs are [3, 28, 28]")
    assert "data.image_size" in error


def test_true_precision_runs_cast_the_uint8_images_too(workdir, root):
    """Lightning casts a batch for "-true" precisions before its transfer, when images are still
    uint8; the data module casts them after making them floats."""
    run_cli(workdir, *fit_args(root, workdir / "cache", "--data.init_args.ways", "3",
                               "--trainer.precision", "64-true", "--trainer.max_steps", "1"))
    weights = load(workdir / "checkpoints" / "last.ckpt")["state_dict"]["net.classifier.weight"]
    assert weights.dtype == torch.float64
