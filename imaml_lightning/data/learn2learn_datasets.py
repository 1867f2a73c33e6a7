"""learn2learn's few-shot vision benchmarks as episodic data modules.

Taken from learn2learn 0.2.0, per dataset: its class (the files on disk, their layout and format,
the download where it has one) and its published class splits: tiered-ImageNet (Ren et al. 2018),
CIFAR-FS (Bertinetto et al. 2019), FC100 (Oreshkin et al. 2018), and CUB-200, FGVC-Aircraft,
VGG Flowers and Describable Textures in the splits of Meta-Dataset (Triantafillou et al. 2020).

Ours: each image is decoded once, resized to `image_size` and appended to a uint8 cache outside
the root (`cached_memmap`: memory-mapped, so a cache larger than memory, like tiered-ImageNet's
16.5 GB at 84 px, is read as page cache: docs/studies/memmap_rss.md), and tasks are drawn by
`ClassificationTasks`, the sampler of every image dataset here: deterministic, rank-sharded,
resumable episodes, faster than learn2learn's TaskDataset (images.py;
docs/benchmarks.md#data_pipeline). A learn2learn user keeps the datasets they have on disk and
their splits.
"""
import io
import pickle
from collections import Counter
from contextlib import redirect_stderr
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Literal, NamedTuple, Optional, Sequence, Tuple, get_args
from unittest import mock

import torch
from filelock import FileLock
from PIL import Image
from torchvision.transforms.v2.functional import pil_to_tensor

from imaml_lightning.data.cache import cached_memmap, fingerprint, source_tag
from imaml_lightning.data.images import (
    ImageClassificationDataModule, LabeledImages, RotationMode, read_image, resize_square,
)
from imaml_lightning.errors import SettingError, require

Learn2LearnName = Literal["tiered-imagenet", "cifarfs", "fc100", "cub", "aircraft",
                          "vgg-flowers", "dtd"]
LEARN2LEARN_NAMES = get_args(Learn2LearnName)
MODES = {"train": "train", "val": "validation", "test": "test"}  # ours -> learn2learn's


class SplitItems(NamedTuple):
    """One split as learn2learn's class holds it: images (paths, PNG bytes or HWC arrays), the
    class label of each, the class names by label, and how to open one image."""

    images: Sequence
    labels: Sequence[int]
    names: Optional[Sequence[str]]
    open_image: Callable[[object], Image.Image]


def learn2learn_datasets():
    """learn2learn.vision.datasets, imported without gym's deprecation notice on stderr (learn2learn
    imports gym; nothing here uses it)."""
    with redirect_stderr(io.StringIO()):
        import learn2learn.vision.datasets as datasets
    return datasets


def unzip(pairs) -> Tuple[list, list]:
    """[(image, label), ...] -> ([images], [labels]), empty lists for no pairs."""
    return [image for image, _ in pairs], [label for _, label in pairs]


def open_png(data) -> Image.Image:
    return Image.open(io.BytesIO(data))


def open_path(path) -> Image.Image:
    return read_image(Path(path), "RGB")


def tiered_imagenet(root: Path, mode: str, download: bool) -> SplitItems:
    dataset = learn2learn_datasets().TieredImagenet(str(root), mode=mode, download=download)
    return SplitItems(dataset.images, dataset.labels, None, open_png)


def fc100(root: Path, mode: str, download: bool) -> SplitItems:
    dataset = learn2learn_datasets().FC100(str(root), mode=mode, download=download)
    return SplitItems(dataset.images, dataset.labels, None, Image.fromarray)


def cifarfs(root: Path, mode: str, download: bool) -> SplitItems:
    dataset = learn2learn_datasets().CIFARFS(str(root), mode=mode, download=download)  # ImageFolder
    # learn2learn copies each split's class folders into cifarfs/processed once, and trusts
    # whatever is there later: a run killed while copying would leave a split short of classes.
    short = "val" if mode == "validation" else mode
    listed = (root / "cifarfs/cifar100/splits/bertinetto" / f"{short}.txt").read_text().split()
    if sorted(dataset.classes) != sorted(listed):
        raise ValueError(f"{root / 'cifarfs/processed' / short} holds {len(dataset.classes)} of "
                         f"the {len(listed)} classes of splits/bertinetto/{short}.txt; delete "
                         f"{root / 'cifarfs/processed'} to have learn2learn copy them again")
    return SplitItems(*unzip(dataset.samples), dataset.classes, open_path)


