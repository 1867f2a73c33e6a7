"""predict's data: a user's support set, read once, and query files streamed in batches, each
read and preprocessed as the checkpoint's training data was."""
import csv
from pathlib import Path
from typing import Callable, List, NamedTuple

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS

from imaml_lightning.data.folder import list_images
from imaml_lightning.errors import require

ReadImage = Callable[[Path, str], torch.Tensor]  # (file, setting named by errors) -> uint8 [C, H, W]


class SupportSet(NamedTuple):
    x: torch.Tensor  # float32 images [N, C, H, W] in [0, 1], or inputs [N, in_features]
    y: torch.Tensor  # class ids (in the order of `classes`) or targets [N, out_features]
    classes: List[str]  # class folder names (classification); empty for regression


def read_support_images(root: Path, read: ReadImage) -> SupportSet:
    """ROOT/<class name>/<images> (ImageFolder's layout and order): every image and its class."""
    files = list_images(root, setting="support")
    images = [read(path, "support") for paths in files.values() for path in paths]
    labels = [label for label, paths in enumerate(files.values()) for _ in paths]
    check_same_shape(images, [path for paths in files.values() for path in paths], "support")
    return SupportSet(torch.stack(images).float().div(255), torch.tensor(labels), list(files))


def check_same_shape(images: List[torch.Tensor], paths: List[Path], setting: str) -> None:
    for image, path in zip(images, paths):
        require(image.shape == images[0].shape, setting, str(path),
                f"its image is {list(image.shape)} after preprocessing, {paths[0]} is "
                f"{list(images[0].shape)}; the training data's image size is not fixed "
                f"(data.image_size null), so every image must share one size")


def list_query_files(paths: List[str]) -> List[Path]:
    """Files as given, folders searched recursively for images (sorted)."""
    files = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file()
                           and p.suffix.lower() in IMG_EXTENSIONS)
            require(bool(found), "query", name, f"the folder holds no images ({', '.join(IMG_EXTENSIONS)})")
            files += found
        else:
            require(path.is_file(), "query", name, "no such file or folder")
            files.append(path)
    return files


class QueryImages(Dataset):
    def __init__(self, files: List[Path], read: ReadImage):
        self.files, self.read = files, read

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.read(self.files[index], "query").float().div(255)


def read_numbers(path: Path, setting: str, columns: int) -> torch.Tensor:
    """A CSV of numbers ([rows, columns]); a first row that is not numbers is a header."""
    require(path.is_file(), setting, str(path), "no such file")
    with open(path, newline="") as file:
        rows = [row for row in csv.reader(file) if row]
    if rows and not all(is_number(v) for v in rows[0]):
        rows = rows[1:]
    bad = [i for i, row in enumerate(rows) if len(row) != columns or not all(map(is_number, row))]
    require(bool(rows) and not bad, setting, str(path),
            f"must hold rows of {columns} comma-separated numbers (after an optional header)"
            + (f"; row {bad[0] + 1} does not" if bad else ""))
    return torch.tensor([[float(v) for v in row] for row in rows], dtype=torch.float32)


def is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


class PredictionData(pl.LightningDataModule):
    """The support set (the module adapts to it once) and the queries, in batches."""

    def __init__(self, support: SupportSet, queries: Dataset, batch_size: int, num_workers: int = 0):
        super().__init__()
        self.support, self.queries = support, queries
        self.batch_size, self.num_workers = batch_size, num_workers

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(self.queries, batch_size=self.batch_size, num_workers=self.num_workers)
