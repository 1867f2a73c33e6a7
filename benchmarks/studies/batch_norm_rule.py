"""BatchNorm with its own vmap rule: an experiment for `benchmarks.studies.compiled_gradient`.

Under vmap with per-task parameters, PyTorch runs nn.BatchNorm2d as a normalization without
affine followed by the per-task scale and shift as separate element-wise operations. Here the
vmap rule folds the task dimension into the channels instead ([N, T, C, H, W] -> [N, T*C, H, W],
a view where vmap's grouped convolution has left the tensor in that layout) and calls the
native kernel once, affine included, forward and backward (the backward is a Function with its
own vmap rule too). Enough for vmap(grad), the inner loop's kernel: no forward-mode or double
derivative rules, so not a replacement for nn.BatchNorm2d in the solver. Its timing is one arm of
compiled_gradient; the results: docs/studies/batch_norm_rule.md.
"""
import copy

import torch
from torch import nn

from imaml_lightning.models import ConvNet


def task_channels(tensor, dim, tasks):
    """[N, C, ...] batched at `dim` (or not batched: None) -> [N, tasks * C, ...]."""
    if dim is None:
        tensor = tensor.unsqueeze(1).expand(tensor.shape[0], tasks, *tensor.shape[1:])
    else:
        tensor = tensor.movedim(dim, 1)
    return tensor.flatten(1, 2)


def per_task_channels(tensor, dim, tasks, channels):
    """[C] batched at `dim` (or None) -> [tasks * C]."""
    return tensor.expand(tasks, channels).reshape(-1) if dim is None else tensor.movedim(dim, 0).reshape(-1)


class BatchNormBackward(torch.autograd.Function):
    generate_vmap_rule = False

    @staticmethod
    def forward(grad_out, x, weight, mean, invstd, eps):
        return torch.ops.aten.native_batch_norm_backward(
            grad_out, x, weight, None, None, mean, invstd, True, eps, [True, True, True])

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def vmap(info, in_dims, grad_out, x, weight, mean, invstd, eps):
        tasks, channels = info.batch_size, x.shape[-3]
        flat = [per_task_channels(t, d, tasks, channels)
                for t, d in zip((weight, mean, invstd), in_dims[2:5])]
        g, gw, gb = BatchNormBackward.apply(task_channels(grad_out, in_dims[0], tasks),
                                            task_channels(x, in_dims[1], tasks), *flat, eps)
        n = g.shape[0]
        return (g.view(n, tasks, channels, *g.shape[2:]), gw.view(tasks, channels),
                gb.view(tasks, channels)), (1, 0, 0)


class BatchNormFunction(torch.autograd.Function):
    generate_vmap_rule = False

    @staticmethod
    def forward(x, weight, bias, eps):
        return torch.ops.aten.native_batch_norm(x, weight, bias, None, None, True, 0.0, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, _, eps = inputs
        _, mean, invstd = output
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.eps = eps
        ctx.mark_non_differentiable(mean, invstd)

    @staticmethod
    def backward(ctx, grad_out, _mean, _invstd):
        x, weight, mean, invstd = ctx.saved_tensors
        return (*BatchNormBackward.apply(grad_out, x, weight, mean, invstd, ctx.eps), None)

    @staticmethod
    def vmap(info, in_dims, x, weight, bias, eps):
        tasks, channels = info.batch_size, x.shape[-3]
        y, mean, invstd = BatchNormFunction.apply(
            task_channels(x, in_dims[0], tasks), per_task_channels(weight, in_dims[1], tasks, channels),
            per_task_channels(bias, in_dims[2], tasks, channels), eps)
        n = y.shape[0]
        return (y.view(n, tasks, channels, *y.shape[2:]), mean.view(tasks, channels),
                invstd.view(tasks, channels)), (1, 0, 0)


class BatchNormWithVmapRule(nn.BatchNorm2d):
    """Batch statistics only (as the conv-4's BatchNorm: no running statistics)."""

    def forward(self, x):
        return BatchNormFunction.apply(x, self.weight, self.bias, self.eps)[0]


def with_batch_norm_rule(net: ConvNet) -> ConvNet:
    """A copy of the conv-4 whose BatchNorm layers have the vmap rule above."""
    ruled = copy.deepcopy(net)
    for block in ruled.features:
        block[1] = BatchNormWithVmapRule(block[1].num_features, track_running_stats=False)
    ruled.load_state_dict(net.state_dict())
    return ruled
