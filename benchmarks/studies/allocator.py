"""Kernel times with glibc's malloc defaults and with the thresholds the command line sets.

The thresholds: imaml_lightning/allocator.py.

Each arm runs in its own process (the thresholds are per process and must be set before the
first large allocation): IMAML_SYSTEM_MALLOC=1 keeps glibc's defaults. Each process times one
batched forward+backward pass of the Omniglot conv-4 on 160 images and one vmapped support
gradient of 32 tasks (medians of 20 and 10 runs); the arms alternate over --rounds rounds. The
results: docs/studies/allocator.md.

Usage: python -m benchmarks.studies.allocator [--rounds 3]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

from benchmarks.common import machine, markdown_table

ARMS = {"glibc defaults (IMAML_SYSTEM_MALLOC=1)": "1", "thresholds raised (default)": "0"}

MEASURE = """
import json, torch, torch.nn.functional as F
from benchmarks.common import median_seconds, omniglot_shaped_tasks
from benchmarks.solver_speed import vectorized_gradient_seconds
from imaml_lightning.models import ConvNet
net = ConvNet(5)
tasks = omniglot_shaped_tasks(32, 5, 1, 1)
x, y = tasks.support_x.flatten(0, 1), tasks.support_y.flatten()
def forward_backward():
    net.zero_grad()
    F.cross_entropy(net(x), y).backward()
print(json.dumps([median_seconds(forward_backward, 20, 3),
                  vectorized_gradient_seconds(net, dict(net.named_parameters()), tasks)]))
"""


def measure(flag: str) -> list:
    env = {**os.environ, "IMAML_SYSTEM_MALLOC": flag}
    run = subprocess.run([sys.executable, "-c", MEASURE], env=env, capture_output=True,
                         text=True, check=True)
    return json.loads(run.stdout.strip().splitlines()[-1])


def main(rounds: int) -> None:
    times = {arm: [] for arm in ARMS}
    for _ in range(rounds):
        for arm, flag in ARMS.items():
            times[arm].append(measure(flag))
    rows = []
    for arm, runs in times.items():
        passes, gradients = zip(*runs)
        rows.append([arm, f"{1000 * statistics.median(passes):.1f} ({1000 * min(passes):.1f}-"
                          f"{1000 * max(passes):.1f})",
                     f"{1000 * statistics.median(gradients):.1f} ({1000 * min(gradients):.1f}-"
                     f"{1000 * max(gradients):.1f})"])
    print(machine())
    print(f"{rounds} alternating rounds, one process per arm and round; median (range) in ms\n")
    print(markdown_table(["malloc", "forward+backward, 160 images", "vmapped support gradient, 32 tasks"],
                         rows))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    main(parser.parse_args().rounds)
