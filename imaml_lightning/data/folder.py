"""N-way K-shot episodes from a user's own images, laid out as for torchvision's ImageFolder:
ROOT/<class name>/<image files> (any depth below the class folder).

The images are decoded once into one uint8 tensor, cached outside ROOT (which may be read-only)
and rebuilt whenever a file or the image settings change.

Splits, fixed by the folder names alone (no seed or directory listing changes them): either the
classes in SHA-256 order of their names, the first share for meta-training, the next for
meta-validation and the rest for meta-testing (`split_ratios`), or the folders named per split
(`split_classes`).
"""
from functools import partial
from itertools import accumulate, combinations
from pathlib import Path
from typing import Dict, List, Literal, Optional, Tuple

import torch
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset
from torchvision.transforms.v2.functional import pil_to_tensor

from imaml_lightning.data.cache import cached, fingerprint, source_tag
from imaml_lightning.data.images import (
    ImageClassificationDataModule, LabeledImages, RotationMode, ranked, read_image, resize_square,
)
from imaml_lightning.errors import SettingError, require

SPLITS = ("train", "val", "test")
MIN_CLASSES = 2  # per split: a task needs at least two classes


def invalid(root: Path, why: str, setting: str = "data.root") -> SettingError:
    return SettingError(f"{setting}={str(root)!r} is invalid: {why}")


def list_images(root: Path, setting: str = "data.root") -> Dict[str, List[Path]]:
    """The image files of each class folder, both in sorted order (ImageFolder's listing);
    `setting` is what an error names (predict lists a support folder with it)."""
    invalid_root = partial(invalid, setting=setting)
    if not root.is_dir():
        raise invalid_root(root, "no such folder")
    try:
        names, _ = find_classes(root)
    except FileNotFoundError:  # torchvision's way of saying there is no class folder
        names = []
    except OSError as error:
        raise invalid_root(root, f"cannot list it ({error.strerror})") from None
    names = [name for name in names if not name.startswith(".")]  # .ipynb_checkpoints, .git
    if not names:
        raise invalid_root(root, "it holds no class folders (ROOT/<class name>/<images>)")
    class_ids = {name: i for i, name in enumerate(names)}
    files: Dict[str, List[Path]] = {name: [] for name in names}
    for path, class_id in make_dataset(root, class_ids, IMG_EXTENSIONS, allow_empty=True):
        files[names[class_id]].append(Path(path))
    for name, images in files.items():
        if not images:
            try:  # os.walk, under make_dataset, skips unreadable folders without a word
                next((root / name).iterdir(), None)
            except OSError as error:
                raise invalid_root(root, f"class folder {name!r} cannot be read "
                                         f"({error.strerror})") from None
            raise invalid_root(root, f"class folder {name!r} holds no images (files ending in "
                                     f"{', '.join(IMG_EXTENSIONS)}); add some or remove it")
    return files


def split_by_ratio(names: List[str], ratios: Tuple[float, float, float]) -> Dict[str, List[str]]:
    order = [names[i] for i in ranked(names)]
    ends = [0, *(round(share * len(names)) for share in accumulate(ratios[:2])), len(names)]
    return {split: order[start:end] for split, start, end in zip(SPLITS, ends, ends[1:])}


def check_split_classes(split_classes: Dict[str, List[str]], names: List[str], root: Path) -> None:
    require(sorted(split_classes) == sorted(SPLITS), "data.split_classes", split_classes,
            f"its keys must be exactly {', '.join(SPLITS)}")
    unknown = sorted({n for listed in split_classes.values() for n in listed} - set(names))
    if unknown:
        raise SettingError(f"data.split_classes is invalid: {unknown} are not class folders "
                           f"of data.root={str(root)!r}")
    for a, b in combinations(SPLITS, 2):
        overlap = sorted(set(split_classes[a]) & set(split_classes[b]))
        if overlap:
            raise SettingError(f"data.split_classes is invalid: {overlap} are in both the {a} "
                               f"and the {b} split; splits must not share classes")


def decode_all(files: List[Path], root: Path, mode: str, size: Optional[int]) -> torch.Tensor:
    # Resized as decoded: a folder of photos never sits in memory at full size.
    images = [resize_square(pil_to_tensor(read_image(path, mode)), size) for path in files]
    for path, image in zip(files, images):
        if image.shape != images[0].shape:
            (height, width), (first_height, first_width) = image.shape[1:], images[0].shape[1:]
            raise SettingError(
                f"data.image_size=None is invalid: the images differ in size ("
                f"{files[0].relative_to(root)} is {first_width}x{first_height}, "
                f"{path.relative_to(root)} is {width}x{height}, width x height); set "
                f"data.image_size to resize them all to one square size")
    return torch.stack(images)


