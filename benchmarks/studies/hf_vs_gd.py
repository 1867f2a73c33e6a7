"""The inner objective G that iMAML-GD and iMAML-HF reach for the same compute.

On real Omniglot 5-way 1-shot tasks with the shipped config's settings (lam 0.5, GD step 0.3,
HF 5 CG steps per Newton direction, Gauss-Newton curvature).

For each solver and number of inner steps: the meta-batch mean of G(phi_K) and ||grad G(phi_K)||
over --tasks tasks (vmapped, as training runs them), and the wall time of that vmapped inner
loop (median of --repeats). At the initialization theta and at a meta-trained one (the theta
that benchmarks/studies/implicit_gradient_quality.py caches: 300 meta-steps). Prints a table and
plots G against seconds (results/hf_vs_gd.png): which solver lowers G more per second is what
decides HF's worth at equal training time.

--ways 20 --checkpoint CKPT: 20-way 1-shot tasks, and the theta of a meta-training checkpoint
(e.g. benchmarks.table2's 20w1s_imaml-gd/checkpoints/best-*.ckpt) in place of the cached one.

The results: docs/studies/hf_vs_gd.md.

Usage: python -m benchmarks.studies.hf_vs_gd [--tasks 16] [--repeats 3] [--ways 5] [--checkpoint CKPT]
"""
import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.func import vmap

from benchmarks.common import OMNIGLOT_ROOT, ROOT, machine, markdown_table
from benchmarks.studies.implicit_gradient_quality import sample
from imaml_lightning.data import OmniglotDataModule
from imaml_lightning.models import ConvNet
from imaml_lightning.solver import SolverConfig
from imaml_lightning.solver.algorithms import adapt
from imaml_lightning.solver.objective import TaskLoss

STEPS = {"gd": (1, 2, 3, 5, 10, 16, 25), "hf": (1, 2, 3, 5, 10)}
THETA = ROOT / "benchmarks/results/theta_5way_lam0.5_300steps.pt"


def inner_loop(net, theta, tasks, solver: str, steps: int, repeats: int):
    """(mean G after, mean ||grad G|| after, mean rejected steps, median seconds)."""
    config = SolverConfig(lam=0.5, inner_solver=solver, inner_steps=steps, inner_lr=0.3,
                          hf_cg_steps=5, curvature="gauss_newton")
    fn = TaskLoss(net, F.cross_entropy)
    run = vmap(lambda task: adapt(fn, theta, task, config)[1], randomness="different")
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        diagnostics = run(tasks)
        seconds.append(time.perf_counter() - start)
    return (diagnostics["inner_objective_after"].mean().item(),
            diagnostics["inner_grad_norm"].mean().item(),
            diagnostics["inner_rejected_steps"].mean().item(), statistics.median(seconds))


def main(args) -> None:
    torch.manual_seed(0)
    data = OmniglotDataModule(root=args.omniglot_root, ways=args.ways, shots=1, queries=5,
                              download=False)
    tasks = sample(data.make_sampler(), args.tasks, 11)
    net = ConvNet(args.ways)
    thetas = {"initialization": {k: v.detach() for k, v in net.named_parameters()}}
    if args.checkpoint:
        state = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
        step = state["global_step"]
        thetas[f"meta-trained ({step} steps)"] = {
            k.removeprefix("net."): v for k, v in state["state_dict"].items() if k.startswith("net.")}
    elif THETA.is_file() and args.ways == 5:
        thetas["meta-trained (300 steps)"] = torch.load(THETA)
    rows, curves = [], {}
    for name, theta in thetas.items():
        for solver, counts in STEPS.items():
            points = []
            for steps in counts:
                value, norm, rejected, seconds = inner_loop(net, theta, tasks, solver, steps, args.repeats)
                rows.append([name, solver, steps, f"{seconds:.2f}", f"{value:.4f}", f"{norm:.4f}",
                             f"{rejected:.2f}"])
                points.append((seconds, value))
                print(rows[-1], flush=True)
            curves[f"{solver}, {name}"] = points
    print(f"\n{machine()}\nOmniglot {args.ways}-way 1-shot meta-training tasks: {args.tasks}, vmapped; "
          f"lam 0.5, Gauss-Newton curvature; GD step 0.3; HF 5 CG steps per direction\n")
    print(markdown_table(["theta", "inner solver", "steps", "seconds (all tasks)", "mean G after",
                          "mean ||grad G|| after", "mean rejected steps"], rows))
    plot(curves, Path(args.out))


def plot(curves: dict, path: Path) -> None:
    from imaml_lightning.charts import new_figure

    figure = new_figure(6, 4)
    axes = figure.subplots()
    for label, points in curves.items():
        seconds, values = zip(*points)
        axes.plot(seconds, values, "o-" if label.startswith("gd") else "s--", markersize=3, label=label)
    axes.set(xlabel="seconds for the meta-batch's inner loops", ylabel="mean G(phi_K)", yscale="log",
             title="inner objective per second: GD vs HF")
    axes.legend(fontsize=7)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    print(f"plot: {path}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--omniglot-root", default=OMNIGLOT_ROOT)
    parser.add_argument("--tasks", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ways", type=int, default=5, choices=[5, 20])
    parser.add_argument("--checkpoint", help="a fit checkpoint whose theta to start from")
    parser.add_argument("--out", help="default: benchmarks/results/hf_vs_gd[_20way].png")
    args = parser.parse_args()
    args.out = args.out or str(ROOT / "benchmarks/results" /
                               ("hf_vs_gd.png" if args.ways == 5 else f"hf_vs_gd_{args.ways}way.png"))
    main(args)
