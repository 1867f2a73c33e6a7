"""Preprocessed datasets cached as tensor files, outside the dataset root (which may be
read-only), keyed by the source files and the settings so that a change of either rebuilds."""
import glob
import hashlib
import os
import pickle
from pathlib import Path
from typing import Any, Callable, Dict, Iterable

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
        for stale in cache_dir.glob(f"{glob.escape(prefix)}-*.pt"):
            if stale != path:
                stale.unlink(missing_ok=True)
    return torch.load(path, weights_only=True, mmap=True)
