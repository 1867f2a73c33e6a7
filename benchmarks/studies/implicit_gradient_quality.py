"""How close each implicit meta-gradient is to the exact one, at a meta-trained theta.

Meta-trains theta for --train-steps with the shipped Omniglot settings (solver only, no
Lightning), then for --tasks meta-training tasks compares, task by task, each meta-gradient with
a reference: the exact derivative d/dtheta L(phi_K(theta); Q) of the query loss after the inner
loop that was actually run (--inner-steps of GD on G, whose anchor theta moves too), by autograd
through the unrolled loop. That is the outer objective itself with K-step adaptation, and what
the implicit gradient stands in for; the inner problem of a ReLU network with BatchNorm cannot
be solved to the end to give the exact implicit one instead (even long runs of GD leave
||grad G|| far from 0 there: the kinks; docs/studies/implicit_gradient_quality.md). The candidates: CG
with the exact Hessian (its smallest-residual iterate, and its last), CG with the Gauss-Newton
matrix (last iterate), and the first-order term grad L(phi; Q).

Where the inner loop is unstable (sharp losses, 20-way) that derivative is dominated by the
directions GD amplifies, so a second test asks what the outer step needs: does a step of norm
--step against the candidate lower the task's query loss after adaptation, L(phi_K(theta -
step g/||g||); Q)? Reported: the median decrease and the share of tasks where it decreased.

The second table decides what a task whose Hessian CG returned x0 = 0 contributes (the
"stalled" tasks: negative curvature at the first step, or no iterate with a smaller residual):
zero (what it did before), its first-order term, CG's last iterate, or the Gauss-Newton solve.
The results: docs/studies/implicit_gradient_quality.md.

Usage: python -m benchmarks.studies.implicit_gradient_quality [--ways 5] [--train-steps 300] [--tasks 64]
"""
import argparse
import time
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch.func import grad, grad_and_value, vmap

from benchmarks.common import OMNIGLOT_ROOT, ROOT, machine, markdown_table
from imaml_lightning.data import OmniglotDataModule
from imaml_lightning.data.images import to_unit_range
from imaml_lightning.models import ConvNet
from imaml_lightning.solver import SolverConfig, Task, meta_gradient, surrogate_loss
from imaml_lightning.solver.algorithms import adapt, solve_implicit_system
from imaml_lightning.solver.objective import TaskLoss
from imaml_lightning.solver.inner import gradient_descent
from imaml_lightning.solver.objective import ProximalObjective


def sample(sampler, count: int, seed: int) -> Task:
    g = torch.Generator().manual_seed(seed)
    tasks = [to_unit_range(sampler("train", g)) for _ in range(count)]
    return Task(*(torch.stack(t) for t in zip(*tasks)))


def train_theta(net, sampler, config, steps: int, meta_batch: int):
    params = dict(net.named_parameters())
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    for step in range(steps):
        result = meta_gradient(net, params, sample(sampler, meta_batch, 1000 + step), F.cross_entropy,
                               config, diagnose_before=False)
        optimizer.zero_grad()
        surrogate_loss(params, result.grads).backward()
        optimizer.step()
    return {k: v.detach() for k, v in params.items()}


def unrolled_derivative(fn, theta, task: Task, config: SolverConfig):
    """d/dtheta L(phi_K(theta); Q) through the K GD steps on G (theta: start and anchor)."""
    def query_loss_after_adaptation(start):
        objective = ProximalObjective(lambda p: fn(p, task.support_x, task.support_y), start, config.lam)
        phi = gradient_descent(objective, start, config.inner_steps, config.inner_lr).phi
        return fn(phi, task.query_x, task.query_y)[0]
    return grad(query_loss_after_adaptation)(theta)


def query_loss_after_adaptation(fn, theta, task: Task, config: SolverConfig):
    return fn(adapt(fn, theta, task, config)[0], task.query_x, task.query_y)[0]


def decrease_along(fn, theta, task: Task, config: SolverConfig, direction: torch.Tensor, step: float):
    """L(phi_K(theta); Q) - L(phi_K(theta - step d/||d||); Q) for a flat direction d."""
    sizes = [v.numel() for v in theta.values()]
    unit = direction / direction.norm().clamp_min(1e-30)
    moved = {k: v - step * u.reshape(v.shape) for (k, v), u in zip(theta.items(), unit.split(sizes))}
    return (query_loss_after_adaptation(fn, theta, task, config)
            - query_loss_after_adaptation(fn, moved, task, config))


def candidates(fn, theta, task: Task, config: SolverConfig):
    """Per task: every candidate meta-gradient and the reference, flattened."""
    def solve(curvature: str, phi, b, steps: int):
        product = fn.curvature(curvature, task.support_x, task.support_y)(phi)
        return solve_implicit_system(product, b, replace(config, curvature=curvature, cg_steps=steps))

    flat = lambda p: torch.cat([v.flatten() for v in p.values()])  # noqa: E731
    query_grad = lambda phi: grad_and_value(fn, has_aux=True)(phi, task.query_x, task.query_y)[0]  # noqa: E731
    phi, _ = adapt(fn, theta, task, config)
    b = query_grad(phi)
    exact = solve("hessian", phi, b, config.cg_steps)
    ggn = solve("gauss_newton", phi, b, config.cg_steps)
    reference = unrolled_derivative(fn, theta, task, config)
    return ({"hessian CG (smallest residual)": flat(exact.x), "hessian CG (last iterate)": flat(exact.last),
             "gauss_newton CG": flat(ggn.x), "first-order grad L(phi; Q)": flat(b)},
            flat(reference), exact.returned_start, exact.negative_curvature)


