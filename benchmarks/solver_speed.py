"""Seconds per meta-iteration of each curvature, vectorized and per task, against its compute floor.

In the authors' reference configuration (Omniglot 5-way 1-shot, 16 inner GD steps, 5 CG steps,
meta-batch 32, 1 query per class, lambda = 2), for each curvature of the implicit system,
vectorized over tasks (torch.func.vmap) and one task at a time, against its compute floor
counted in batched forward+backward passes ("passes") of the same 160 support images through the
same network (one pass ~ 3 forwards, counting a backward as two):

- every curvature: K inner gradients + 1 query gradient + 1/3 (the last inner step's check);
- "hessian": + 2 per Hessian-vector product (forward-over-reverse: a forward and a backward,
  each carrying tangents);
- "gauss_newton": + 4/3 per product (J v: a forward with tangents, 2 forwards; J^T u: a backward
  through the kept activations, 2 forwards) + 1/3 to build the pullback once per solve;
- "gauss_newton_fd": + 1 per product (J v: one plain forward) + 1/3 for the pullback.

`--compiled C ...` adds a row per curvature C with the solver compiled by torch.compile
(VectorizedMetaGradient(compile=True)); its first call, the compilation, is timed on its own.
Its sum of parts takes the gradient and the product each compiled alone: what the compiled
solver would take with nothing between its kernels. The latest table, with its date and
machine: docs/benchmarks.md.

Usage: python -m benchmarks.solver_speed [--repeats 7] [--compiled gauss_newton]
       python -m benchmarks.solver_speed --quick   (2 tasks, 2 inner and 2 CG steps, 8 channels, 1 round)
"""
import argparse
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.func import grad, vmap

from benchmarks.common import (
    QUICK_HELP, alternating_rounds, machine, markdown_table, median_seconds, omniglot_shaped_tasks,
    seconds_of_one_call,
)
from imaml_lightning.models import ConvNet
from imaml_lightning.solver import (
    CURVATURES, SolverConfig, VectorizedMetaGradient, meta_gradient, surrogate_loss, tree,
)
from imaml_lightning.solver.objective import TaskLoss
from imaml_lightning.solver.reference import meta_gradient_loop

WAYS, SHOTS, QUERIES, META_BATCH, K, CG, LAM = 5, 1, 1, 32, 16, 5, 2.0
# (passes per product, per solve)
PRODUCT_PASSES = {"hessian": (2.0, 0.0), "gauss_newton": (4 / 3, 1 / 3), "gauss_newton_fd": (1.0, 1 / 3)}


@dataclass(frozen=True)
class Sizes:
    """Tasks per meta-batch, inner GD steps, CG steps and the conv-4's channels: the reference's,
    or --quick's."""
    meta_batch: int = META_BATCH
    k: int = K
    cg: int = CG
    hidden: int = 64


REFERENCE, QUICK = Sizes(), Sizes(meta_batch=2, k=2, cg=2, hidden=8)


def floor_passes(curvature: str, sizes: Sizes = REFERENCE) -> float:
    per_product, per_solve = PRODUCT_PASSES[curvature]
    return sizes.k + 1 + 1 / 3 + sizes.cg * per_product + per_solve


