"""Benchmarks 2 and 3 of the solver: time per meta-iteration in the authors' reference
configuration (Omniglot 5-way 1-shot, 16 inner GD steps, 5 CG steps, meta-batch 32, 1 query per
class, lambda = 2), vectorized over tasks (torch.func.vmap) against the per-task loop, and
against the compute floor: (K + 2 CG + 2) batched forward+backward passes of the same 160
support images through the same network (an HVP costs about two passes).

Usage: python -m benchmarks.solver_speed [--repeats 5]
"""
import argparse

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from benchmarks.common import machine, markdown_table, median_seconds, omniglot_shaped_tasks
from imaml_lightning.models import ConvNet
from imaml_lightning.solver import (
    IMAMLConfig, hessian_vector_product, meta_gradient, meta_gradient_loop, surrogate_loss, tree,
)

WAYS, SHOTS, QUERIES, META_BATCH, K, CG, LAM = 5, 1, 1, 32, 16, 5, 2.0


def main(repeats: int) -> None:
    torch.manual_seed(0)
    net = ConvNet(WAYS)
    params = dict(net.named_parameters())
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    tasks = omniglot_shaped_tasks(META_BATCH, WAYS, SHOTS, QUERIES)
    config = IMAMLConfig(lam=LAM, inner_steps=K, inner_lr=0.1, cg_steps=CG)

    def meta_iteration(solve):
        def run():
            result = solve(net, params, tasks, F.cross_entropy, config)
            optimizer.zero_grad()
            surrogate_loss(params, result.grads).backward()
            optimizer.step()
        return run

    support = tasks.support_x.flatten(0, 1)  # 160 images, one batch
    labels = tasks.support_y.flatten()

    def forward_backward():
        net.zero_grad()
        F.cross_entropy(net(support), labels).backward()

    pass_time = median_seconds(forward_backward, repeats=20, warmup=3)
    floor = (K + 2 * CG + 2) * pass_time
    grad_time, hvp_time = vectorized_part_seconds(net, params, tasks)
    parts = (K + 1) * grad_time + CG * hvp_time  # inner steps + query gradient + CG
    vectorized = median_seconds(meta_iteration(meta_gradient), repeats)
    loop = median_seconds(meta_iteration(meta_gradient_loop), max(2, repeats // 2))
    print(machine())
    print(f"reference: Omniglot {WAYS}-way {SHOTS}-shot, {QUERIES} query/class, meta-batch "
          f"{META_BATCH}, K={K} GD steps, {CG} CG steps, lambda={LAM}\n")
    print(markdown_table(
        ["measurement", "seconds", "target"],
        [["one batched forward+backward, 160 support images", f"{pass_time:.4f}", ""],
         [f"compute floor: (K + 2 CG + 2) = {K + 2 * CG + 2} passes", f"{floor:.3f}", ""],
         ["one vmapped support gradient, 32 tasks with their own parameters",
          f"{grad_time:.4f} ({grad_time / pass_time:.1f} passes)", ""],
         ["one vmapped Hessian-vector product, 32 tasks",
          f"{hvp_time:.4f} ({hvp_time / pass_time:.1f} passes)", ""],
         [f"sum of parts: (K + 1) gradients + {CG} HVPs", f"{parts:.3f}", ""],
         ["meta-iteration, per-task loop", f"{loop:.3f}", ""],
         ["meta-iteration, vectorized (vmap)", f"{vectorized:.3f}", "<= 1.2"],
         ["efficiency: vectorized / floor", f"{vectorized / floor:.2f}", "<= 1.3"],
         ["vectorized / sum of parts (the solver's own overhead)", f"{vectorized / parts:.2f}", ""],
         ["speed-up of vmap over the loop", f"{loop / vectorized:.2f}x", ""]]))


def vectorized_part_seconds(net, params, tasks):
    """Median seconds of the solver's two building blocks under vmap over the meta-batch, at
    per-task parameters (as after the first inner step): a support-loss gradient and an HVP."""
    theta = tree.detach(params)
    phi = {k: v.expand(META_BATCH, *v.shape) + 1e-3 * torch.randn(META_BATCH, *v.shape)
           for k, v in theta.items()}
    loss = lambda p, x, y: F.cross_entropy(functional_call(net, p, (x,)), y)  # noqa: E731
    gradients = vmap(grad(loss))
    hvps = vmap(lambda p, x, y: hessian_vector_product(lambda q: loss(q, x, y), p, p))
    grad_time = median_seconds(lambda: gradients(phi, tasks.support_x, tasks.support_y), 10, 2)
    hvp_time = median_seconds(lambda: hvps(phi, tasks.support_x, tasks.support_y), 10, 2)
    return grad_time, hvp_time


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    main(parser.parse_args().repeats)
