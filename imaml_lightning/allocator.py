"""Keep freed memory in the process instead of handing it back to the OS after every op.

glibc serves blocks above its mmap threshold (128 KiB, adapting up to 32 MiB) with fresh mmaps and
unmaps them on free, so each new tensor of that size pays page faults on first touch. The solver
allocates and frees megabyte-sized tensors at every inner step (a parameter dict per task under
vmap), so keeping freed memory makes the solver's passes faster (measured by
benchmarks.studies.allocator: docs/studies/allocator.md). Peak memory is unchanged; the resident size
just does not shrink between steps. Set IMAML_SYSTEM_MALLOC=1 to keep glibc's defaults.
"""
import ctypes
import ctypes.util
import os

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_ONE_GIB = 1 << 30


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process; True if it took effect."""
    if os.environ.get("IMAML_SYSTEM_MALLOC") == "1":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, _ONE_GIB) and libc.mallopt(_M_TRIM_THRESHOLD, _ONE_GIB))
    except (OSError, AttributeError, TypeError):  # not glibc (macOS, Windows, musl)
        return False
