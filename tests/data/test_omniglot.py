import re
from pathlib import Path

import pytest
import torch

from imaml_lightning.data import OmniglotDataModule
from imaml_lightning.data.episodes import task_generator
from imaml_lightning.data.omniglot import (
    alphabet_split, character_name, list_characters, locate, paper_split,
)
from imaml_lightning.errors import SettingError


@pytest.fixture(scope="module")
def omniglot(omniglot_root, cache_dir):
    dm = OmniglotDataModule(root=str(omniglot_root), ways=5, shots=2, queries=3,
                            cache_dir=str(cache_dir), download=False)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_paper_split_is_disjoint_complete_and_fixed(omniglot_root):
    characters = list_characters(locate(omniglot_root))
    splits = paper_split(characters)
    sets = {name: set(ids.tolist()) for name, ids in splits.items()}
    assert {k: len(v) for k, v in sets.items()} == {"train": 1100, "val": 100, "test": 423}
    assert not sets["train"] & sets["val"] and not sets["train"] & sets["test"]
    assert not sets["val"] & sets["test"]
    assert set.union(*sets.values()) == set(range(1623))
    # The split is by name, documented and frozen: pin members so that it cannot drift.
    names = {split: {character_name(characters[i]) for i in ids} for split, ids in sets.items()}
    assert len({n.split("/")[0] for n in names["test"]}) > 40  # spread over the alphabets
    pinned = {"train": {"Alphabet_of_the_Magi/character02", "ULOG/character26"},
              "val": {"Alphabet_of_the_Magi/character08", "Tifinagh/character47"},
              "test": {"Alphabet_of_the_Magi/character01", "ULOG/character25",
                       "Angelic/character02", "Avesta/character03"}}
    assert all(pinned[split] <= names[split] for split in pinned), "the paper split moved"
    reordered = paper_split(list(reversed(characters)))  # by name, not by listing order
    assert {character_name(characters[::-1][i]) for i in reordered["test"].tolist()} == names["test"]


def test_alphabet_split_shares_no_alphabet(omniglot_root):
    characters = list_characters(locate(omniglot_root))
    splits = alphabet_split(characters)
    alphabets = {split: {character_name(characters[i]).split("/")[0] for i in ids.tolist()}
                 for split, ids in splits.items()}
    assert {k: len(v) for k, v in alphabets.items()} == {"train": 25, "val": 5, "test": 20}
    names = {split: {character_name(characters[i]) for i in ids.tolist()} for split, ids in splits.items()}
    pinned = {"train": {"Alphabet_of_the_Magi/character01", "Tifinagh/character55"},
              "val": {"Bengali/character01", "N_Ko/character33"},
              "test": {"Angelic/character01", "ULOG/character26"}}
    assert all(pinned[split] <= names[split] for split in pinned), "the alphabet split moved"
    assert not alphabets["train"] & alphabets["val"] and not alphabets["train"] & alphabets["test"]
    assert not alphabets["val"] & alphabets["test"]
    assert sum(len(ids) for ids in splits.values()) == 1623
    assert len(splits["test"]) == 659  # the 20 evaluation alphabets
    assert all(characters[i][0].parents[2].name == "images_evaluation" for i in splits["test"])
    reordered = list(reversed(characters))  # the split depends on names, not listing order
    assert {character_name(reordered[i]) for i in alphabet_split(reordered)["val"].tolist()} == {
        character_name(characters[i]) for i in splits["val"].tolist()}


def test_episode_shapes_labels_and_value_range(omniglot):
    xs, ys, xq, yq = omniglot.sampler("train", task_generator(0, "train", 0))
    assert xs.shape == (10, 1, 28, 28) and xq.shape == (15, 1, 28, 28)
    assert ys.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert yq.tolist() == [c for c in range(5) for _ in range(3)]
    assert xs.dtype == torch.uint8
    xs = omniglot.on_after_batch_transfer((xs, ys, xq, yq), 0)[0]
    assert xs.dtype == torch.float32 and 0 <= xs.min() and xs.max() <= 1
    assert xs.mean() < 0.5  # strokes are the bright foreground on a dark background


