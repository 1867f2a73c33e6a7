"""Time per meta-iteration in the authors' reference configuration (Omniglot 5-way 1-shot, 16
inner GD steps, 5 CG steps, meta-batch 32, 1 query per class, lambda = 2), for each curvature of
the implicit system, vectorized over tasks (torch.func.vmap) and one task at a time, against its
compute floor counted in batched forward+backward passes ("passes") of the same 160 support
images through the same network (one pass ~ 3 forwards: a backward costs about two):

- every curvature: K inner gradients + 1 query gradient + 1/3 (the last inner step's check);
- "hessian": + 2 per Hessian-vector product (forward-over-reverse: a forward and a backward,
  each carrying tangents);
- "gauss_newton": + 4/3 per product (J v: a forward with tangents, 2 forwards; J^T u: a backward
  through the kept activations, 2 forwards) + 1/3 to build the pullback once per solve;
- "gauss_newton_fd": + 1 per product (J v: one plain forward) + 1/3 for the pullback.

Usage: python -m benchmarks.solver_speed [--repeats 5]
"""
import argparse

import torch
import torch.nn.functional as F
from torch.func import grad, vmap

from benchmarks.common import machine, markdown_table, median_seconds, omniglot_shaped_tasks
from imaml_lightning.models import ConvNet
from imaml_lightning.solver import CURVATURES, SolverConfig, meta_gradient, surrogate_loss, tree
from imaml_lightning.solver.objective import TaskLoss
from imaml_lightning.solver.reference import meta_gradient_loop

WAYS, SHOTS, QUERIES, META_BATCH, K, CG, LAM = 5, 1, 1, 32, 16, 5, 2.0
# (passes per product, per solve)
PRODUCT_PASSES = {"hessian": (2.0, 0.0), "gauss_newton": (4 / 3, 1 / 3), "gauss_newton_fd": (1.0, 1 / 3)}


def floor_passes(curvature: str) -> float:
    per_product, per_solve = PRODUCT_PASSES[curvature]
    return K + 1 + 1 / 3 + CG * per_product + per_solve


def main(repeats: int) -> None:
    torch.manual_seed(0)
    net = ConvNet(WAYS)
    params = dict(net.named_parameters())
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    tasks = omniglot_shaped_tasks(META_BATCH, WAYS, SHOTS, QUERIES)

    def meta_iteration(solve, curvature):
        config = SolverConfig(lam=LAM, inner_steps=K, inner_lr=0.1, cg_steps=CG, curvature=curvature)

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
    grad_time = vectorized_gradient_seconds(net, params, tasks)
    print(machine())
    print(f"reference: Omniglot {WAYS}-way {SHOTS}-shot, {QUERIES} query/class, meta-batch "
          f"{META_BATCH}, K={K} GD steps, {CG} CG steps, lambda={LAM}; one pass (batched "
          f"forward+backward of the 160 support images) = {pass_time * 1000:.1f} ms; one vmapped "
          f"support gradient, 32 tasks with their own parameters = {grad_time * 1000:.1f} ms "
          f"({grad_time / pass_time:.2f} passes)\n")
    rows = []
    for curvature in CURVATURES:
        product = vectorized_product_seconds(net, params, tasks, curvature)
        floor = floor_passes(curvature)
        parts = (K + 1) * grad_time + CG * product
        vectorized = median_seconds(meta_iteration(meta_gradient, curvature), repeats)
        loop = median_seconds(meta_iteration(meta_gradient_loop, curvature), max(2, repeats // 2))
        rows.append([curvature, f"{floor:.1f}", f"{floor * pass_time:.3f}",
                     f"{product * 1000:.1f} ({product / pass_time:.2f})", f"{parts:.3f}",
                     f"{loop:.3f}", f"**{vectorized:.3f}**",
                     f"**{vectorized / (floor * pass_time):.2f}**", f"{vectorized / parts:.2f}",
                     f"{loop / vectorized:.2f}x"])
    print(markdown_table(
        ["curvature", "floor (passes)", "floor (s)", "one vmapped product, ms (passes)",
         "sum of parts: (K+1) gradients + CG products (s)", "per-task loop (s)",
         "vectorized meta-iteration (s)", "vectorized / floor", "vectorized / sum of parts",
         "vmap speed-up"], rows))


def perturbed(params, seed: int = 0):
    """Per-task parameters near theta, as after the first inner step."""
    g = torch.Generator().manual_seed(seed)
    return {k: v.detach().expand(META_BATCH, *v.shape) + 1e-3 * torch.randn(META_BATCH, *v.shape, generator=g)
            for k, v in params.items()}


def vectorized_gradient_seconds(net, params, tasks) -> float:
    """Median seconds of one vmapped support-loss gradient over the meta-batch."""
    fn = TaskLoss(net, F.cross_entropy)
    gradients = vmap(grad(lambda p, x, y: fn(p, x, y)[0]))
    phi = perturbed(params)
    return median_seconds(lambda: gradients(phi, tasks.support_x, tasks.support_y), 10, 2)


def vectorized_product_seconds(net, params, tasks, curvature: str) -> float:
    """Median seconds per curvature product under vmap, timed as CG uses them: CG products at
    one point (a Gauss-Newton pullback is built once and shared by them), divided by CG."""
    fn = TaskLoss(net, F.cross_entropy)

    def products(phi, x, y):
        matvec = fn.curvature(curvature, x, y)(phi)
        v = phi
        for _ in range(CG):
            v = tree.add(v, matvec(v), 1.0 / LAM)
        return v

    run = vmap(products)
    phi = perturbed(params)
    return median_seconds(lambda: run(phi, tasks.support_x, tasks.support_y), 10, 2) / CG


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    main(parser.parse_args().repeats)
