"""Passes per call of every way we tried to compute the solver's two kernels (gradient and HVP).

The speed target of issue 3 (1.2 s per meta-iteration, 1.3x the compute floor) assumes a
per-task gradient costs one batched forward+backward pass and a Hessian-vector product two.
This script measures, in the
reference configuration of `benchmarks.solver_speed` (Omniglot 5-way 1-shot, 32 tasks with their
own parameters, conv-4 with BatchNorm), what each way of computing them costs in passes:

- gradient: torch.func.vmap(grad) eager (shipped) and under torch.compile;
- HVP: forward-over-reverse (jvp of grad, shipped) eager and compiled; torch.func.linearize of
  the gradient and reverse-over-reverse (vjp of grad), both built once per point and reused by
  the CG products; BatchNorm as nn.BatchNorm2d and written in plain tensor ops;
- both without vmap, on the conv-4 written by hand for a leading task dimension;
- gradient: vmap in chunks of tasks, convolutions as unfold + matmul (vmap turns per-task weights
  into grouped convolutions, slow on CPU: pytorch/pytorch#70954), and oneDNN switched off.

Each HVP is timed as 5 products at one point (as in CG) divided by 5, so reverse-over-reverse
is credited with reusing its graph. Each result is compared with the shipped kernel's in
float64. The last table is the best case: the meta-iteration if the solver cost nothing but its
fastest kernels. The results: docs/studies/hvp_variants.md.

Usage: python -m benchmarks.studies.hvp_variants [--repeats 5] [--no-compile]
"""
import argparse
import copy
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, linearize, vjp, vmap

from benchmarks.common import machine, markdown_table, median_seconds, omniglot_shaped_tasks
from benchmarks.solver_speed import CG, K, META_BATCH, QUERIES, SHOTS, WAYS
from imaml_lightning.models import ConvNet
from imaml_lightning.solver import hessian_vector_product, tree

TARGET_SECONDS, TARGET_EFFICIENCY = 1.2, 1.3


class PlainBatchNorm2d(nn.Module):
    """Batch-statistics BatchNorm in elementary ops (same parameter names as nn.BatchNorm2d):
    its double backward is elementary too, which vmap can batch (nn.BatchNorm2d's cannot)."""

    def __init__(self, bn: nn.BatchNorm2d):
        super().__init__()
        self.weight, self.bias, self.eps = bn.weight, bn.bias, bn.eps

    def forward(self, x):
        var, mean = torch.var_mean(x, (0, 2, 3), correction=0, keepdim=True)
        scale = self.weight[:, None, None] * torch.rsqrt(var + self.eps)
        return (x - mean) * scale + self.bias[:, None, None]


def with_plain_batch_norm(net: ConvNet) -> ConvNet:
    plain = ConvNet(WAYS)
    plain.load_state_dict(net.state_dict())
    for block in plain.features:
        block[1] = PlainBatchNorm2d(block[1])
    return plain


