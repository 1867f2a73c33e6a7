"""Preprocessed datasets cached as tensor files, outside the dataset root (which may be
read-only), keyed by the source files and the settings so that a change of either rebuilds."""
import hashlib
import os
from pathlib import Path
from typing import Any, Callable, Dict, Iterable

import torch

from imaml_lightning.checkpoint_io import atomic_torch_save


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "imaml_lightning"


def fingerprint(files: Iterable[Path], root: Path, settings: str) -> str:
    """Hash of the settings and each file's path under root, size and modification time."""
    digest = hashlib.sha256(settings.encode())
    for path in files:
        stat = path.stat()
        digest.update(f"{path.relative_to(root)}/{stat.st_size}/{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def cached(path: Path, build: Callable[[], Dict[str, Any]]) -> Dict[str, Any]:
    """Load the tensors at path, or build and save them (atomically: a killed run never
    leaves a truncated cache). Memory-mapped: processes on a node share the pages."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_torch_save(build(), path)
    return torch.load(path, weights_only=True, mmap=True)
