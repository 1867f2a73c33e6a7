"""Sinusoid regression (MAML): y = A sin(x - phase), A ~ U[0.1, 5], phase ~ U[0, pi],
x ~ U[-5, 5]. Needs no download."""
import math
from typing import Tuple

import torch

from imaml_lightning.data.base import EpisodicDataModule
from imaml_lightning.data.episodes import TaskTensors
from imaml_lightning.errors import require


class SinusoidTasks:
    def __init__(self, shots: int, queries: int, amplitude: Tuple[float, float],
                 phase: Tuple[float, float], x_range: Tuple[float, float]):
        self.shots, self.queries = shots, queries
        self.amplitude, self.phase, self.x_range = amplitude, phase, x_range

    def __call__(self, split: str, generator: torch.Generator) -> TaskTensors:
        def uniform(bounds, *shape):
            low, high = bounds
            return low + (high - low) * torch.rand(shape, generator=generator)

        amplitude, phase = uniform(self.amplitude), uniform(self.phase)
        x = uniform(self.x_range, self.shots + self.queries, 1)
        y = amplitude * torch.sin(x - phase)
        return x[: self.shots], y[: self.shots], x[self.shots:], y[self.shots:]


class SinusoidDataModule(EpisodicDataModule):
    """K-shot sinusoid regression; `shots` points to adapt on, `queries` points to score.
    Episode and loader settings: see EpisodicDataModule."""

    problem = "regression"

    def __init__(
        self,
        shots: int = 10,
        queries: int = 10,
        amplitude: Tuple[float, float] = (0.1, 5.0),
        phase: Tuple[float, float] = (0.0, math.pi),
        x_range: Tuple[float, float] = (-5.0, 5.0),
        **kwargs,
    ):
        super().__init__(**kwargs)
        require(shots >= 1, "data.shots", shots, "must be >= 1")
        require(queries >= 1, "data.queries", queries, "must be >= 1")
        for name, (low, high) in (("amplitude", amplitude), ("phase", phase), ("x_range", x_range)):
            require(low <= high, f"data.{name}", (low, high), "must be (low, high) with low <= high")
        self.tasks = SinusoidTasks(shots, queries, amplitude, phase, x_range)

    @property
    def out_features(self) -> int:
        return 1

    def make_sampler(self) -> SinusoidTasks:
        return self.tasks
