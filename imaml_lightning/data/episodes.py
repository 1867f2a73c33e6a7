"""Deterministic episode streams shared by every dataset.

Task number i of a split is drawn from a generator seeded by hash(seed, split, i), so an
episode depends on nothing but those three values: not on the process, worker or world size.
Training step s uses tasks s*B .. s*B+B-1 (B the global meta-batch), and rank r of W takes the
r-th contiguous slice of B/W of them, so 1 or W processes train on the same global meta-batch.
"""
import hashlib
from typing import Callable, Iterator, Tuple

import torch
from torch.utils.data import Dataset, IterableDataset, default_collate, get_worker_info

TaskTensors = Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
TaskSampler = Callable[[str, torch.Generator], TaskTensors]


def task_generator(seed: int, split: str, index: int) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}/{split}/{index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


class EpisodeStream(IterableDataset):
    """Endless training meta-batches for one rank, from global step `start_step` on.

    DataLoader workers take steps round-robin, which is the order the loader reads them in.
    """

    def __init__(
        self,
        sampler: TaskSampler,
        seed: int,
        meta_batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        start_step: int = 0,
        split: str = "train",
    ):
        self.sampler, self.seed, self.split = sampler, seed, split
        self.meta_batch_size, self.rank, self.world_size = meta_batch_size, rank, world_size
        self.start_step = start_step

    def meta_batch(self, step: int):
        local = self.meta_batch_size // self.world_size
        first = step * self.meta_batch_size + self.rank * local
        tasks = [self.sampler(self.split, task_generator(self.seed, self.split, i))
                 for i in range(first, first + local)]
        return default_collate(tasks)

    def __iter__(self) -> Iterator:
        worker = get_worker_info()
        step, stride = self.start_step, 1
        if worker is not None:
            step, stride = step + worker.id, worker.num_workers
        while True:
            yield self.meta_batch(step)
            step += stride


class FixedEpisodes(Dataset):
    """The same `num_episodes` tasks for every run, method and world size (evaluation).

    Rank r of W holds episodes r, r + W, r + 2W, ...: every episode is evaluated exactly once
    (a DistributedSampler would pad the shares to equal length by repeating episodes).
    """

    def __init__(self, sampler: TaskSampler, split: str, num_episodes: int, seed: int,
                 rank: int = 0, world_size: int = 1):
        self.sampler, self.split, self.seed = sampler, split, seed
        self.indices = range(rank, num_episodes, world_size)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> TaskTensors:
        return self.sampler(self.split, task_generator(self.seed, self.split, self.indices[index]))
