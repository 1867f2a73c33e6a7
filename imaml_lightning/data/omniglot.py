"""Omniglot (Lake et al., 2015) N-way K-shot episodes.

Reads the official folder layout (ROOT/images_background, ROOT/images_evaluation, or the same
under ROOT/omniglot-py as torchvision stores it), downloads the official archives with
torchvision when absent, and caches the 28x28 images as one uint8 tensor outside ROOT.

Split ("paper" protocol of the MAML line of work): all 1623 characters, ordered by the SHA-256
of "<alphabet>/<character>" -- a fixed order that no seed, library version or directory listing
can change -- the first 1100 for meta-training, the next 100 for meta-validation and the last
423 for meta-testing. Each character rotated by 0, 90, 180 and 270 degrees gives four classes.
"""
import hashlib
import os
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
from PIL import Image, ImageOps

from imaml_lightning.data.base import EpisodicDataModule
from imaml_lightning.data.episodes import TaskTensors
from imaml_lightning.errors import SettingError, require

SETS = ("images_background", "images_evaluation")
DRAWERS = 20  # images per character
SPLIT_SIZES = {"train": 1100, "val": 100, "test": 423}
ROTATIONS = 4


def locate(root: Path) -> Optional[Path]:
    for base in (root, root / "omniglot-py"):
        if all((base / s).is_dir() for s in SETS):
            return base
    return None


def download(root: Path) -> Path:
    """Fetch and unpack the official archives (checksums verified by torchvision)."""
    from torchvision.datasets import Omniglot

    try:
        for background in (True, False):
            Omniglot(str(root), background=background, download=True)
    except Exception as error:  # offline, read-only root, bad checksum...
        raise SettingError(
            f"data.root={str(root)!r} is invalid: no Omniglot there (looked for {'/'.join(SETS)} "
            f"in it and in its omniglot-py/) and the download failed ({error}). Unzip the "
            f"official images_background.zip and images_evaluation.zip into that folder."
        ) from None
    return root / "omniglot-py"


def list_characters(base: Path) -> List[List[Path]]:
    """The image files of each character, characters in sorted (set, alphabet, character) order."""
    characters = []
    for folder in sorted(p for s in SETS for p in (base / s).glob("*/*") if p.is_dir()):
        files = sorted(folder.glob("*.png"))
        if len(files) != DRAWERS:
            raise SettingError(f"data.root: {folder} has {len(files)} images, Omniglot has "
                               f"{DRAWERS} per character; the dataset copy is incomplete")
        characters.append(files)
    return characters


def character_name(files: List[Path]) -> str:
    return f"{files[0].parent.parent.name}/{files[0].parent.name}"


def paper_split(characters: List[List[Path]]) -> Dict[str, torch.Tensor]:
    names = [character_name(f) for f in characters]
    require(len(names) == sum(SPLIT_SIZES.values()), "data.root", len(names),
            "the paper split needs all 1623 Omniglot characters")
    order = sorted(range(len(names)), key=lambda i: hashlib.sha256(names[i].encode()).digest())
    splits, start = {}, 0
    for split, size in SPLIT_SIZES.items():
        splits[split] = torch.tensor(sorted(order[start:start + size]))
        start += size
    return splits


def load_image(path: Path, size: int) -> np.ndarray:
    """Strokes as bright foreground on black, resized with LANCZOS as in MAML."""
    try:
        with Image.open(path) as image:
            return np.asarray(ImageOps.invert(image.convert("L")).resize((size, size), Image.LANCZOS))
    except OSError as error:
        raise SettingError(f"data.root: cannot read image {path} ({error})") from None


