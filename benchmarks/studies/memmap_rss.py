"""Peak resident memory of building and sampling a dataset cache larger than memory.

Does a dataset larger than memory train on a 24 GB machine? Peak resident memory (RSS) of
building and of sampling from a `cached_memmap` cache of tiered-ImageNet's shape at 84 px:
779,165 images x 3 x 84 x 84 uint8 = 16.5 GB, written to --cache-dir (deleted afterwards).

The images are generated (a pool of distinct random images, appended in turn: the bytes written
and mapped are the real size); building goes through `cached_memmap` as Learn2LearnDataModule's
does, sampling through the same `ClassificationTasks`, in a fresh process each, so each peak is
its own. RSS counts the file pages a process has mapped (the kernel maps whole folios of page
cache around each touched image, so they grow faster than the bytes sampled); they stay page
cache, which the kernel drops under memory pressure, unlike anonymous memory: the column that
must stay small is the anonymous one. (Not
measured: learn2learn's own reading of tiered-ImageNet's pickles, which holds one split's PNG
bytes in memory while its images are converted.) The results: docs/studies/memmap_rss.md.

Usage: python -m benchmarks.studies.memmap_rss [--under /tmp] [--images 779165]
(the cache goes to a new folder under --under, on a disk, not a tmpfs; removed at the end)
"""
import argparse
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import machine, markdown_table

SIDE, POOL = 84, 1000
SPLITS = (351, 97, 160)  # tiered-ImageNet's classes per split


def memory_gb() -> str:
    """Peak RSS, and the RSS now split into anonymous memory and mapped file pages."""
    status = open("/proc/self/status").read()
    now = {key: int(re.search(rf"{key}:\s+(\d+)", status).group(1)) / 2**20
           for key in ("RssAnon", "RssFile")}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux
    return f"{peak:.3f} {now['RssAnon']:.3f} {now['RssFile']:.3f}"


def class_sizes(images: int) -> list:
    classes = sum(SPLITS)
    return [images // classes + (c < images % classes) for c in range(classes)]


def build(cache_dir: Path, images: int) -> None:
    from imaml_lightning.data.cache import cached_memmap

    pool = torch.randint(0, 256, (POOL, 3, SIDE, SIDE), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(0))
    sizes = class_sizes(images)

    def fill(append) -> dict:
        for i in range(images):
            append(pool[i % POOL])
        return {"class_sizes": torch.tensor(sizes), "shape": [images, 3, SIDE, SIDE]}

    start = time.perf_counter()
    cached_memmap(cache_dir, "tiered-shaped", "generated", fill)
    print(f"{time.perf_counter() - start:.1f} {memory_gb()}")


def sample(cache_dir: Path, episodes: int) -> None:
    from imaml_lightning.data.cache import read_memmap
    from imaml_lightning.data.episodes import task_generator
    from imaml_lightning.data.images import ClassificationTasks, LabeledImages

    images, meta = read_memmap(*(cache_dir / f"tiered-shaped-generated.{s}" for s in ("u8", "pt")))
    members = list(torch.arange(len(images)).split(meta["class_sizes"].tolist()))
    splits = dict(zip(("train", "val", "test"), torch.arange(len(members)).split(list(SPLITS))))
    tasks = ClassificationTasks(LabeledImages(images, members, [""] * len(members)), splits,
                                ways=5, shots=1, queries=15)
    start = time.perf_counter()
    for i in range(episodes):
        tasks("train", task_generator(0, "train", i))
    print(f"{time.perf_counter() - start:.1f} {memory_gb()}")


def in_fresh_process(*args) -> list:
    out = subprocess.run([sys.executable, "-m", "benchmarks.studies.memmap_rss", *args], check=True,
                         capture_output=True, text=True).stdout.split()
    return [float(v) for v in out[-4:]]


def main(args) -> None:
    mounts = {line.split()[1]: line.split()[2] for line in open("/proc/mounts")}
    under = Path(args.under).resolve()
    mount = max((m for m in mounts if under.is_relative_to(m)), key=len)
    if mounts[mount] == "tmpfs":
        raise SystemExit(f"--under {under} is on a tmpfs (memory): choose a folder on a disk")
    cache_dir = Path(tempfile.mkdtemp(prefix="memmap_rss-", dir=under))
    gigabytes = args.images * 3 * SIDE * SIDE / 1e9
    try:
        rows = [["build (append every image)", *in_fresh_process(
            "--run", "build", "--cache-dir", str(cache_dir), "--images", str(args.images))]]
        for episodes in (100, 2000, 10000):
            rows.append([f"sample {episodes} episodes (5-way 1-shot, 15 queries)", *in_fresh_process(
                "--run", "sample", "--cache-dir", str(cache_dir), "--episodes", str(episodes))])
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    print(machine())
    print(f"\nA cache of tiered-ImageNet's shape: {args.images} images, 3x{SIDE}x{SIDE} uint8, "
          f"{gigabytes:.1f} GB\n")
    print(markdown_table(["process", "seconds", "peak RSS GB", "at the end: anonymous GB",
                          "at the end: mapped file pages GB"], rows))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--under", default=tempfile.gettempdir())
    parser.add_argument("--cache-dir", help=argparse.SUPPRESS)  # the subprocesses' folder
    parser.add_argument("--images", type=int, default=779_165)
    parser.add_argument("--episodes", type=int, default=1000)
    parser.add_argument("--run", choices=["build", "sample"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run == "build":
        build(Path(args.cache_dir), args.images)
    elif args.run == "sample":
        sample(Path(args.cache_dir), args.episodes)
    else:
        main(args)
