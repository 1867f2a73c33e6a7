"""Mini-ImageNet (Vinyals et al., 2016) N-way K-shot episodes, in the class split of Ravi &
Larochelle (2017): 64 train, 16 validation and 20 test classes of 600 84x84 colour images each.

Reads the pickles learn2learn 0.2.0 downloads, ROOT/mini-imagenet-cache-{train,validation,test}.pkl,
each {"image_data": uint8 [N, 84, 84, 3], "class_dict": {class name: [indices into image_data]}},
downloads them from the same Zenodo record when absent, and caches the images of all three as one
uint8 NCHW tensor outside ROOT. learn2learn's MiniImagenet class is not used to load them: it turns
the images into float32, 4x the memory (3.3 GB for the train split alone).
"""
import hashlib
import os
import pickle
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from filelock import FileLock
from torchvision.transforms.v2.functional import pil_to_tensor

from imaml_lightning.data.cache import cached, fingerprint, source_tag
from imaml_lightning.data.images import (
    ImageClassificationDataModule, LabeledImages, RotationMode, read_image, resize_square,
)
from imaml_lightning.errors import SettingError

FILE_SPLITS = {"train": "train", "val": "validation", "test": "test"}  # ours -> the file name's
FILE_PATTERN = "mini-imagenet-cache-{train,validation,test}.pkl"
URL = "https://zenodo.org/record/7978538/files/{name}"  # learn2learn 0.2.0's mirror
RECORD = "https://zenodo.org/api/records/7978538"  # its metadata lists each file's MD5
IMAGE_SHAPE = (84, 84, 3)


def pickle_paths(root: Path) -> List[Path]:
    return [root / f"mini-imagenet-cache-{mode}.pkl" for mode in FILE_SPLITS.values()]


def published_md5() -> Dict[str, str]:
    """{file name: MD5} as the Zenodo record publishes them (learn2learn ships none)."""
    import requests

    response = requests.get(RECORD, timeout=60)
    response.raise_for_status()
    return {f["key"]: f["checksum"].removeprefix("md5:") for f in response.json()["files"]}


def md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def download(root: Path) -> None:
    """Fetch the pickles missing from root, each into a temporary file that is renamed only
    once its MD5 matches the published one: a killed or damaged download never takes the
    real name. Runs sharing the root (nodes, a sweep) download one at a time."""
    from learn2learn.data import utils  # a slow import, needed only here

    try:
        root.mkdir(parents=True, exist_ok=True)
        with FileLock(root / ".mini-imagenet.lock"):
            missing = [path for path in pickle_paths(root) if not path.is_file()]
            expected = published_md5() if missing else {}
            for path in missing:
                handle, partial = tempfile.mkstemp(dir=root, prefix=f".{path.name}.",
                                                   suffix=".partial")
                os.close(handle)
                try:
                    utils.download_file(URL.format(name=path.name), partial)  # no HTTP status check
                    got, want = md5(Path(partial)), expected.get(path.name, "not in the record")
                    if got != want:
                        raise OSError(f"{path.name}: its MD5 {got} is not the published {want}")
                    os.replace(partial, path)
                finally:
                    Path(partial).unlink(missing_ok=True)
    except (OSError, ValueError, KeyError) as error:  # offline, server error, read-only root or
        # checksum mismatch (OSError: requests' errors are OSErrors), the record's metadata unreadable
        raise SettingError(
            f"data.root={str(root)!r} is invalid: no Mini-ImageNet there (looked for "
            f"{FILE_PATTERN}) and the download failed ({error}). Download the three files from "
            f"{URL.format(name='')} into that folder."
        ) from None


def corrupt(path: Path, why) -> SettingError:
    return SettingError(f"data.root: {path} is corrupt ({why}); delete it and run again to "
                        f"download it afresh")


