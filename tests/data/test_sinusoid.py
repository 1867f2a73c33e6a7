import math

import pytest
import torch

from imaml_lightning.data import SinusoidDataModule
from imaml_lightning.data.episodes import task_generator
from imaml_lightning.errors import SettingError


def test_task_shapes_and_a_single_sinusoid_per_task():
    dm = SinusoidDataModule(shots=10, queries=7)
    dm.setup("fit")
    xs, ys, xq, yq = dm.sampler("train", task_generator(0, "train", 0))
    assert xs.shape == ys.shape == (10, 1) and xq.shape == yq.shape == (7, 1)
    assert xs.abs().max() <= 5 and ys.abs().max() <= 5
    # Support and query come from one A sin(x - phase): fit A, phase on the support by least
    # squares on the basis (sin x, cos x) and predict the query exactly.
    basis = lambda x: torch.cat([torch.sin(x), torch.cos(x)], 1)  # noqa: E731
    coef = torch.linalg.lstsq(basis(xs), ys).solution
    torch.testing.assert_close(basis(xq) @ coef, yq, atol=1e-4, rtol=1e-4)
    amplitude = coef.norm()
    assert 0.1 <= amplitude <= 5.0


def test_amplitude_and_phase_ranges_are_respected():
    dm = SinusoidDataModule(amplitude=(1.0, 2.0), phase=(0.0, math.pi / 2))
    basis = lambda x: torch.cat([torch.sin(x), torch.cos(x)], 1)  # noqa: E731
    for i in range(20):
        xs, ys, _, _ = dm.tasks("train", task_generator(0, "train", i))
        a, b = torch.linalg.lstsq(basis(xs), ys).solution.flatten()  # A cos(p), -A sin(p)
        assert 1.0 - 1e-4 <= math.hypot(a, b) <= 2.0 + 1e-4
        assert -1e-4 <= math.atan2(-b, a) <= math.pi / 2 + 1e-4


@pytest.mark.parametrize("kwargs, setting", [
    ({"shots": 0}, "data.shots"),
    ({"meta_batch_size": 0}, "data.meta_batch_size"),
    ({"amplitude": (5.0, 1.0)}, "data.amplitude"),
])
def test_invalid_settings_name_the_setting(kwargs, setting):
    with pytest.raises(SettingError, match=setting):
        SinusoidDataModule(**kwargs)