def main(repeats: int, compiled: list, sizes: Sizes = REFERENCE) -> None:
    torch.manual_seed(0)
    net = ConvNet(WAYS, hidden=sizes.hidden)
    params = dict(net.named_parameters())
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    tasks = omniglot_shaped_tasks(sizes.meta_batch, WAYS, SHOTS, QUERIES)

    def meta_iteration(solve, curvature):
        config = reference_config(curvature, sizes)

        def run():
            result = solve(net, params, tasks, F.cross_entropy, config)
            optimizer.zero_grad()
            surrogate_loss(params, result.grads).backward()
            optimizer.step()
        return run

    support = tasks.support_x.flatten(0, 1)  # every task's images (160 in the reference), one batch
    labels = tasks.support_y.flatten()

    def forward_backward():
        net.zero_grad()
        F.cross_entropy(net(support), labels).backward()

    arms = {(c, False): meta_iteration(meta_gradient, c) for c in CURVATURES}
    for curvature in compiled:
        solve = VectorizedMetaGradient(net, F.cross_entropy, reference_config(curvature, sizes),
                                       compile=True)
        start = time.perf_counter()
        solve(params, tasks)
        print(f"{curvature}, compiled: first call (compilation) {time.perf_counter() - start:.1f} s")
        arms[(curvature, True)] = meta_iteration(compiled_solver(solve), curvature)
    for run in [forward_backward, *arms.values()]:  # warm-up
        run()
    iterations = alternating_rounds(
        {"pass": lambda: median_seconds(forward_backward, repeats=5, warmup=1),
         **{name: seconds_of_one_call(run) for name, run in arms.items()}}, repeats)
    passes = iterations.pop("pass")  # each round's own, for the ratios to the floor
    pass_time = statistics.median(passes)
    grad_time = vectorized_gradient_seconds(net, params, tasks)
    compiled_grad_time = vectorized_gradient_seconds(net, params, tasks, compile=True) if compiled else None
    dict_time = dict_pass_seconds(params, sizes.meta_batch)
    print(machine())
    print(f"reference: Omniglot {WAYS}-way {SHOTS}-shot, {QUERIES} query/class, meta-batch "
          f"{sizes.meta_batch}, K={sizes.k} GD steps, {sizes.cg} CG steps, lambda={LAM}; {repeats} "
          f"rounds, each timing a pass and every meta-iteration in turn; one pass (batched "
          f"forward+backward of the {len(support)} support images) = {pass_time * 1000:.1f} ms (median; "
          f"{min(passes) * 1000:.1f}-{max(passes) * 1000:.1f}); one vmapped support gradient, "
          f"{sizes.meta_batch} tasks with their own parameters = {grad_time * 1000:.1f} ms "
          f"({grad_time / pass_time:.2f} passes); one pass over the meta-batch's parameter dicts "
          f"(tree.add: every task's copy of the network read twice, written once; an inner step "
          f"does at least one) = {dict_time * 1000:.1f} ms ({dict_time / pass_time:.2f} passes)"
          + (f"; the vmapped gradient compiled alone = {compiled_grad_time * 1000:.1f} ms "
             f"({compiled_grad_time / pass_time:.2f} passes)" if compiled else "") + "\n")
    rows = []
    for (curvature, is_compiled), seconds in iterations.items():
        floor = floor_passes(curvature, sizes)
        to_floor = [t / (floor * p) for t, p in zip(seconds, passes)]  # each round's own pass
        row = [curvature + (", compiled" if is_compiled else ""), f"{floor:.1f}",
               f"{floor * pass_time:.3f}", f"**{statistics.median(seconds):.3f}** "
               f"({min(seconds):.3f}-{max(seconds):.3f})",
               f"**{statistics.median(to_floor):.2f}** ({min(to_floor):.2f}-{max(to_floor):.2f})"]
        gradient = compiled_grad_time if is_compiled else grad_time
        product = vectorized_product_seconds(net, params, tasks, curvature, is_compiled, sizes.cg)
        parts = (sizes.k + 1) * gradient + sizes.cg * product
        row += [f"{product * 1000:.1f} ({product / pass_time:.2f})", f"{parts:.3f}",
                f"{parts / (floor * pass_time):.2f}", f"{statistics.median(seconds) / parts:.2f}"]
        if not is_compiled:
            loop = median_seconds(meta_iteration(meta_gradient_loop, curvature), max(2, repeats // 2))
            row += [f"{loop:.3f}", f"{loop / statistics.median(seconds):.2f}x"]
        rows.append(row)
    print(markdown_table(
        ["curvature", "floor (passes)", "floor (s)", "vectorized meta-iteration (s), median (range)",
         "vectorized / floor, median (range)", "one vmapped product, ms (passes)",
         "sum of parts: (K+1) gradients + CG products (s)", "sum of parts / floor",
         "vectorized / sum of parts",
         "per-task loop (s)", "vmap speed-up"], rows))


def reference_config(curvature: str, sizes: Sizes = REFERENCE) -> SolverConfig:
    return SolverConfig(lam=LAM, inner_steps=sizes.k, inner_lr=0.1, cg_steps=sizes.cg, curvature=curvature)


def compiled_solver(solve: VectorizedMetaGradient):
    """meta_gradient's signature for a solver built (and compiled) with its settings."""
    return lambda net, params, tasks, loss_fn, config: solve(params, tasks)


def perturbed(params, seed: int = 0, tasks: int = META_BATCH):
    """Per-task parameters near theta, as after the first inner step."""
    g = torch.Generator().manual_seed(seed)
    return {k: v.detach().expand(tasks, *v.shape) + 1e-3 * torch.randn(tasks, *v.shape, generator=g)
            for k, v in params.items()}


def vectorized_gradient_seconds(net, params, tasks, compile: bool = False) -> float:
    """Median seconds of one vmapped support-loss gradient over the meta-batch (compile: under
    torch.compile, timed after its compilation)."""
    fn = TaskLoss(net, F.cross_entropy)
    gradients = compiled_if(compile, vmap(grad(lambda p, x, y: fn(p, x, y)[0])))
    phi = perturbed(params, tasks=len(tasks.support_x))
    return median_seconds(lambda: gradients(phi, tasks.support_x, tasks.support_y), 10, 2)


def compiled_if(compile: bool, fn):
    return torch.compile(fn, dynamic=False) if compile else fn


def dict_pass_seconds(params, tasks: int = META_BATCH) -> float:
    """Median seconds of one tree.add over per-task copies of the parameters (memory traffic)."""
    phi, direction = perturbed(params, 0, tasks), perturbed(params, 1, tasks)
    return median_seconds(lambda: tree.add(phi, direction, 0.1), 20, 2)


def vectorized_product_seconds(net, params, tasks, curvature: str, compile: bool = False,
                               cg: int = CG) -> float:
    """Median seconds per curvature product under vmap, timed as CG uses them: cg products at
    one point (a Gauss-Newton pullback is built once and shared by them), divided by cg."""
    fn = TaskLoss(net, F.cross_entropy)

    def products(phi, x, y):
        matvec = fn.curvature(curvature, x, y)(phi)
        v = phi
        for _ in range(cg):
            v = tree.add(v, matvec(v), 1.0 / LAM)
        return v

    run = compiled_if(compile, vmap(products))
    phi = perturbed(params, tasks=len(tasks.support_x))
    return median_seconds(lambda: run(phi, tasks.support_x, tasks.support_y), 10, 2) / cg


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, help="rounds (default 7; --quick: 1)")
    parser.add_argument("--compiled", nargs="*", default=[], choices=CURVATURES,
                        help="curvatures to time also with the solver compiled (torch.compile)")
    parser.add_argument("--quick", action="store_true", help=QUICK_HELP)
    args = parser.parse_args()
    main(args.repeats or (1 if args.quick else 7), args.compiled, QUICK if args.quick else REFERENCE)