def read_pickle(path: Path) -> Tuple[np.ndarray, Dict[str, torch.Tensor]]:
    """The images [N, 84, 84, 3] and the image indices of each class of one file, checked."""
    try:
        with open(path, "rb") as file:
            data = pickle.load(file)  # the format; it runs code, so read only files you trust
    except OSError as error:  # permissions, I/O: the file may be fine
        raise SettingError(f"data.root: cannot read {path} ({error})") from None
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, KeyError,
            TypeError, ValueError) as error:  # truncated, not a pickle, unknown classes inside
        raise corrupt(path, f"{type(error).__name__}: {error}") from None
    if not isinstance(data, dict) or not {"image_data", "class_dict"} <= data.keys():
        raise corrupt(path, "not a dict with the keys 'image_data' and 'class_dict'")
    images, classes = data["image_data"], data["class_dict"]
    if not (isinstance(images, np.ndarray) and images.dtype == np.uint8
            and images.ndim == 4 and images.shape[1:] == IMAGE_SHAPE):
        raise corrupt(path, f"image_data is {getattr(images, 'dtype', type(images).__name__)} "
                            f"{list(getattr(images, 'shape', []))}, not uint8 [N, 84, 84, 3]")
    try:
        members = {name: torch.as_tensor(np.asarray(ids, dtype=np.int64))
                   for name, ids in classes.items()}
    except (AttributeError, TypeError, ValueError) as error:
        raise corrupt(path, f"class_dict: {error}") from None
    if not members or any(m.ndim != 1 or not len(m) or m.min() < 0 or m.max() >= len(images)
                          for m in members.values()):
        raise corrupt(path, "class_dict does not map each class to indices into image_data")
    return images, members


def load_images(root: Path, cache_dir: Path) -> Tuple[LabeledImages, Dict[str, torch.Tensor]]:
    """All three files as one LabeledImages ([60000, 3, 84, 84] uint8, cached under cache_dir)
    and the class ids of each split."""
    paths = pickle_paths(root)

    def build():
        images, members, names, classes_per_file, start = [], [], [], [], 0
        for path in paths:
            part, part_members = read_pickle(path)
            images.append(torch.from_numpy(part).permute(0, 3, 1, 2))  # a view: copied once by cat
            members += [m + start for m in part_members.values()]
            names += list(part_members)
            classes_per_file.append(len(part_members))
            start += len(part)
        return {"images": torch.cat(images), "members": torch.cat(members),
                "class_sizes": torch.tensor([len(m) for m in members]),
                "classes_per_file": torch.tensor(classes_per_file), "names": names}

    key = fingerprint(paths, root, "miniimagenet/v1")
    stored = cached(cache_dir, f"miniimagenet-{source_tag(root)}", key, build)
    members = list(stored["members"].split(stored["class_sizes"].tolist()))
    class_ids = torch.arange(len(members)).split(stored["classes_per_file"].tolist())
    splits = dict(zip(FILE_SPLITS, class_ids))
    return LabeledImages(stored["images"], members, stored["names"]), splits


class MiniImageNetDataModule(ImageClassificationDataModule):
    """N-way K-shot Mini-ImageNet, 84x84 RGB (see the module docstring for the files and splits).

    Args:
        root: folder of the three learn2learn pickles; downloaded into it (about 1.3 GB) when
            absent and `download` is true.
        ways / shots / queries: classes per task, support and query images per class.
        rotations: "none" (the usual protocol), "augment" (each class of a task under one random
            rotation by 90 degrees * k) or "classes" (each rotation is a class of its own).
        cache_dir: where the images are kept as one tensor (default ~/.cache/imaml_lightning).
        Episode and loader settings: see EpisodicDataModule.
    """

    def __init__(
        self,
        root: str = "data/miniimagenet",
        ways: int = 5,
        shots: int = 1,
        queries: int = 15,
        rotations: RotationMode = "none",
        download: bool = True,
        cache_dir: Optional[str] = None,
        **kwargs,
    ):
        super().__init__(ways, shots, queries, rotations, cache_dir, **kwargs)
        self.root, self.download = Path(root), download

    def read_image_file(self, path: Path, setting: str) -> torch.Tensor:
        return resize_square(pil_to_tensor(read_image(path, "RGB", setting)), IMAGE_SHAPE[0])

    def load(self) -> Tuple[LabeledImages, Dict[str, torch.Tensor]]:
        missing = [p for p in pickle_paths(self.root) if not p.is_file()]
        if missing and not self.download:
            raise SettingError(f"data.root={str(self.root)!r} is invalid: no Mini-ImageNet there "
                               f"(looked for {FILE_PATTERN}, missing {[p.name for p in missing]}) "
                               f"and data.download is false")
        if missing:
            download(self.root)
        return load_images(self.root, self.cache_dir)
