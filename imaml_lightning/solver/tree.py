"""Arithmetic on parameter dicts ({name: tensor}), the vectors the solver works with."""
from typing import Dict

import torch

Params = Dict[str, torch.Tensor]


def add(a: Params, b: Params, scale: float | torch.Tensor = 1.0) -> Params:
    """a + scale * b, in one fused operation per tensor (these dicts hold every task's copy of
    the network: the solver's element-wise arithmetic costs memory traffic, not arithmetic)."""
    if isinstance(scale, torch.Tensor):
        return {k: torch.addcmul(a[k], scale, b[k]) for k in a}
    return {k: torch.add(a[k], b[k], alpha=scale) for k in a}


def scale(a: Params, factor: float | torch.Tensor) -> Params:
    return {k: factor * v for k, v in a.items()}


def dot(a: Params, b: Params) -> torch.Tensor:
    return sum((a[k] * b[k]).sum() for k in a)


def zeros_like(a: Params) -> Params:
    return {k: torch.zeros_like(v) for k, v in a.items()}


def detach(a: Params) -> Params:
    return {k: v.detach() for k, v in a.items()}


def norm(a: Params) -> torch.Tensor:
    return dot(a, a).sqrt()


def where(condition: torch.Tensor, a: Params, b: Params) -> Params:
    """a where condition holds, else b (condition a per-task scalar under vmap)."""
    return {k: torch.where(condition, a[k], b[k]) for k in a}
