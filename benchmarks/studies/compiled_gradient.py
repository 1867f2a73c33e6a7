"""Seconds of the vmapped support gradient eager, under torch.compile, and written by hand.

The kernel the inner loop calls K + 1 times per meta-iteration, in the reference configuration
of `benchmarks.solver_speed`
(32 Omniglot-shaped 5-way 1-shot tasks with their own parameters, conv-4). `hvp_variants` times
its variants one after another, and between two days eager and compiled swapped places there;
this alternates the arms over rounds in one process and reports the median ratio and range.
A third arm is an experiment: BatchNorm with its own vmap rule (benchmarks/studies/batch_norm_rule.py),
which runs the native kernel on task-channels where vmap decomposes it; its gradient is
checked against nn.BatchNorm2d's in float64. Two more arms bound what a per-task gradient costs
here: the conv-4 written by hand for a leading task dimension, without vmap
(hvp_variants.task_batched_loss: grouped convolutions and BatchNorm over task-channels, nothing
moved between layers; its gradient checked against vmap's in float64), eager and compiled; and
the unit of every floor in `benchmarks.solver_speed`, a dense pass: the same 160 images through
one network (shared weights: ungrouped convolutions). "passes" divides each arm's time by the
dense pass of the same round. The results: docs/studies/compiled_gradient.md.

Usage: python -m benchmarks.studies.compiled_gradient [--rounds 9]
"""
import argparse
import statistics
import time
from functools import partial

import torch
from torch.func import grad, vmap

from benchmarks.common import alternating_rounds, machine, markdown_table, median_seconds, omniglot_shaped_tasks
from benchmarks.solver_speed import K, META_BATCH, QUERIES, SHOTS, WAYS, perturbed
from benchmarks.studies.batch_norm_rule import with_batch_norm_rule
from benchmarks.studies.hvp_variants import loss_of, relative_error, task_batched_gradient
from imaml_lightning.models import ConvNet


def main(rounds: int) -> None:
    torch.manual_seed(0)
    net = ConvNet(WAYS)
    tasks = omniglot_shaped_tasks(META_BATCH, WAYS, SHOTS, QUERIES)
    phi = perturbed(dict(net.named_parameters()))
    ruled = with_batch_norm_rule(net)
    dense = grad(loss_of(net))
    theta = {k: v.detach() for k, v in net.named_parameters()}
    arms = {"eager (shipped)": vmap(grad(loss_of(net))),
            "torch.compile": torch.compile(vmap(grad(loss_of(net)))),
            "BatchNorm with its own vmap rule": vmap(grad(loss_of(ruled))),
            "task-batched conv-4 by hand, no vmap": task_batched_gradient,
            "task-batched conv-4 by hand, torch.compile": torch.compile(task_batched_gradient),
            # one network for the 160 images: a pass, the floors' unit
            "dense pass (shared weights)": lambda _, x, y: dense(theta, x.flatten(0, 1), y.flatten())}
    errors = {name: relative_difference(arms["eager (shipped)"], arms[name], phi, tasks)
              for name in ("BatchNorm with its own vmap rule", "task-batched conv-4 by hand, no vmap")}
    compile_seconds = {}
    for name in ("torch.compile", "task-batched conv-4 by hand, torch.compile"):
        start = time.perf_counter()
        arms[name](phi, tasks.support_x, tasks.support_y)
        compile_seconds[name] = time.perf_counter() - start
    times = alternating_rounds({name: partial(median_seconds, partial(gradient, phi, tasks.support_x,
                                                                     tasks.support_y))
                                for name, gradient in arms.items()}, rounds)
    eager, passes = times["eager (shipped)"], times["dense pass (shared weights)"]
    first_calls = ", ".join(f"{name} {s:.1f} s" for name, s in compile_seconds.items())
    differences = ", ".join(f"{name} {e:.1e}" for name, e in errors.items())
    print(f"{machine()}\n{META_BATCH} tasks, {WAYS}-way {SHOTS}-shot, {rounds} alternating rounds "
          f"(median of 5 calls each); first calls (compilation): {first_calls}; gradients' relative "
          f"difference to the shipped one (float64): {differences}\n")
    rows = []
    for name, t in times.items():
        ratios = [a / e for a, e in zip(t, eager)]
        in_passes = [a / p for a, p in zip(t, passes)]  # within each round
        saved = (1 - statistics.median(ratios)) * (K + 1) * statistics.median(eager)
        rows.append([name, f"{1e3 * statistics.median(t):.1f}", f"{1e3 * min(t):.1f}-{1e3 * max(t):.1f}",
                     f"{statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f})",
                     f"{statistics.median(in_passes):.2f} ({min(in_passes):.2f}-{max(in_passes):.2f})",
                     f"{1e3 * saved:.0f}"])
    print(markdown_table(["gradient", "ms per call, median", "range", "/ eager, median (range)",
                          "passes, median (range)",
                          f"ms saved over the {K + 1} gradients of a meta-iteration"], rows))


def relative_difference(reference, other, phi, tasks) -> float:
    """||other - reference|| / ||reference|| of the two gradients, in float64 (the networks hold
    no buffers: float64 parameters and images make the whole computation float64)."""
    phi = {k: v.double() for k, v in phi.items()}
    x = tasks.support_x.double()
    return relative_error([other(phi, x, tasks.support_y)], [reference(phi, x, tasks.support_y)])


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=9)
    main(parser.parse_args().rounds)