def listed_files(class_name: str, module: str, split_key: Callable[[str], str] = str):
    """A reader for the datasets whose class lists (path, label) pairs in `.data`, labels
    indexing the module's SPLITS[mode]."""

    def read(root: Path, mode: str, download: bool) -> SplitItems:
        datasets = learn2learn_datasets()
        dataset = getattr(datasets, class_name)(str(root), mode=mode, download=download)
        names = getattr(datasets, module).SPLITS[split_key(mode)]
        return SplitItems(*unzip(dataset.data), [str(n) for n in names], open_path)

    return read


def describable_textures(root: Path, mode: str, download: bool) -> SplitItems:
    """learn2learn's class decodes every image when built (about 5 GB at DTD's sizes): its own
    listing runs with the loader swapped for Path, so it lists paths, read one at a time."""
    datasets = learn2learn_datasets()
    # A module global, patched for the duration of the listing (not thread-safe; nothing else
    # here lists DTD concurrently in one process).
    with mock.patch.object(datasets.describable_textures, "default_loader", Path):
        dataset = datasets.DescribableTextures(str(root), mode=mode, download=download)
    return SplitItems(*unzip(dataset.data), datasets.describable_textures.SPLITS[mode], open_path)


@dataclass(frozen=True)
class Source:
    read: Callable[[Path, str, bool], SplitItems]
    files: str  # glob under the root of the files that make the dataset (the cache's key)
    image_size: int  # the usual size in the literature
    split_file: Optional[str] = None  # the file of one split ({split}: learn2learn's short name)

    def split_files(self, mode: str) -> str:
        """The files one split is read from, for messages."""
        short = "val" if mode == "validation" else mode
        return self.split_file.format(split=short) if self.split_file else f"{self.files} ({mode})"


SOURCES: Dict[str, Source] = {
    "tiered-imagenet": Source(tiered_imagenet, "tiered-imagenet/*.pkl", 84,
                              "tiered-imagenet/{split}_images_png.pkl and {split}_labels.pkl"),
    "cifarfs": Source(cifarfs, "cifarfs/cifar100/**/*", 32),
    "fc100": Source(fc100, "FC100_*.pickle", 32, "FC100_{split}.pickle"),
    "cub": Source(listed_files("CUBirds200", "cu_birds200"), "cubirds200/CUB_200_2011/images/*/*", 84),
    "aircraft": Source(listed_files("FGVCAircraft", "fgvc_aircraft",
                                    lambda mode: "valid" if mode == "validation" else mode),
                       "fgvc_aircraft/fgvc-aircraft-2013b/data/**/*", 84),
    "vgg-flowers": Source(listed_files("VGGFlower102", "vgg_flowers"), "vgg_flower102/**/*", 84),
    "dtd": Source(describable_textures, "describable_textures/dtd/images/*/*", 84),
}
assert set(SOURCES) == set(LEARN2LEARN_NAMES)


def learn2learn_version() -> str:
    from importlib.metadata import version

    return version("learn2learn")


def dataset_files(root: Path, name: str) -> List[Path]:
    return sorted(p for p in root.glob(SOURCES[name].files) if p.is_file())


