"""Predictions that do not depend on the other queries: BatchNorm with the support set's statistics.

A network whose BatchNorm normalizes every batch by its own statistics (as MAML's and the
authors' iMAML code do, at test time too) predicts a query image from the statistics of the
whole query batch: transductive, and undefined for one image. Here the queries are normalized
with the statistics the adapted network computes on the support set instead, layer by layer.
"""
from functools import partial

import torch
from torch import nn
from torch.func import functional_call

from imaml_lightning.solver.tree import Params

BATCH_NORM_MODES = ("transductive", "support")


def batch_norm_layers(model: nn.Module) -> list:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def batch_norm_in_float32(model: nn.Module) -> nn.Module:
    """Under autocast, every BatchNorm layer of `model` normalizes in float32: a hook casts its
    bfloat16/float16 input up before it runs, while the convolutions and linear layers around
    it keep autocast's reduced precision. Outside autocast, and for float32 or float64 inputs,
    the hook does nothing. Idempotent (the solver calls it on every network it is given).

    Why: vmap over a gradient through BatchNorm fails under autocast when the layer's input is
    reduced precision and its parameters float32 ("expected scalar type BFloat16 but found
    Float" with CPU autocast and torch 2.14.1; the same with Half under CUDA autocast,
    pytorch/pytorch#184890), and batch statistics with bfloat16's 8-bit mantissa would be coarse
    anyway. Mixed-precision training commonly keeps normalization in float32 for the latter."""
    for layer in batch_norm_layers(model):
        if not getattr(layer, "_normalizes_in_float32", False):
            layer.register_forward_pre_hook(_float32_under_autocast)
            layer._normalizes_in_float32 = True
    return model


def _float32_under_autocast(layer: nn.Module, args: tuple):
    x = args[0]
    # The dtype first: in float32 nothing else is evaluated (torch.compile folds it away).
    if x.dtype in (torch.float16, torch.bfloat16) and torch.is_autocast_enabled(x.device.type):
        return (x.float(), *args[1:])
    return None


def channel_statistics(x: torch.Tensor):
    """Per-channel mean and biased variance over the batch and spatial dimensions (BatchNorm's)."""
    dims = [0, *range(2, x.dim())]
    return x.mean(dims), x.var(dims, unbiased=False)


def normalize(x: torch.Tensor, mean, var, layer: nn.Module) -> torch.Tensor:
    shape = (1, -1) + (1,) * (x.dim() - 2)
    y = (x - mean.reshape(shape)) * torch.rsqrt(var.reshape(shape) + layer.eps)
    if layer.affine:
        y = y * layer.weight.reshape(shape) + layer.bias.reshape(shape)
    return y


def support_statistics(model: nn.Module, params: Params, support_x: torch.Tensor) -> dict:
    """{BatchNorm layer: (mean, variance)} of each layer's input on the support set, under params."""
    statistics = {}

    def record(layer, inputs, output):
        statistics[layer] = channel_statistics(inputs[0])

    handles = [layer.register_forward_hook(record) for layer in batch_norm_layers(model)]
    try:
        functional_call(model, params, (support_x,))
    finally:
        for handle in handles:
            handle.remove()
    return statistics


def output_with_support_statistics(model: nn.Module, params: Params, support_x: torch.Tensor,
                                   query_x: torch.Tensor) -> torch.Tensor:
    """The network's output on query_x, every BatchNorm layer normalizing with the statistics
    of its input on support_x (one extra forward pass of the support set)."""
    statistics = support_statistics(model, params, support_x)
    # Each layer's forward replaced for this call (its own would compute, and need, the
    # queries' batch statistics: one query on a 1x1 map has none).
    for layer, (mean, var) in statistics.items():
        layer.forward = partial(normalize, mean=mean, var=var, layer=layer)
    try:
        return functional_call(model, params, (query_x,))
    finally:
        for layer in statistics:
            del layer.forward
