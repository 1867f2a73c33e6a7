"""The LightningDataModule shared by every episodic dataset."""
from typing import Optional

import pytorch_lightning as pl
from torch.utils.data import DataLoader

from imaml_lightning.compat import global_seed
from imaml_lightning.data.episodes import EpisodeStream, FixedEpisodes, TaskSampler
from imaml_lightning.errors import require


class EpisodicDataModule(pl.LightningDataModule):
    """Streams training meta-batches and serves fixed validation and test episodes.

    Subclasses build a task sampler ((split, generator) -> (support_x, support_y, query_x,
    query_y)) in `make_sampler` and say what the network must output.

    Args:
        meta_batch_size: tasks per optimizer step, global across all devices.
        val_episodes / test_episodes: size of the fixed evaluation sets.
        eval_batch_size: evaluation tasks adapted together.
        num_workers: DataLoader worker processes.
        seed: seed of the training episodes; None takes the run's --seed_everything.
        eval_seed: seed of the validation/test episodes; keep it fixed to compare runs.
    """

    problem = "classification"  # or "regression": picks the loss and the metrics

    def __init__(
        self,
        meta_batch_size: int = 32,
        val_episodes: int = 200,
        test_episodes: int = 600,
        eval_batch_size: int = 25,
        num_workers: int = 0,
        seed: Optional[int] = None,
        eval_seed: int = 0,
    ):
        super().__init__()
        require(meta_batch_size >= 1, "data.meta_batch_size", meta_batch_size, "must be >= 1")
        require(val_episodes >= 1, "data.val_episodes", val_episodes, "must be >= 1")
        require(test_episodes >= 1, "data.test_episodes", test_episodes, "must be >= 1")
        require(eval_batch_size >= 1, "data.eval_batch_size", eval_batch_size, "must be >= 1")
        require(num_workers >= 0, "data.num_workers", num_workers, "must be >= 0")
        self.meta_batch_size, self.val_episodes = meta_batch_size, val_episodes
        self.test_episodes, self.eval_batch_size = test_episodes, eval_batch_size
        self.num_workers, self.seed, self.eval_seed = num_workers, seed, eval_seed
        self.sampler: Optional[TaskSampler] = None

    @property
    def out_features(self) -> int:
        """Size of the network output (classes per task, or regression targets)."""
        raise NotImplementedError

    @property
    def dataset_name(self) -> str:
        """The data's name in `*_result.json` and `report` (a cross-domain test names the
        dataset it ran on, not the one the checkpoint was trained on)."""
        return type(self).__name__.removesuffix("DataModule").lower()

    def make_sampler(self) -> TaskSampler:
        raise NotImplementedError

    def setup(self, stage: str) -> None:
        if self.sampler is None:
            self.sampler = self.make_sampler()

    def _loader(self, dataset, **kwargs) -> DataLoader:
        return DataLoader(dataset, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0, **kwargs)

    def _world(self):
        trainer = self.trainer
        return (trainer.world_size, trainer.global_rank) if trainer else (1, 0)

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        world, rank = self._world()
        require(self.meta_batch_size % world == 0, "data.meta_batch_size", self.meta_batch_size,
                f"must be divisible by the number of processes ({world})")
        # The run's seed, as set by --seed_everything (Lightning exports it to every process).
        seed = self.seed if self.seed is not None else (global_seed() or 0)
        stream = EpisodeStream(self.sampler, seed, self.meta_batch_size, rank, world,
                               start_step=trainer.global_step if trainer else 0)
        return self._loader(stream, batch_size=None)

    def _evaluation_loader(self, split: str, num_episodes: int) -> DataLoader:
        world, rank = self._world()
        episodes = FixedEpisodes(self.sampler, split, num_episodes, self.eval_seed, rank, world)
        return self._loader(episodes, batch_size=self.eval_batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._evaluation_loader("val", self.val_episodes)

    def test_dataloader(self) -> DataLoader:
        return self._evaluation_loader("test", self.test_episodes)
