"""Per-episode scores summarized as mean and 95% confidence interval."""
import math
from typing import Tuple

import torch
from torchmetrics.aggregation import CatMetric


class MeanConfidenceInterval(CatMetric):
    """Collects one score per episode (across processes too) and computes
    (mean, 1.96 * std / sqrt(n)), the interval the few-shot literature reports."""

    def compute(self) -> Tuple[torch.Tensor, torch.Tensor]:
        scores = super().compute().double().flatten()
        if scores.numel() < 2:
            return scores.mean(), torch.zeros((), dtype=scores.dtype)
        return scores.mean(), 1.96 * scores.std(unbiased=True) / math.sqrt(scores.numel())