class FolderDataModule(ImageClassificationDataModule):
    """N-way K-shot episodes from ROOT/<class name>/<images> (see the module docstring).

    Args:
        root: folder holding one subfolder of images per class.
        ways / shots / queries: classes per task, support and query images per class.
        image_size: side of the square the images are resized to (aspect ratio not kept);
            None keeps their native size, which all images must then share.
        channels: 1 (grayscale) or 3 (RGB); images are converted to it.
        split_ratios: shares of the classes for meta-training, -validation and -testing.
        split_classes: the class folder names of each split, as {"train": [...], "val": [...],
            "test": [...]}; replaces split_ratios, and unlisted classes go unused.
        rotations: "classes" (each rotation by 90 degrees * k is a class of its own),
            "augment" (each class of a task under one random rotation) or "none".
        cache_dir: where the decoded images are kept (default ~/.cache/imaml_lightning).
        Episode and loader settings: see EpisodicDataModule.
    """

    def __init__(
        self,
        root: str,
        ways: int = 5,
        shots: int = 1,
        queries: int = 5,
        image_size: Optional[int] = None,
        channels: Literal[1, 3] = 3,
        split_ratios: Tuple[float, float, float] = (0.7, 0.15, 0.15),
        split_classes: Optional[Dict[str, List[str]]] = None,
        rotations: RotationMode = "none",
        cache_dir: Optional[str] = None,
        **kwargs,
    ):
        super().__init__(ways, shots, queries, rotations, cache_dir, **kwargs)
        require(image_size is None or image_size >= 1, "data.image_size", image_size,
                "must be >= 1, or None to keep the native size")
        require(channels in (1, 3), "data.channels", channels, "must be 1 (gray) or 3 (RGB)")
        split_ratios = tuple(split_ratios)
        require(len(split_ratios) == len(SPLITS) and min(split_ratios) >= 0
                and abs(sum(split_ratios) - 1) < 1e-6, "data.split_ratios", split_ratios,
                "must be 3 non-negative shares (train, val, test) that sum to 1")
        self.root, self.image_size, self.channels = Path(root), image_size, channels
        self.split_ratios, self.split_classes = split_ratios, split_classes

    def _split_names(self, names: List[str]) -> Dict[str, List[str]]:
        if self.split_classes is not None:
            check_split_classes(self.split_classes, names, self.root)
            splits, setting, value = self.split_classes, "data.split_classes", self.split_classes
        else:
            splits = split_by_ratio(names, self.split_ratios)
            setting, value = "data.split_ratios", self.split_ratios
        for split, members in splits.items():
            require(len(set(members)) >= MIN_CLASSES, setting, value,
                    f"gives the {split} split {len(set(members))} of the {len(names)} classes "
                    f"in data.root; each split needs >= {MIN_CLASSES}")
        return splits

    @property
    def dataset_name(self) -> str:
        return f"folder:{self.root.resolve().name}"

    def read_image_file(self, path: Path, setting: str) -> torch.Tensor:
        mode = "L" if self.channels == 1 else "RGB"
        return resize_square(pil_to_tensor(read_image(path, mode, setting)), self.image_size)

    def load(self) -> Tuple[LabeledImages, Dict[str, torch.Tensor]]:
        files = list_images(self.root)
        names = list(files)
        split_names = self._split_names(names)  # before decoding: a bad split fails fast
        all_files = [path for images in files.values() for path in images]
        mode = "L" if self.channels == 1 else "RGB"
        # One cache per (root, size, channels): a rebuild replaces only its own predecessor.
        prefix = (f"folder-{self.root.name}-{source_tag(self.root)}-"
                  f"{self.image_size or 'native'}px-{self.channels}ch")
        images = cached(self.cache_dir, prefix, fingerprint(all_files, self.root, "folder/v1"),
                        lambda: {"images": decode_all(all_files, self.root, mode,
                                                      self.image_size)})["images"]
        members = list(torch.arange(len(all_files)).split([len(f) for f in files.values()]))
        class_id = {name: i for i, name in enumerate(names)}
        splits = {split: torch.tensor(sorted({class_id[n] for n in listed}), dtype=torch.long)
                  for split, listed in split_names.items()}
        return LabeledImages(images, members, names), splits
