"""Small copies of learn2learn's datasets in each one's exact on-disk format (as its class reads
it), every image one flat colour that names its split and class, so a sampled image can be
traced back. Class lists come from learn2learn's own SPLITS where it defines them; CIFAR-FS keeps
its split in the archive's text files, tiered-ImageNet and FC100 in their pickles."""
import io
import pickle
from itertools import count
from pathlib import Path
from typing import Dict, Tuple

import numpy as np
from PIL import Image

from imaml_lightning.data.learn2learn_datasets import learn2learn_datasets

SIZE = 16  # pixels of every fake image
PER_CLASS = 3
MODES = {"train": "train", "val": "validation", "test": "test"}
SHORT = {"train": "train", "val": "val", "test": "test"}
# Classes per split where the files, not learn2learn's code, define the split: as published.
FILE_SPLITS = {"tiered-imagenet": (351, 97, 160), "fc100": (60, 20, 20), "cifarfs": (64, 16, 20)}

Owners = Dict[Tuple[int, int, int], Tuple[str, str]]  # colour -> (split, class name)


class Painter:
    """Flat images of unique colours, remembering whose each colour is."""

    def __init__(self):
        self.owners: Owners = {}
        self.ids = count(1)

    def array(self, split: str, name: str) -> np.ndarray:
        i = next(self.ids)
        colour = (i & 255, (i >> 8) & 255, 100 + (i >> 16))
        self.owners[colour] = (split, name)
        return np.broadcast_to(np.array(colour, np.uint8), (SIZE, SIZE, 3)).copy()

    def png(self, split: str, name: str) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(self.array(split, name)).save(buffer, format="PNG")
        return buffer.getvalue()

    def save(self, path: Path, split: str, name: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.png(split, name))  # PNG inside a .jpg: PIL reads by content


def l2l_splits(module: str, valid: str = "validation") -> Dict[str, list]:
    splits = getattr(learn2learn_datasets(), module).SPLITS
    return {split: splits[valid if split == "val" else split] for split in MODES}


def tiered_imagenet(root: Path, painter: Painter) -> None:
    folder = root / "tiered-imagenet"
    folder.mkdir(parents=True, exist_ok=True)
    for split, classes in zip(MODES, FILE_SPLITS["tiered-imagenet"]):
        labels = np.repeat(np.arange(classes), PER_CLASS)
        images = [painter.png(split, f"{split}/{label}") for label in labels]
        (folder / f"{SHORT[split]}_images_png.pkl").write_bytes(pickle.dumps(images))
        (folder / f"{SHORT[split]}_labels.pkl").write_bytes(pickle.dumps(
            {"label_specific": labels, "label_general": labels // 10}))


def fc100(root: Path, painter: Painter) -> None:
    root.mkdir(parents=True, exist_ok=True)
    cifar_ids = iter(np.random.default_rng(0).permutation(100))  # FC100 keeps CIFAR-100's labels
    for split, classes in zip(MODES, FILE_SPLITS["fc100"]):
        ids = [next(cifar_ids) for _ in range(classes)]
        labels = list(np.tile(ids, PER_CLASS))  # not in class order
        data = np.stack([painter.array(split, f"{split}/{label}") for label in labels])
        (root / f"FC100_{SHORT[split]}.pickle").write_bytes(
            pickle.dumps({"data": data, "labels": labels}))


def cifarfs(root: Path, painter: Painter) -> None:
    base = root / "cifarfs" / "cifar100"
    (base / "splits" / "bertinetto").mkdir(parents=True, exist_ok=True)
    for split, classes in zip(MODES, FILE_SPLITS["cifarfs"]):
        names = [f"{split}_class_{c}" for c in range(classes)]
        (base / "splits" / "bertinetto" / f"{SHORT[split]}.txt").write_text("\n".join(names) + "\n")
        for name in names:
            for i in range(PER_CLASS):
                painter.save(base / "data" / name / f"{name}_{i}.png", split, name)


def class_folders(folder: Path, module: str, painter: Painter) -> None:
    """FOLDER/<class>/<images>, the classes of learn2learn's SPLITS in `module`."""
    for split, names in l2l_splits(module).items():
        for name in names:
            for i in range(PER_CLASS):
                painter.save(folder / name / f"image_{i}.jpg", split, name)


def cub(root: Path, painter: Painter) -> None:
    class_folders(root / "cubirds200/CUB_200_2011/images", "cu_birds200", painter)


def aircraft(root: Path, painter: Painter) -> None:
    data = root / "fgvc_aircraft/fgvc-aircraft-2013b/data"
    labels, ids = [], count(1000000)
    for split, names in l2l_splits("fgvc_aircraft", valid="valid").items():
        for name in names:
            for _ in range(PER_CLASS):
                image = str(next(ids))
                painter.save(data / "images" / f"{image}.jpg", split, name)
                labels.append((image, name))
    (data / "labels.pkl").write_bytes(pickle.dumps(labels))


def vgg_flowers(root: Path, painter: Painter) -> None:
    from scipy.io import savemat

    folder, labels = root / "vgg_flower102", []
    for split, names in l2l_splits("vgg_flowers").items():
        for name in names:
            for _ in range(PER_CLASS):
                labels.append(name)
                painter.save(folder / "jpg" / f"image_{len(labels):05d}.jpg", split, str(name))
    savemat(folder / "imagelabels.mat", {"labels": np.array([labels])})


def dtd(root: Path, painter: Painter) -> None:
    class_folders(root / "describable_textures/dtd/images", "describable_textures", painter)


WRITERS = {"tiered-imagenet": tiered_imagenet, "fc100": fc100, "cifarfs": cifarfs, "cub": cub,
           "aircraft": aircraft, "vgg-flowers": vgg_flowers, "dtd": dtd}


def write_fake(name: str, root: Path) -> Owners:
    painter = Painter()
    WRITERS[name](root, painter)
    return painter.owners
