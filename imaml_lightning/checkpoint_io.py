"""Checkpoint writes that a crash cannot tear.

Lightning's default writer goes through an fsspec transaction whose temporary file lives in the
system temp folder; where that is another file system (a tmpfs /tmp, a scratch disk) the final
move is a copy, and a process killed during it leaves a truncated checkpoint in place of the
previous one. Here the bytes go to a temporary file next to the target, are fsynced, and replace
it with one rename, so a reader sees either the old checkpoint or the new one.
"""
import os
import tempfile
from pathlib import Path
from typing import Union

import torch
from lightning_fabric.utilities.cloud_io import get_filesystem
from pytorch_lightning.plugins.io import TorchCheckpointIO

from imaml_lightning.errors import SettingError, display_path


def atomic_torch_save(obj, path: Union[str, os.PathLike]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.partial"):  # left by a killed writer
        stale.unlink(missing_ok=True)
    handle, partial = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(obj, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(partial, path)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint, path: Union[str, os.PathLike], storage_options=None) -> None:
        if not isinstance(get_filesystem(path), type(get_filesystem("."))):  # remote: fsspec's way
            return super().save_checkpoint(checkpoint, path, storage_options)
        try:
            atomic_torch_save(checkpoint, path)
        except OSError as error:  # disk full, no permission, read-only file system, ...
            folder = display_path(Path(path).parent)
            raise SettingError(f"checkpoint.dirpath={folder!r} is invalid: cannot write "
                               f"{Path(path).name} there ({error.strerror or error}); the "
                               f"checkpoints already there are intact") from None
