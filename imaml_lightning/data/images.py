"""N-way K-shot classification episodes from an in-memory uint8 image tensor.

Every image dataset (Omniglot, Mini-ImageNet, a user's folders) becomes a `LabeledImages`: one
tensor [images, C, H, W] and the image indices of each class. `ClassificationTasks` draws tasks
from it by tensor indexing. learn2learn's TaskDataset (MetaDataset + NWays + KShots + LoadData +
RemapLabels) draws the same tasks much more slowly: it loads images one at a time through
Dataset.__getitem__ and filters label lists in Python. So we keep our own (benchmarks.data_pipeline
measures both: docs/benchmarks.md#data_pipeline).
"""
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Literal, Optional, Tuple, get_args

import torch
from PIL import Image, ImageOps
from torchvision.transforms.v2.functional import resize

from imaml_lightning.data.base import EpisodicDataModule
from imaml_lightning.data.cache import default_cache_dir
from imaml_lightning.data.episodes import TaskTensors
from imaml_lightning.errors import SettingError, require

RotationMode = Literal["classes", "augment", "none"]  # the type LightningCLI parses
ROTATION_MODES = get_args(RotationMode)
ROTATIONS = 4  # by 90 degrees * k


@dataclass
class LabeledImages:
    images: torch.Tensor  # uint8 [images, C, H, W]
    members: List[torch.Tensor]  # the image indices of each class
    names: List[str]  # one name per class, for messages


