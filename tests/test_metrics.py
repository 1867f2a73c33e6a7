import math

import pytest
import torch

from imaml_lightning.metrics import MeanConfidenceInterval


def test_constant_scores_have_a_zero_width_interval():
    metric = MeanConfidenceInterval()
    metric.update(torch.full((7,), 0.8))
    mean, ci, count = metric.compute()
    assert mean.item() == pytest.approx(0.8) and ci.item() == 0 and count == 7


def test_interval_is_196_standard_errors():
    metric = MeanConfidenceInterval()
    metric.update(torch.tensor([0.0, 1.0]))
    metric.update(torch.tensor([1.0, 0.0]))  # batches accumulate
    mean, ci, count = metric.compute()
    assert count == 4 and mean.item() == 0.5
    assert ci.item() == pytest.approx(1.96 * math.sqrt(1 / 3) / 2)