class UnfoldConv2d(nn.Conv2d):
    """A convolution as im2col (F.unfold) and a matrix product: under vmap with per-task
    weights that product becomes one batched matmul instead of vmap's grouped convolution."""

    def forward(self, x):
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        columns = F.unfold(x, self.kernel_size, padding=self.padding, stride=self.stride)
        out = self.weight.flatten(1) @ columns + self.bias[:, None]
        return out.view(len(x), -1, (x.shape[2] + 2 * ph - kh) // sh + 1,
                        (x.shape[3] + 2 * pw - kw) // sw + 1)


def with_unfold_convolutions(net: ConvNet) -> ConvNet:
    unfolded = copy.deepcopy(net)
    for block in unfolded.features:
        conv = block[0]
        block[0] = UnfoldConv2d(conv.in_channels, conv.out_channels, conv.kernel_size,
                                stride=conv.stride, padding=conv.padding)
        block[0].load_state_dict(conv.state_dict())
    return unfolded


def without_onednn(fn):
    def run(*args):
        with torch.backends.mkldnn.flags(enabled=False):
            return fn(*args)
    return run


def loss_of(net):
    return lambda p, x, y: F.cross_entropy(functional_call(net, p, (x,)), y)


def forward_over_reverse(loss):
    """5 HVPs at one point, each one jvp of the gradient (the shipped kernel)."""
    def products(p, x, y, vs):
        return [hessian_vector_product(lambda q: loss(q, x, y), p, v) for v in vs]
    return vmap(products)


def reverse_over_reverse(loss):
    """5 HVPs at one point from one vjp of the gradient (the graph is built once)."""
    def products(p, x, y, vs):
        _, hvp = vjp(grad(lambda q: loss(q, x, y)), p)
        return [hvp(v)[0] for v in vs]
    return vmap(products)


def linearized(loss):
    """5 HVPs at one point from torch.func.linearize of the gradient (primal computed once)."""
    def products(p, x, y, vs):
        _, hvp = linearize(grad(lambda q: loss(q, x, y)), p)
        return [hvp(v) for v in vs]
    return vmap(products)


def task_batched_loss(p, x, y):
    """Sum over tasks of each task's support loss, the conv-4 written by hand for a leading task
    dimension (grouped convolutions, BatchNorm over task-channels) instead of vmap: tasks are
    independent, so its gradient and Hessian are the per-task ones, stacked / block-diagonal."""
    tasks, shots = x.shape[:2]
    h = x.transpose(0, 1).flatten(1, 2)  # [shots, tasks * channels, H, W]
    for i in range(len([k for k in p if k.endswith(".0.weight")])):  # one per conv block
        block = f"features.{i}"
        h = F.conv2d(h, p[f"{block}.0.weight"].flatten(0, 1), p[f"{block}.0.bias"].flatten(),
                     stride=2, padding=1, groups=tasks)
        h = F.relu(F.batch_norm(h, None, None, p[f"{block}.1.weight"].flatten(),
                                p[f"{block}.1.bias"].flatten(), training=True))
    features = h.reshape(shots, tasks, -1).transpose(0, 1)
    logits = torch.einsum("tsf,tof->tso", features, p["classifier.weight"])
    logits = logits + p["classifier.bias"][:, None]
    return F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum") / shots


def task_batched_gradient(p, x, y):
    return grad(task_batched_loss)(p, x, y)


def task_batched_hvps(p, x, y, vs):
    return [hessian_vector_product(lambda q: task_batched_loss(q, x, y), p, v) for v in vs]


def relative_error(out, ref) -> float:
    return max((tree.norm(tree.add(o, r, -1.0)) / tree.norm(r)).item() for o, r in zip(out, ref))


def measure(name, fn, args, reference, per_call, repeats, pass_time, compile_fn=False):
    """(table row [variant, passes per kernel call, error vs float64, note], seconds per call);
    seconds is None for a variant that fails."""
    note = ""
    try:
        if compile_fn:
            fn = torch.compile(fn, dynamic=False)
            start = time.perf_counter()
            fn(*args)
            note = f"compile {time.perf_counter() - start:.0f} s"
        out = fn(*args)
    except Exception as error:  # a variant that PyTorch cannot run is a result too
        message = f"{type(error).__name__}: {str(error).splitlines()[0][:90]}"
        return [name, "fails", "", message], None
    error = relative_error(out if isinstance(out, list) else [out],
                           reference if isinstance(reference, list) else [reference])
    seconds = median_seconds(lambda: fn(*args), repeats, 1) / per_call
    return [name, f"{seconds / pass_time:.2f}", f"{error:.1e}", note], seconds


def main(repeats: int, use_compile: bool) -> None:
    torch.manual_seed(0)
    net = ConvNet(WAYS)
    plain = with_plain_batch_norm(net)
    tasks = omniglot_shaped_tasks(META_BATCH, WAYS, SHOTS, QUERIES)
    theta = {k: v.detach() for k, v in net.named_parameters()}
    phi = {k: v.expand(META_BATCH, *v.shape) + 1e-2 * torch.randn(META_BATCH, *v.shape)
           for k, v in theta.items()}
    vectors = [{k: torch.randn_like(v) for k, v in phi.items()} for _ in range(CG)]
    x, y = tasks.support_x, tasks.support_y
    support, labels = x.flatten(0, 1), y.flatten()

    def forward_backward():
        net.zero_grad()
        F.cross_entropy(net(support), labels).backward()

    pass_time = median_seconds(forward_backward, repeats=20, warmup=3)
    gradients = vmap(grad(loss_of(net)))
    # References: the shipped kernels in float64, so each variant's float32 error shows.
    net64, double = copy.deepcopy(net).double(), lambda t: {k: v.double() for k, v in t.items()}
    grad_ref = vmap(grad(loss_of(net64)))(double(phi), x.double(), y)
    hvp_ref = forward_over_reverse(loss_of(net64))(double(phi), x.double(), y,
                                                    [double(v) for v in vectors])

    fwd_rev, rev_rev = forward_over_reverse, reverse_over_reverse
    grad_rows = [("vmap(grad), eager (shipped)", gradients),
                 ("vmap(grad), 8 tasks at a time (chunk_size)",
                  vmap(grad(loss_of(net)), chunk_size=8)),
                 ("vmap(grad), convolutions as unfold + batched matmul",
                  vmap(grad(loss_of(with_unfold_convolutions(net))))),
                 ("vmap(grad), oneDNN off (PyTorch's own grouped convolution)",
                  without_onednn(gradients)),
                 ("task-batched conv-4 by hand, no vmap", task_batched_gradient)]
    hvp_rows = [("forward-over-reverse, eager (shipped)", fwd_rev(loss_of(net))),
                ("forward-over-reverse, plain-ops BatchNorm", fwd_rev(loss_of(plain))),
                ("forward-over-reverse, task-batched conv-4 by hand, no vmap", task_batched_hvps),
                ("linearize (primal once), nn.BatchNorm2d", linearized(loss_of(net))),
                ("reverse-over-reverse, nn.BatchNorm2d", rev_rev(loss_of(net))),
                ("reverse-over-reverse, plain-ops BatchNorm", rev_rev(loss_of(plain)))]
    if use_compile:  # a third entry: compile it first
        grad_rows.append(("vmap(grad), torch.compile", vmap(grad(loss_of(net))), True))
        hvp_rows.append(("forward-over-reverse, torch.compile", fwd_rev(loss_of(net)), True))
    table, best = [], {}
    for kind, rows, args, reference, per_call in (
            ("gradient", grad_rows, (phi, x, y), grad_ref, 1),
            ("HVP", hvp_rows, (phi, x, y, vectors), hvp_ref, CG)):
        for name, fn, *compiled in rows:
            row, seconds = measure(name, fn, args, reference, per_call, repeats, pass_time,
                                   bool(compiled))
            if seconds is not None:
                best[kind] = min(best.get(kind, (seconds, name)), (seconds, name))
            table.append([kind] + row)
    print(machine())
    print(f"one batched forward+backward of the {len(support)} support images: "
          f"{pass_time * 1e3:.1f} ms; {META_BATCH} tasks, {WAYS}-way {SHOTS}-shot\n")
    print(markdown_table(["kernel", "variant", "batched passes per call", "error vs float64",
                          "note"], table))
    floor = (K + 2 * CG + 2) * pass_time
    grad_s, grad_name = best["gradient"]
    hvp_s, hvp_name = best["HVP"]
    best_case = (K + 1) * grad_s + CG * hvp_s
    print(f"\nBest case: (K + 1) = {K + 1} gradients ({grad_name}) + {CG} HVPs ({hvp_name}), "
          "nothing else:\n")
    print(markdown_table(["measurement", "value", "target"], [
        ["seconds per meta-iteration, kernels only", f"{best_case:.3f}", f"<= {TARGET_SECONDS}"],
        ["efficiency: kernels only / floor", f"{best_case / floor:.2f}", f"<= {TARGET_EFFICIENCY}"],
    ]))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-compile", dest="use_compile", action="store_false",
                        help="skip the torch.compile variants (slow to compile)")
    main(**vars(parser.parse_args()))