class ClassificationTasks:
    """Samples tasks: `ways` classes of a split, `shots` support and `queries` query images of
    each, labels 0..ways-1 in the order the classes were drawn. Images stay uint8 (a quarter
    of float32 to pass from DataLoader workers and to the device); `to_unit_range` makes them
    floats in [0, 1] there.

    rotations: "classes" makes each class under each rotation by 90 degrees * k a class of its
    own (4x the classes: the MAML protocol for Omniglot); "augment" rotates each class of a task
    by its own random k (the same for all its images); "none" leaves images as they are. The
    rotation is drawn per class and applied with the class's images in hand, so it cannot slip
    to another class (the late-binding bug of learn2learn's RandomClassRotation).
    """

    def __init__(self, data: LabeledImages, splits: Dict[str, torch.Tensor], ways: int,
                 shots: int, queries: int, rotations: str = "none"):
        require(rotations in ROTATION_MODES, "data.rotations", rotations,
                f"must be one of {ROTATION_MODES}")
        height, width = data.images.shape[-2:]
        require(rotations == "none" or height == width, "data.rotations", rotations,
                f"needs square images, these are {height}x{width}: set data.image_size or "
                f"data.rotations=none")
        copies = ROTATIONS if rotations == "classes" else 1
        split, classes = min(splits.items(), key=lambda item: len(item[1]))  # the tightest
        rotated = f" ({len(classes)} x {ROTATIONS} rotations)" if copies > 1 else ""
        require(ways <= len(classes) * copies, "data.ways", ways,
                f"must be <= {len(classes) * copies}, the classes in the {split} split{rotated}")
        counts = torch.tensor([len(m) for m in data.members])
        for split, classes in splits.items():
            smallest = classes[counts[classes].argmin()].item()
            require(shots + queries <= counts[smallest], "data.shots + data.queries",
                    shots + queries, f"must be <= {counts[smallest].item()}, the images of class "
                    f"{data.names[smallest]!r} in the {split} split")
        # Class members padded to one matrix, so a task's images are drawn by one argsort.
        self.members = torch.nn.utils.rnn.pad_sequence(data.members, batch_first=True,
                                                       padding_value=-1)
        self.counts, self.images, self.splits = counts, data.images, splits
        self.ways, self.shots, self.queries, self.rotations = ways, shots, queries, rotations
        self.copies = copies

    def __call__(self, split: str, generator: torch.Generator) -> TaskTensors:
        classes = self.splits[split]
        drawn = torch.randperm(len(classes) * self.copies, generator=generator)[: self.ways]
        chosen = classes[drawn // self.copies]
        # Random keys, padding keys above every real one: the first shots + queries of the
        # argsort are a uniform draw without replacement from each class.
        keys = torch.rand(self.ways, self.members.shape[1], generator=generator)
        keys[self.members[chosen] < 0] = 2.0
        draws = keys.argsort(1)[:, : self.shots + self.queries]
        rows = self.members[chosen[:, None], draws].flatten()
        # index_select copies whole images; advanced indexing (images[rows]) goes element by
        # element on uint8, which made 84x84 RGB tasks slower than learn2learn's Taskset
        # (docs/benchmarks.md#data_pipeline, learn2learn's datasets).
        x = self.images.index_select(0, rows).view(self.ways, -1, *self.images.shape[1:])
        if self.rotations == "classes":
            x = rotate_each_class(x, drawn % ROTATIONS)
        elif self.rotations == "augment":
            x = rotate_each_class(x, torch.randint(ROTATIONS, (self.ways,), generator=generator))
        labels = torch.arange(self.ways)
        return (x[:, : self.shots].flatten(0, 1), labels.repeat_interleave(self.shots),
                x[:, self.shots:].flatten(0, 1), labels.repeat_interleave(self.queries))


def to_unit_range(batch):
    """uint8 images of a task batch -> float32 in [0, 1]; other tensors unchanged."""
    return tuple(t.float().div_(255) if t.dtype == torch.uint8 else t for t in batch)


def rotate_each_class(x: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """x [ways, n, C, H, W] with class i rotated by 90 degrees * turns[i]."""
    out = x.clone()
    for k in turns.unique().tolist():
        if k:
            out[turns == k] = x[turns == k].rot90(k, dims=(-2, -1))
    return out


def read_image(path: Path, mode: str, setting: str = "data.root") -> Image.Image:
    """The image in PIL mode `mode` ("L", "RGB"), upright as its EXIF says. PIL, as in
    ImageFolder's loader: torchvision.io.decode_image reads only jpeg, png, webp and gif."""
    try:
        with Image.open(path) as image:
            return ImageOps.exif_transpose(image).convert(mode)
    except (OSError, ValueError) as error:  # not an image, truncated, unsupported variant
        raise SettingError(f"{setting} is invalid: cannot read image {path} ({error})") from None


def resize_square(image: torch.Tensor, size: Optional[int]) -> torch.Tensor:
    """uint8 [C, H, W] resized to [C, size, size] (antialiased); size None keeps it."""
    return image if size is None else resize(image, [size, size], antialias=True)


def ranked(names: List[str]) -> List[int]:
    """Indices of names in SHA-256 order: a split order fixed by the names alone, which no
    seed, library version or directory listing can change."""
    return sorted(range(len(names)), key=lambda i: hashlib.sha256(names[i].encode()).digest())


class ImageClassificationDataModule(EpisodicDataModule):
    """What the image datasets share: N-way K-shot tasks with Q queries per class, rotations,
    a preprocessing cache. Subclasses load their images and splits in `load`."""

    def __init__(self, ways: int, shots: int, queries: int, rotations: str,
                 cache_dir: Optional[str], **kwargs):
        super().__init__(**kwargs)
        require(ways >= 2, "data.ways", ways, "must be >= 2")
        require(shots >= 1, "data.shots", shots, "must be >= 1")
        require(queries >= 1, "data.queries", queries, "must be >= 1")
        require(rotations in ROTATION_MODES, "data.rotations", rotations,
                f"must be one of {ROTATION_MODES}")
        self.ways, self.shots, self.queries, self.rotations = ways, shots, queries, rotations
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()

    @property
    def out_features(self) -> int:
        return self.ways

    def load(self) -> Tuple[LabeledImages, Dict[str, torch.Tensor]]:
        """The images (from the cache once built) and the class ids of each split."""
        raise NotImplementedError

    def read_image_file(self, path: Path, setting: str) -> torch.Tensor:
        """One image file as uint8 [C, H, W], preprocessed exactly as this dataset's images
        (predict reads a user's images with it); unreadable files name `setting`."""
        raise NotImplementedError

    def prepare_data(self) -> None:
        """Once per node: download and fill the cache. The sampler built on the way serves
        `setup` in this process, which would otherwise list and fingerprint the files again."""
        if self.sampler is None:
            self.sampler = self.make_sampler()

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        batch = to_unit_range(batch)  # on the device: moved as uint8
        # Lightning casts floats for "-true" precisions before the transfer, when these were
        # still uint8: cast them now.
        return self.trainer.precision_plugin.convert_input(batch) if self.trainer else batch

    def make_sampler(self) -> ClassificationTasks:
        images, splits = self.load()
        return ClassificationTasks(images, splits, self.ways, self.shots, self.queries,
                                   self.rotations)