class Learn2LearnDataModule(ImageClassificationDataModule):
    """N-way K-shot episodes from one of learn2learn's few-shot vision datasets, in its
    published class splits (see the module docstring).

    Args:
        name: tiered-imagenet, cifarfs, fc100, cub, aircraft, vgg-flowers or dtd.
        root: the folder learn2learn keeps the dataset in (its `root` argument).
        image_size: images are resized to image_size x image_size RGB; default 84, 32 for
            CIFAR-FS and FC100.
        download: fetch the dataset through learn2learn when its files are absent.
        ways / shots / queries, rotations, cache_dir and the episode and loader settings: as for
            MiniImageNetDataModule.
    """

    def __init__(
        self,
        name: Learn2LearnName = "cifarfs",
        root: str = "data",
        image_size: Optional[int] = None,
        ways: int = 5,
        shots: int = 1,
        queries: int = 15,
        rotations: RotationMode = "none",
        download: bool = True,
        cache_dir: Optional[str] = None,
        **kwargs,
    ):
        require(name in SOURCES, "data.name", name, f"must be one of {sorted(SOURCES)}")
        require(image_size is None or image_size >= 8, "data.image_size", image_size,
                "must be >= 8 (or null: the dataset's usual size)")
        super().__init__(ways, shots, queries, rotations, cache_dir, **kwargs)
        self.name, self.root, self.download = name, Path(root).expanduser(), download
        self.image_size = image_size or SOURCES[name].image_size

    @property
    def dataset_name(self) -> str:
        return self.name

    def read_image_file(self, path: Path, setting: str) -> torch.Tensor:
        return self.to_tensor(read_image(path, "RGB", setting))

    def to_tensor(self, image: Image.Image) -> torch.Tensor:
        rgb = image if image.mode == "RGB" else image.convert("RGB")  # convert copies even then
        return resize_square(pil_to_tensor(rgb), self.image_size)

    def load(self) -> Tuple[LabeledImages, Dict[str, torch.Tensor]]:
        files = self.downloaded_files()
        version = learn2learn_version()  # the split lists of CUB, Aircraft, Flowers, DTD are its code
        key = fingerprint(files, self.root, f"{self.name}/{self.image_size}/{version}/v1")
        images, stored = cached_memmap(self.cache_dir, f"{self.name}-{self.image_size}-"
                                       f"{source_tag(self.root)}", key, self.build_cache)
        members = list(stored["members"].split(stored["class_sizes"].tolist()))
        class_ids = torch.arange(len(members)).split(stored["classes_per_split"].tolist())
        return LabeledImages(images, members, stored["names"]), dict(zip(MODES, class_ids))

    def downloaded_files(self) -> List[Path]:
        """The dataset's files, downloaded first where absent (learn2learn's class downloads
        the whole dataset when built for any split); runs sharing the root download once."""
        files = dataset_files(self.root, self.name)
        if files:
            return files
        if not self.download:
            raise SettingError(
                f"data.root={str(self.root)!r} is invalid: no {self.name} there (looked for "
                f"{SOURCES[self.name].files}) and data.download is false")
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        with FileLock(self.cache_dir / f".{self.name}-{source_tag(self.root)}.download.lock"):
            if not dataset_files(self.root, self.name):
                self.read_split("train")
        return dataset_files(self.root, self.name)

    def read_split(self, mode: str) -> SplitItems:
        """One split through learn2learn's class; its failures become one line naming the
        dataset, the split and the error (which names the file where learn2learn's does)."""
        try:
            return SOURCES[self.name].read(self.root, mode, self.download)
        except ImportError as error:  # a reader's dependency (scipy for VGG Flowers), not the root
            raise SettingError(
                f"data.name={self.name!r} is invalid here: learn2learn needs the Python module "
                f"{error.name!r} to read it, and it is not installed (pip install {error.name})"
            ) from None
        # A file of another format fails inside learn2learn's unpickling and indexing as any of
        # these (TypeError and AttributeError included: an unpickled object of the wrong shape).
        except (OSError, EOFError, ValueError, KeyError, IndexError, TypeError, AttributeError,
                RuntimeError, pickle.UnpicklingError) as error:
            first_line = str(error).strip().split("\n")[0]
            raise SettingError(
                f"data.root={str(self.root)!r} is invalid: learn2learn could not read "
                f"{SOURCES[self.name].split_files(mode)} ({type(error).__name__}: {first_line})"
            ) from None

    def build_cache(self, append) -> dict:
        """Every split's images in class order, appended to the cache one at a time (a split's
        files are read, then let go before the next one's: GBs for tiered-ImageNet)."""
        class_sizes, names, classes_per_split = [], [], []
        for split, mode in MODES.items():
            sizes, split_names = self.append_split(mode, append)
            class_sizes += list(sizes.values())
            names += [split_names[label] if split_names else f"{split}/{label}" for label in sizes]
            classes_per_split.append(len(sizes))
        count = sum(class_sizes)
        return {"members": torch.arange(count), "class_sizes": torch.tensor(class_sizes),
                "classes_per_split": torch.tensor(classes_per_split), "names": names,
                "shape": [count, 3, self.image_size, self.image_size]}

    def append_split(self, mode: str, append) -> Tuple[Counter, Optional[Sequence[str]]]:
        """Appends one split's images by class, within a class in path order (learn2learn lists
        some with os.listdir, whose order differs between file systems, and a seed's episodes
        must not); returns ({label: images} in that order, the class names by label)."""
        items = self.read_split(mode)
        if not len(items.labels):
            raise SettingError(f"data.root={str(self.root)!r} is invalid: no images in "
                               f"{SOURCES[self.name].split_files(mode)}")
        labels = [int(label) for label in items.labels]
        by_path = items.open_image is open_path
        order = sorted(range(len(labels)),
                       key=lambda i: (labels[i], str(items.images[i]) if by_path else i))
        for index in order:
            append(self.decode(items, mode, index))
        return Counter(labels[i] for i in order), items.names

    def decode(self, items: SplitItems, mode: str, index: int) -> torch.Tensor:
        try:
            return self.to_tensor(items.open_image(items.images[index]))
        except SettingError:  # a file read_image could not read: named there
            raise
        except (OSError, ValueError, TypeError, AttributeError) as error:  # bytes or array not an image
            raise SettingError(
                f"data.root={str(self.root)!r} is invalid: image {index} of "
                f"{SOURCES[self.name].split_files(mode)} is not an image ({type(error).__name__}: "
                f"{error})") from None