def compare(estimate: torch.Tensor, reference: torch.Tensor):
    """(cosine, relative error) per task."""
    cosine = F.cosine_similarity(estimate, reference, dim=-1)
    error = (estimate - reference).norm(dim=-1) / reference.norm(dim=-1)
    return cosine, error


def summary(values: torch.Tensor) -> str:
    if len(values) == 0:
        return "-"
    q = torch.quantile(values.double(), torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
    return f"{q[1]:.3f} ({q[0]:.3f}-{q[2]:.3f})"


def main(args) -> None:
    torch.manual_seed(0)
    data = OmniglotDataModule(root=args.omniglot_root, ways=args.ways, shots=1, queries=args.queries,
                              download=False)
    sampler = data.make_sampler()
    net = ConvNet(args.ways)
    config = SolverConfig(lam=args.lam, inner_steps=args.inner_steps, inner_lr=args.inner_lr,
                         cg_steps=args.cg_steps)
    cache = ROOT / "benchmarks/results" / f"theta_{args.ways}way_lam{args.lam}_{args.train_steps}steps.pt"
    if cache.is_file():  # a rerun reuses the meta-trained theta
        theta, trained = torch.load(cache), f"loaded from {cache.name}"
    else:
        start = time.perf_counter()
        theta = train_theta(net, sampler, config, args.train_steps, args.meta_batch)
        trained = f"{time.perf_counter() - start:.0f} s"
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(theta, cache)
    fn = TaskLoss(net, F.cross_entropy)
    tasks = sample(sampler, args.tasks, 7)
    per_task = vmap(lambda task: candidates(fn, theta, task, config), chunk_size=args.chunk,
                    randomness="different")
    estimates, reference, stalled, negative = per_task(tasks)
    decrease = {name: vmap(lambda task, d: decrease_along(fn, theta, task, config, d, args.step),
                           chunk_size=args.chunk, randomness="different")(tasks, estimate)
                for name, estimate in estimates.items()}

    print(machine())
    print(f"Omniglot {args.ways}-way 1-shot, {args.queries} queries/class, theta after "
          f"{args.train_steps} meta-steps ({trained}; lam={args.lam}, {args.inner_steps} GD steps "
          f"of {args.inner_lr}, {args.cg_steps} CG steps, meta-batch {args.meta_batch}); {args.tasks} "
          f"meta-training tasks. Hessian CG in {args.cg_steps} steps: negative "
          f"curvature on {int(negative.sum())}/{args.tasks} tasks, x0 returned on "
          f"{int(stalled.sum())}/{args.tasks}.\n")
    header = ["cosine to d/dtheta L(phi_K; Q): median (quartiles)", "relative error",
              f"query-loss decrease after a step of {args.step}: median (quartiles)",
              "tasks where it decreased", "norm / first-order norm: median (max)"]
    first_order = estimates["first-order grad L(phi; Q)"].norm(dim=-1)
    rows = []
    for name, estimate in estimates.items():
        rows.append([name, *row(estimate, reference, decrease[name], torch.ones_like(stalled), first_order)])
    print(markdown_table(["meta-gradient", *header], rows))
    print(f"\nThe {int(stalled.sum())} tasks whose Hessian CG returned x0, by what they could contribute:\n")
    rows = [["zero (x0)", "0", "1.000", "0", "-", "0"]]
    for name in ("first-order grad L(phi; Q)", "hessian CG (last iterate)", "gauss_newton CG"):
        rows.append([name, *row(estimates[name], reference, decrease[name], stalled, first_order)])
    print(markdown_table(["contribution", *header], rows))


def row(estimate, reference, decrease, chosen, first_order_norm) -> list:
    cosine, error = compare(estimate[chosen], reference[chosen])
    share = f"{int((decrease[chosen] > 0).sum())}/{int(chosen.sum())}" if chosen.any() else "-"
    ratio = estimate[chosen].norm(dim=-1) / first_order_norm[chosen]
    ratio = f"{ratio.median():.2f} ({ratio.max():.2f})" if chosen.any() else "-"
    return [summary(cosine), summary(error), summary(decrease[chosen]), share, ratio]


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--omniglot-root", default=OMNIGLOT_ROOT)
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--queries", type=int, default=5)
    parser.add_argument("--lam", type=float, default=0.5)
    parser.add_argument("--inner-steps", type=int, default=10)
    parser.add_argument("--inner-lr", type=float, default=0.3)
    parser.add_argument("--cg-steps", type=int, default=5)
    parser.add_argument("--meta-batch", type=int, default=8)
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--tasks", type=int, default=64)
    parser.add_argument("--step", type=float, default=0.3,
                        help="norm of the step along each candidate (about the norm of Adam's "
                             "first steps at lr 1e-3: docs/studies/implicit_gradient_quality.md)")
    parser.add_argument("--chunk", type=int, default=16, help="tasks vectorized at once")
    main(parser.parse_args())
