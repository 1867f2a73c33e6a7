"""Per-episode scores summarized as mean and 95% confidence interval."""
import math
from typing import NamedTuple

import torch
from torchmetrics.aggregation import CatMetric


class Summary(NamedTuple):
    mean: torch.Tensor
    ci95: torch.Tensor  # half-width of the 95% confidence interval of the mean
    count: int  # episodes


class MeanConfidenceInterval(CatMetric):
    """Collects one score per episode (across processes too) and computes
    (mean, 1.96 * std / sqrt(n), n), the interval the few-shot literature reports."""

    def compute(self) -> Summary:
        scores = super().compute().double().flatten()
        if scores.numel() < 2:
            return Summary(scores.mean(), torch.zeros((), dtype=scores.dtype), scores.numel())
        ci = 1.96 * scores.std(unbiased=True) / math.sqrt(scores.numel())
        return Summary(scores.mean(), ci, scores.numel())
