"""Is torch.compile of the vmapped support gradient faster than eager? The kernel the inner loop
calls K + 1 times per meta-iteration, in the reference configuration of `benchmarks.solver_speed`
(32 Omniglot-shaped 5-way 1-shot tasks with their own parameters, conv-4). `hvp_variants` times
its variants one after another, and between two days eager and compiled swapped places there;
this alternates the two arms over rounds in one process and reports the median ratio and range.

Usage: python -m benchmarks.compiled_gradient [--rounds 9]
"""
import argparse
import statistics
import time

import torch
from torch.func import grad, vmap

from benchmarks.common import machine, markdown_table, median_seconds, omniglot_shaped_tasks
from benchmarks.hvp_variants import loss_of
from benchmarks.solver_speed import K, META_BATCH, QUERIES, SHOTS, WAYS, perturbed
from imaml_lightning.models import ConvNet


def main(rounds: int) -> None:
    torch.manual_seed(0)
    net = ConvNet(WAYS)
    tasks = omniglot_shaped_tasks(META_BATCH, WAYS, SHOTS, QUERIES)
    phi = perturbed(dict(net.named_parameters()))
    arms = {"eager (shipped)": vmap(grad(loss_of(net))),
            "torch.compile": torch.compile(vmap(grad(loss_of(net))))}
    start = time.perf_counter()
    arms["torch.compile"](phi, tasks.support_x, tasks.support_y)
    compile_seconds = time.perf_counter() - start
    times = {name: [] for name in arms}
    for round_ in range(rounds):
        for name in (list(arms) if round_ % 2 == 0 else list(arms)[::-1]):
            times[name].append(median_seconds(lambda: arms[name](phi, tasks.support_x, tasks.support_y)))
    ratios = [c / e for e, c in zip(*times.values())]
    print(f"{machine()}\n{META_BATCH} tasks, {WAYS}-way {SHOTS}-shot, {rounds} alternating rounds "
          f"(median of 5 calls each); compile took {compile_seconds:.1f} s\n")
    print(markdown_table(["gradient", "ms per call, median", "range"], [
        [name, f"{1e3 * statistics.median(t):.1f}", f"{1e3 * min(t):.1f}-{1e3 * max(t):.1f}"]
        for name, t in times.items()]))
    saved = (1 - statistics.median(ratios)) * (K + 1) * statistics.median(times["eager (shipped)"])
    print(f"\ncompiled / eager: median {statistics.median(ratios):.3f}, range {min(ratios):.3f}-"
          f"{max(ratios):.3f}; over the {K + 1} gradients of a meta-iteration: {1e3 * saved:.0f} ms")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=9)
    main(parser.parse_args().rounds)