def test_each_class_is_one_character_under_one_rotation(omniglot):
    sampler = omniglot.sampler
    characters = sampler.images.view(-1, 20, 28, 28)  # [character, drawer, H, W]
    for index in range(20):
        xs, ys, xq, yq = sampler("train", task_generator(1, "train", index))
        seen = set()
        for label in range(5):
            class_images = torch.cat([xs[ys == label], xq[yq == label]]).squeeze(1)
            stored = class_images
            # The (character, rotation) holding the first image; all others must match it.
            rotations = [stored[0].rot90(-k) for k in range(4)]
            character, rotation = next((c, k) for k in range(4) for c in
                                       (characters == rotations[k]).flatten(2).all(2).any(1)
                                       .nonzero().flatten().tolist())
            for image in stored:
                assert (characters[character] == image.rot90(-rotation)).flatten(1).all(1).any()
            assert character in sampler.splits["train"].tolist()
            seen.add((character, rotation))
        assert len(seen) == 5


def test_episodes_are_deterministic_and_split_specific(omniglot):
    a = omniglot.sampler("val", task_generator(0, "val", 3))
    b = omniglot.sampler("val", task_generator(0, "val", 3))
    c = omniglot.sampler("val", task_generator(0, "val", 4))
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(a[0], c[0])


def test_cache_lives_outside_the_dataset_root(omniglot, omniglot_root, cache_dir):
    assert list(cache_dir.glob("omniglot-*-28px-*.pt"))
    assert not list(omniglot_root.rglob("*.pt"))


@pytest.mark.parametrize("kwargs, setting", [
    ({"ways": 1}, "data.ways"),
    ({"split": "drawers"}, "data.split"),
    ({"rotations": "mirror"}, "data.rotations"),
    ({"shots": 15, "queries": 6}, "data.shots + data.queries"),
    ({"shots": 0}, "data.shots"),
])
def test_invalid_settings_name_the_setting(kwargs, setting):
    with pytest.raises(SettingError, match=re.escape(setting)):
        OmniglotDataModule(**kwargs)


def test_missing_root_without_download_is_one_clear_error(tmp_path):
    dm = OmniglotDataModule(root=str(tmp_path / "nowhere"), download=False)
    with pytest.raises(SettingError, match="data.root"):
        dm.prepare_data()


@pytest.mark.parametrize("split, rotations, limit", [
    ("paper", "classes", "must be <= 400, the classes in the val split (100 x 4 rotations)"),
    ("alphabet", "none", "must be <= 169, the classes in the val split"),
])
def test_ways_beyond_a_split_name_the_limit(omniglot_root, cache_dir, split, rotations, limit):
    dm = OmniglotDataModule(root=str(omniglot_root), ways=1000, split=split, rotations=rotations,
                            cache_dir=str(cache_dir), download=False)
    with pytest.raises(SettingError, match=re.escape(f"data.ways=1000 is invalid: {limit}")):
        dm.setup("fit")


def test_download_failure_is_one_clear_error(tmp_path, monkeypatch):
    """Offline, or an archive whose MD5 checksum does not match: one message naming data.root,
    and no empty folders left where there were none."""
    from torchvision.datasets import omniglot

    def offline(url, download_root, *args, **kwargs):
        Path(download_root).mkdir(parents=True, exist_ok=True)  # as torchvision does first
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(omniglot, "download_and_extract_archive", offline)
    dm = OmniglotDataModule(root=str(tmp_path / "omniglot"), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(SettingError, match="data.root=.* the download failed .*name resolution"):
        dm.prepare_data()
    assert not (tmp_path / "omniglot").exists()


def test_downloaded_archives_are_checked_against_their_checksums(tmp_path, monkeypatch):
    from torchvision.datasets import utils

    def tampered(url, path, *args, **kwargs):  # the server hands out other bytes
        Path(path).write_bytes(b"not the official zip")

    monkeypatch.setattr(utils, "_get_redirect_url", lambda url, max_hops: url)
    monkeypatch.setattr(utils, "_urlretrieve", tampered)
    dm = OmniglotDataModule(root=str(tmp_path / "omniglot"), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(SettingError, match=r"the download failed \(File not found or corrupted"):
        dm.prepare_data()
