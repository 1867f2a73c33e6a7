"""ClassificationTasks on synthetic images whose pixels say which class and image they are."""
import re

import pytest
import torch

from imaml_lightning.data.episodes import task_generator
from imaml_lightning.data.images import ClassificationTasks, LabeledImages
from imaml_lightning.errors import SettingError

SIDE = 6


def synthetic(counts) -> LabeledImages:
    """Class c, image j: a random pattern (no rotation symmetry) for identification."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (sum(counts), 1, SIDE, SIDE), generator=generator,
                           dtype=torch.uint8)
    starts = torch.tensor([0, *counts]).cumsum(0)
    members = [torch.arange(starts[c], starts[c + 1]) for c in range(len(counts))]
    return LabeledImages(images, members, [f"class{c}" for c in range(len(counts))])


DATA = synthetic([7, 5, 9, 6, 8, 5, 7, 6])  # ragged, as a user's folders are
SPLITS = {"train": torch.tensor([0, 2, 4, 6]), "val": torch.tensor([1, 3]),
          "test": torch.tensor([5, 7])}


def identify(image: torch.Tensor):
    """(image index, rotation k) of a sampled image."""
    for k in range(4):
        match = (DATA.images == image.rot90(-k, dims=(-2, -1))).flatten(1).all(1).nonzero()
        if len(match):
            return match.item(), k
    raise AssertionError("the image is none of the data's, under any rotation")


def class_of(index: int) -> int:
    return next(c for c, m in enumerate(DATA.members) if index in m.tolist())


@pytest.mark.parametrize("rotations", ["classes", "augment", "none"])
def test_each_class_is_one_source_class_under_one_rotation(rotations):
    tasks = ClassificationTasks(DATA, SPLITS, ways=2, shots=2, queries=3, rotations=rotations)
    turns_seen = set()
    for index in range(30):
        xs, ys, xq, yq = tasks("train", task_generator(0, "train", index))
        assert xs.shape == (4, 1, SIDE, SIDE) and xq.shape == (6, 1, SIDE, SIDE)
        assert ys.tolist() == [0, 0, 1, 1] and yq.tolist() == [0, 0, 0, 1, 1, 1]
        for label in range(2):
            found = [identify(x) for x in torch.cat([xs[ys == label], xq[yq == label]])]
            indices, turns = zip(*found)
            assert len(set(indices)) == 5  # drawn without replacement
            assert len({class_of(i) for i in indices}) == 1  # one source class per label
            assert class_of(indices[0]) in SPLITS["train"].tolist()
            assert len(set(turns)) == 1  # one rotation for all images of a class
            turns_seen.add(turns[0])
    assert turns_seen == ({0} if rotations == "none" else {0, 1, 2, 3})


def test_every_image_of_a_ragged_class_is_drawn_equally_often():
    """Padding to the largest class must not bias the draw: members of class 2 (9 images)
    appear in 5 of its 9 slots each time it is drawn, so each one ~5/9 of its draws."""
    tasks = ClassificationTasks(DATA, SPLITS, ways=2, shots=2, queries=3)
    drawn = torch.zeros(len(DATA.images))
    for index in range(1200):
        xs, _, xq, _ = tasks("train", task_generator(0, "train", index))
        for image in torch.cat([xs, xq]):
            drawn[identify(image)[0]] += 1
    for c in SPLITS["train"].tolist():
        counts = drawn[DATA.members[c]]
        assert counts.min() > 0.85 * counts.mean() and counts.max() < 1.15 * counts.mean(), counts
    assert drawn[torch.cat([DATA.members[c] for c in SPLITS["val"].tolist()])].sum() == 0


def test_rotation_classes_can_pair_a_class_with_itself_rotated():
    """With rotations as classes, 'ways' counts (class, rotation) pairs: a task may hold the same
    source class twice under two rotations, as in the MAML protocol."""
    tasks = ClassificationTasks(DATA, SPLITS, ways=8, shots=1, queries=1, rotations="classes")
    xs, ys, _, _ = tasks("val", task_generator(0, "val", 0))  # val has 2 classes x 4 rotations
    pairs = {(class_of(i), k) for i, k in map(identify, xs)}
    assert len(pairs) == 8 and {c for c, _ in pairs} == {1, 3}


def test_tasks_are_fixed_by_the_generator():
    tasks = ClassificationTasks(DATA, SPLITS, ways=2, shots=1, queries=2, rotations="augment")
    a, b = (tasks("test", task_generator(4, "test", 9)) for _ in range(2))
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    c = tasks("test", task_generator(4, "test", 10))
    assert not torch.equal(a[0], c[0])


@pytest.mark.parametrize("kwargs, message", [
    ({"ways": 3}, "data.ways=3 is invalid: must be <= 2, the classes in the val split"),
    ({"ways": 9, "rotations": "classes"},
     "data.ways=9 is invalid: must be <= 8, the classes in the val split (2 x 4 rotations)"),
    ({"shots": 4, "queries": 2},
     "data.shots + data.queries=6 is invalid: must be <= 5, the images of class 'class1' in the val split"),
    ({"rotations": "sideways"}, "data.rotations='sideways' is invalid"),
])
def test_impossible_tasks_name_the_setting_and_the_limit(kwargs, message):
    settings = {"ways": 2, "shots": 1, "queries": 1, **kwargs}
    with pytest.raises(SettingError, match=re.escape(message)):
        ClassificationTasks(DATA, SPLITS, **settings)


def test_rotations_need_square_images():
    wide = LabeledImages(torch.zeros(4, 1, 6, 8, dtype=torch.uint8),
                         [torch.tensor([0, 1]), torch.tensor([2, 3])], ["a", "b"])
    splits = {"train": torch.tensor([0, 1])}
    with pytest.raises(SettingError, match="needs square images, these are 6x8"):
        ClassificationTasks(wide, splits, 2, 1, 1, rotations="augment")
    assert ClassificationTasks(wide, splits, 2, 1, 1)("train", torch.Generator())[0].shape == (2, 1, 6, 8)
