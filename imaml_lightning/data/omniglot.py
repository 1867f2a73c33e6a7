"""Omniglot (Lake et al., 2015) N-way K-shot episodes.

Reads the official folder layout (ROOT/images_background, ROOT/images_evaluation, or the same
under ROOT/omniglot-py as torchvision stores it), downloads the official archives with
torchvision when absent (it verifies the archives' MD5 checksums), and caches the 28x28 images
as one uint8 tensor outside ROOT.

Splits, fixed by the names alone (no seed, library version or directory listing changes them):
- "paper" (the MAML line of work): all 1623 characters ordered by the SHA-256 of
  "<alphabet>/<character>", the first 1100 for meta-training, the next 100 for meta-validation
  and the last 423 for meta-testing.
- "alphabet": meta-test on the 659 characters of the 20 evaluation alphabets; of the 30
  background alphabets the last 5 in SHA-256 order of their names validate, the others train.
  No alphabet is shared between splits, which makes the test harder.
"""
import zipfile
from contextlib import suppress
from pathlib import Path
from typing import Dict, List, Literal, Optional, Tuple

import numpy as np
import torch
from PIL import Image, ImageOps

from imaml_lightning.data.cache import cached, fingerprint, source_tag
from imaml_lightning.data.images import (
    ImageClassificationDataModule, LabeledImages, RotationMode, ranked, read_image,
)
from imaml_lightning.errors import SettingError, require

SETS = ("images_background", "images_evaluation")
DRAWERS = 20  # images per character
PAPER_SPLIT_SIZES = {"train": 1100, "val": 100, "test": 423}
VAL_ALPHABETS = 5  # of the 30 background alphabets, for the alphabet split


def locate(root: Path) -> Optional[Path]:
    for base in (root, root / "omniglot-py"):
        if all((base / s).is_dir() for s in SETS):
            return base
    return None


def download(root: Path) -> Path:
    """Fetch and unpack the official archives (checksums verified by torchvision)."""
    from torchvision.datasets import Omniglot

    created = [folder for folder in (root, root / "omniglot-py") if not folder.exists()]
    try:
        for background in (True, False):
            Omniglot(str(root), background=background, download=True)
    except (OSError, RuntimeError, zipfile.BadZipFile) as error:  # offline or HTTP error, read-only
        # root (OSError), bad checksum (torchvision's RuntimeError), damaged archive
        for folder in reversed(created):  # torchvision made them; leave no empty ones behind
            with suppress(OSError):  # not empty: keep what is in it
                folder.rmdir()
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
    if len(names) != sum(PAPER_SPLIT_SIZES.values()):
        raise SettingError(f"data.split=paper is invalid for data.root: it holds {len(names)} "
                           f"characters, the paper split needs all 1623 of Omniglot")
    order = ranked(names)
    splits, start = {}, 0
    for split, size in PAPER_SPLIT_SIZES.items():
        splits[split] = torch.tensor(sorted(order[start:start + size]))
        start += size
    return splits


def alphabet_split(characters: List[List[Path]]) -> Dict[str, torch.Tensor]:
    """Meta-test on the 20 evaluation alphabets; of the 30 background alphabets, the
    VAL_ALPHABETS last in SHA-256 order of their names validate and the rest train."""
    in_set = {s: [i for i, f in enumerate(characters) if f[0].parents[2].name == s] for s in SETS}
    alphabets = sorted({characters[i][0].parent.parent.name for i in in_set[SETS[0]]})
    if len(alphabets) != 30 or not in_set[SETS[1]]:
        raise SettingError(f"data.split=alphabet is invalid for data.root: it holds "
                           f"{len(alphabets)} background alphabets and {len(in_set[SETS[1]])} "
                           f"evaluation characters; the split needs Omniglot's 30 and 659")
    val = {alphabets[i] for i in ranked(alphabets)[-VAL_ALPHABETS:]}
    is_val = [characters[i][0].parent.parent.name in val for i in in_set[SETS[0]]]
    return {"train": torch.tensor([i for i, v in zip(in_set[SETS[0]], is_val) if not v]),
            "val": torch.tensor([i for i, v in zip(in_set[SETS[0]], is_val) if v]),
            "test": torch.tensor(in_set[SETS[1]])}


SPLIT_MODES = {"paper": paper_split, "alphabet": alphabet_split}


def load_image(path: Path, size: int, setting: str = "data.root") -> np.ndarray:
    """Strokes as bright foreground on black, resized with LANCZOS as in MAML."""
    image = read_image(path, "L", setting)
    # a copy: torch.from_numpy warns on the read-only view np.asarray gives of a PIL image
    return np.array(ImageOps.invert(image).resize((size, size), Image.LANCZOS))


def load_images(base: Path, characters: List[List[Path]], size: int, cache_dir: Path) -> LabeledImages:
    """All images as uint8 [characters * 20, 1, size, size], cached under cache_dir."""
    files = [p for f in characters for p in f]
    key = fingerprint(files, base, f"omniglot/v2/{size}")

    def build():
        images = np.stack([load_image(p, size) for p in files])
        return {"images": torch.from_numpy(images).unsqueeze(1)}

    images = cached(cache_dir, f"omniglot-{source_tag(base)}-{size}px", key, build)["images"]
    members = list(torch.arange(len(files)).view(len(characters), DRAWERS))
    return LabeledImages(images, members, [character_name(f) for f in characters])


class OmniglotDataModule(ImageClassificationDataModule):
    """N-way K-shot Omniglot (see the module docstring for the splits).

    Args:
        root: dataset folder; downloaded into it when absent and `download` is true.
        ways / shots / queries: classes per task, support and query images per class.
        split: "paper" (1100/100/423 characters of all 50 alphabets) or "alphabet" (train and
            validation on the background alphabets, test on the 20 evaluation alphabets).
        rotations: "classes" (each rotation by 90 degrees * k is a class of its own: the MAML
            protocol), "augment" (each class of a task under one random rotation) or "none".
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
        split: Literal["paper", "alphabet"] = "paper",
        rotations: RotationMode = "classes",
        image_size: int = 28,
        download: bool = True,
        cache_dir: Optional[str] = None,
        **kwargs,
    ):
        super().__init__(ways, shots, queries, rotations, cache_dir, **kwargs)
        require(shots + queries <= DRAWERS, "data.shots + data.queries", shots + queries,
                f"must be <= {DRAWERS}, the images per Omniglot character")
        require(split in SPLIT_MODES, "data.split", split, f"must be one of {tuple(SPLIT_MODES)}")
        require(image_size >= 8, "data.image_size", image_size, "must be >= 8")
        self.root, self.split, self.image_size, self.download = Path(root), split, image_size, download

    def _base(self) -> Path:
        base = locate(self.root)
        if base is None and not self.download:
            raise SettingError(f"data.root={str(self.root)!r} is invalid: it holds no "
                               f"{' and '.join(SETS)} folders (and data.download is false)")
        return base or download(self.root)

    def read_image_file(self, path: Path, setting: str) -> torch.Tensor:
        return torch.from_numpy(load_image(path, self.image_size, setting)).unsqueeze(0)

    def load(self) -> Tuple[LabeledImages, Dict[str, torch.Tensor]]:
        base = self._base()
        characters = list_characters(base)
        images = load_images(base, characters, self.image_size, self.cache_dir)
        return images, SPLIT_MODES[self.split](characters)
