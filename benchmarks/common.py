"""Shared pieces of the benchmarks and the studies: the repository's paths, the command line run
as a user runs it, synthetic Omniglot-shaped tasks, timers, tables and plots."""
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch

from imaml_lightning.allocator import keep_freed_memory

from imaml_lightning.solver import Task

keep_freed_memory()  # as the command line does (see imaml_lightning/allocator.py)

ROOT = Path(__file__).resolve().parents[1]
# The default places of the data and of the authors' code: beside this repository (every script
# takes a flag for its own folder).
OMNIGLOT_ROOT = str(ROOT.parent / "shared/data/omniglot")
PEER_ROOT = str(ROOT.parent / "shared/peers/imaml_dev")
# What the --quick forms add to a shipped Omniglot config: seconds per meta-step on any CPU (an
# 8-channel conv-4, 2 inner and 2 CG steps, 2 tasks per meta-batch, few evaluation episodes).
TINY_OMNIGLOT = ["--model.net.init_args.hidden", "8", "--model.solver.inner_steps", "2",
                 "--model.solver.cg_steps", "2", "--data.init_args.meta_batch_size", "2",
                 "--data.init_args.val_episodes", "4", "--data.init_args.test_episodes", "8"]
QUICK_HELP = "CI-light: tiny sizes and one round, to check that the script runs (its numbers mean nothing)"
SCORE = re.compile(r"(val|test)/(mse|acc) = ([0-9.]+) ± ([0-9.e-]+)(%?) \(95% CI\) after (\d+)")


def cli(*args, workdir):
    """Run one command of the command line as a user does, echoing it; returns (score line
    matches, seconds)."""
    command = [sys.executable, "-m", "imaml_lightning", *args,
               "--trainer.enable_progress_bar", "false"]
    print("$", " ".join(command), flush=True)
    start = time.time()
    run = subprocess.run(command, cwd=workdir, capture_output=True, text=True,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if run.returncode:
        sys.exit(run.stdout[-3000:] + run.stderr[-3000:])
    matches = SCORE.findall(run.stdout + run.stderr)
    for m in matches:
        print("   ", f"{m[0]}/{m[1]} = {m[2]} ± {m[3]}{m[4]} after {m[5]} steps", flush=True)
    return matches, time.time() - start


def step_seconds(logdir: Path) -> list:
    """The train/step_seconds scalars of the one run logged under logdir, after its first 5 steps."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = {p.parent for p in logdir.rglob("events.out.tfevents.*")}
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    return [e.value for e in accumulator.Scalars("train/step_seconds") if e.step >= 5]


def omniglot_shaped_tasks(tasks: int, ways: int, shots: int, queries: int, seed: int = 0) -> Task:
    """Random 28x28 tasks: compute cost does not depend on the pixels, only on the shapes."""
    g = torch.Generator().manual_seed(seed)
    images = lambda n: torch.rand(tasks, n, 1, 28, 28, generator=g)  # noqa: E731
    labels = lambda k: torch.arange(ways).repeat_interleave(k).expand(tasks, -1).contiguous()  # noqa: E731
    return Task(images(ways * shots), labels(shots), images(ways * queries), labels(queries))


def seconds_of_one_call(fn):
    """A timer for alternating_rounds: () -> the seconds one call of fn takes."""
    def timer() -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    return timer


def alternating_rounds(timers: dict, rounds: int) -> dict:
    """{name: [seconds per round]}: every timer (() -> seconds) once per round, in an order
    reversed every other round, so that neither the machine's drift nor an arm's place in the
    order favours an arm; ratios are best taken within a round."""
    times = {name: [] for name in timers}
    for round_ in range(rounds):
        for name in (list(timers) if round_ % 2 == 0 else list(timers)[::-1]):
            times[name].append(timers[name]())
    return times


def median_seconds(fn, repeats: int = 5, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cpu_model() -> str:
    """The CPU's model name (Linux), else the architecture."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine()
    return next((line.split(":", 1)[1].strip() for line in info.splitlines()
                 if line.startswith("model name")), platform.machine())


def machine() -> str:
    return (f"{date.today()}, {cpu_model()}, {os.cpu_count()} CPU cores, "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads")


def markdown_table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def save_line_plot(path: str, x, series: dict, xlabel: str, ylabel: str, title: str,
                   log_y: bool = False) -> None:
    """One PNG with a line per entry of `series` ({label: y values})."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for label, y in series.items():
        ax.plot(x, y, "o-", label=label)
    if log_y:
        ax.set_yscale("log")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    if len(series) > 1:
        ax.legend()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")