def cache_key(characters: List[List[Path]], size: int) -> str:
    digest = hashlib.sha256(f"v1/{size}".encode())
    for path in (p for files in characters for p in files):
        stat = path.stat()
        digest.update(f"{character_name([path])}/{path.name}/{stat.st_size}/{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def load_images(characters: List[List[Path]], size: int, cache_dir: Path) -> torch.Tensor:
    """uint8 tensor [characters, drawers, size, size], cached under cache_dir (never in ROOT)."""
    cache = cache_dir / f"omniglot-{size}px-{cache_key(characters, size)}.pt"
    if cache.exists():
        return torch.load(cache, weights_only=True)
    images = torch.from_numpy(np.stack([
        np.stack([load_image(p, size) for p in files]) for files in characters
    ]))
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = cache.with_suffix(f".tmp{os.getpid()}")
    torch.save(images, partial)
    partial.replace(cache)  # atomic: a killed run never leaves a truncated cache behind
    return images


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "imaml_lightning"


class OmniglotTasks:
    """Samples N-way K-shot tasks by tensor indexing into the in-memory image tensor."""

    def __init__(self, images: torch.Tensor, splits: Dict[str, torch.Tensor],
                 ways: int, shots: int, queries: int):
        # All four rotations precomputed: [characters, rotation, drawer, H, W].
        self.images = torch.stack([images.rot90(k, dims=(-2, -1)) for k in range(ROTATIONS)], 1)
        self.splits, self.ways, self.shots, self.queries = splits, ways, shots, queries

    def __call__(self, split: str, generator: torch.Generator) -> TaskTensors:
        characters = self.splits[split]
        classes = torch.randperm(len(characters) * ROTATIONS, generator=generator)[: self.ways]
        draws = torch.rand(self.ways, DRAWERS, generator=generator).argsort(1)
        draws = draws[:, : self.shots + self.queries]
        x = self.images[characters[classes // ROTATIONS, None], classes[:, None] % ROTATIONS, draws]
        x = x.unsqueeze(2).float().div_(255)  # [ways, shots + queries, 1, H, W]
        labels = torch.arange(self.ways)
        return (x[:, : self.shots].flatten(0, 1), labels.repeat_interleave(self.shots),
                x[:, self.shots:].flatten(0, 1), labels.repeat_interleave(self.queries))


class OmniglotDataModule(EpisodicDataModule):
    """N-way K-shot Omniglot with the paper split (see the module docstring).

    Args:
        root: dataset folder; downloaded into it when absent and `download` is true.
        ways / shots / queries: classes per task, support and query images per class.
        image_size: side of the resized images.
        cache_dir: where the preprocessed tensor is kept (default ~/.cache/imaml_lightning).
        Episode and loader settings: see EpisodicDataModule.
    """

    def __init__(
        self,
        root: str = "data/omniglot",
        ways: int = 5,
        shots: int = 1,
        queries: int = 5,
        image_size: int = 28,
        download: bool = True,
        cache_dir: Optional[str] = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        smallest = min(SPLIT_SIZES.values()) * ROTATIONS
        require(2 <= ways <= smallest, "data.ways", ways,
                f"must be between 2 and {smallest} (classes in the smallest split)")
        require(shots >= 1, "data.shots", shots, "must be >= 1")
        require(queries >= 1, "data.queries", queries, "must be >= 1")
        require(shots + queries <= DRAWERS, "data.shots + data.queries", shots + queries,
                f"must be <= {DRAWERS}, the images per Omniglot character")
        require(image_size >= 8, "data.image_size", image_size, "must be >= 8")
        self.root, self.ways, self.shots, self.queries = Path(root), ways, shots, queries
        self.image_size, self.download = image_size, download
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()

    @property
    def out_features(self) -> int:
        return self.ways

    def _base(self) -> Path:
        base = locate(self.root)
        if base is None and not self.download:
            raise SettingError(f"data.root={str(self.root)!r} is invalid: it holds no "
                               f"{' and '.join(SETS)} folders (and data.download is false)")
        return base or download(self.root)

    def prepare_data(self) -> None:  # once per node: download and fill the cache
        load_images(list_characters(self._base()), self.image_size, self.cache_dir)

    def make_sampler(self) -> OmniglotTasks:
        characters = list_characters(self._base())
        images = load_images(characters, self.image_size, self.cache_dir)
        return OmniglotTasks(images, paper_split(characters), self.ways, self.shots, self.queries)
