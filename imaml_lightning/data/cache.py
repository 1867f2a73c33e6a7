"""Preprocessed datasets cached as tensor files, outside the dataset root (which may be
read-only), keyed by the source files and the settings so that a change of either rebuilds."""
import glob
import hashlib
import os
import pickle
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Tuple

import numpy as np
import torch
from filelock import FileLock

from imaml_lightning.checkpoint_io import atomic_torch_save


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "imaml_lightning"


def source_tag(root: Path) -> str:
    """Short hash of where the data lives: caches of two copies of a dataset never collide."""
    return hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:8]


def fingerprint(files: Iterable[Path], root: Path, settings: str) -> str:
    """Hash of the settings and each file's path under root, size and modification time."""
    digest = hashlib.sha256(settings.encode())
    for path in files:
        stat = path.stat()
        digest.update(f"{path.relative_to(root)}/{stat.st_size}/{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def cached(cache_dir: Path, prefix: str, key: str,
           build: Callable[[], Dict[str, Any]]) -> Dict[str, Any]:
    """The tensors of cache_dir/PREFIX-KEY.pt, built and saved first if absent or unreadable.

    The prefix names the dataset, its location (`source_tag`) and the settings, the key the
    state of its files. Runs that share the cache (the processes and nodes of a job, a sweep)
    build it once under a file lock; the file is written atomically, so a killed run never
    leaves a truncated cache, and the older caches of the same prefix (files since changed) are
    removed. Memory-mapped: the processes of a node share its pages.
    """
    path = cache_dir / f"{prefix}-{key}.pt"
    cache_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(cache_dir / f".{prefix}.lock"):
        try:
            return torch.load(path, weights_only=True, mmap=True)
        except (OSError, RuntimeError, EOFError, pickle.UnpicklingError):
            pass  # absent (OSError), or damaged outside our writes: truncated, not a zip or pickle
        atomic_torch_save(build(), path)
        remove_stale(cache_dir, f"{glob.escape(prefix)}-*.pt", keep=(path,))
    return torch.load(path, weights_only=True, mmap=True)


def remove_stale(cache_dir: Path, pattern: str, keep: tuple) -> None:
    """The caches of a prefix other than `keep`: built from files that have changed since."""
    for stale in cache_dir.glob(pattern):
        if stale not in keep:
            stale.unlink(missing_ok=True)


def cached_memmap(cache_dir: Path, prefix: str, key: str,
                  build: Callable[[Callable], Dict[str, Any]]) -> Tuple[torch.Tensor, Dict[str, Any]]:
    """`cached` for datasets larger than memory (tiered-ImageNet at 84 px: 16.5 GB of uint8).

    `build(append)` appends the images one at a time (`append(uint8 tensor)`) to a raw file, so
    building never holds them in RAM, and returns the small rest (class members, names) with
    "shape", the images' [N, C, H, W]; that goes to a .pt beside the images, written last: it
    marks them complete. Returns (the images, memory-mapped read-only, the rest): a process's
    resident memory holds only the pages its episodes touch, and a node's processes share them.
    A read-only shared mapping is not charged against the kernel's overcommit limit (a private
    copy-on-write one is, in full); nothing writes to it (sampling indexes, which copies).
    DataLoader workers share it by fork (Linux's default); spawned workers would copy it."""
    images_path, meta_path = cache_dir / f"{prefix}-{key}.u8", cache_dir / f"{prefix}-{key}.pt"
    cache_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(cache_dir / f".{prefix}.lock"):
        loaded = read_memmap(images_path, meta_path)
        if loaded is not None:
            return loaded
        for killed in cache_dir.glob(f".{glob.escape(prefix)}-*.partial"):  # a killed build's
            killed.unlink(missing_ok=True)  # (no live writer: they hold the lock)
        partial = images_path.with_name(f".{images_path.name}.{os.getpid()}.partial")
        written = []

        def append(image: torch.Tensor) -> None:
            if image.dtype != torch.uint8:
                raise TypeError(f"cached_memmap takes uint8 images, got {image.dtype}")
            written.append(file.write(image.contiguous().numpy().tobytes()))

        try:
            with open(partial, "wb") as file:
                meta = build(append)
                file.flush()
                os.fsync(file.fileno())
            if sum(written) != int(np.prod(meta["shape"])):
                raise RuntimeError(f"cached_memmap: {sum(written)} bytes appended for images of "
                                   f"shape {meta['shape']}")
            os.replace(partial, images_path)
        finally:
            partial.unlink(missing_ok=True)
        atomic_torch_save(meta, meta_path)
        remove_stale(cache_dir, f"{glob.escape(prefix)}-*", keep=(images_path, meta_path))
        return read_memmap(images_path, meta_path)


def read_memmap(images_path: Path, meta_path: Path):
    """(images, rest) of a complete `cached_memmap` cache, or None."""
    try:
        meta = torch.load(meta_path, weights_only=True)
        shape = tuple(meta["shape"])
        if images_path.stat().st_size != int(np.prod(shape)):
            return None  # damaged outside our writes
    except (OSError, RuntimeError, EOFError, KeyError, TypeError, pickle.UnpicklingError):
        return None
    images = np.memmap(images_path, dtype=np.uint8, mode="r", shape=shape)
    with warnings.catch_warnings():  # "not writable": by design, see cached_memmap
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(images), meta
