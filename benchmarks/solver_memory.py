"""Peak memory of one meta-gradient against the inner steps K, for iMAML and MAML.

iMAML's implicit gradient should stay flat in K, MAML's backpropagation through the unrolled loop
grow with it; on one Omniglot 20-way 5-shot task with the conv-4.

Each measurement runs in a fresh process: peak resident memory (ru_maxrss) minus the resident
memory just before the meta-gradient, so imports, the network and the data do not count (kernel
workspaces created by the first call do, equally for every K). A process is capped at
--limit-gib of address space: a run that needs more is reported as out of memory. The latest
table, with its date and machine: docs/benchmarks.md.

Usage: python -m benchmarks.solver_memory [--steps 5 25 100 200] [--plot benchmarks/results/solver_memory.png]
       python -m benchmarks.solver_memory --quick   (K = 1 only, the plot in a temporary folder)
"""
import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import QUICK_HELP, machine, markdown_table, omniglot_shaped_tasks, save_line_plot
from imaml_lightning.models import ConvNet
from imaml_lightning.solver import SolverConfig, meta_gradient

WAYS, SHOTS, QUERIES = 20, 5, 5


def resident_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


def measure_one(algorithm: str, steps: int) -> dict:
    torch.manual_seed(0)
    net = ConvNet(WAYS)
    tasks = omniglot_shaped_tasks(1, WAYS, SHOTS, QUERIES)
    config = SolverConfig(algorithm=algorithm, lam=2.0, inner_steps=steps, inner_lr=0.1, cg_steps=5)
    before = resident_mib()
    try:
        meta_gradient(net, dict(net.named_parameters()), tasks, F.cross_entropy, config)
    except (MemoryError, RuntimeError) as error:  # the address-space cap was hit
        if "alloc" not in str(error) and not isinstance(error, MemoryError):
            raise
        return {"algorithm": algorithm, "steps": steps, "peak_mib": None}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"algorithm": algorithm, "steps": steps, "peak_mib": peak - before}


def measure_in_subprocess(algorithm: str, steps: int, limit_gib: float) -> dict:
    limit = int(limit_gib * 2**30)
    cap = lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit))  # noqa: E731
    out = subprocess.run([sys.executable, "-m", "benchmarks.solver_memory", "--one", algorithm,
                          str(steps)], capture_output=True, text=True, preexec_fn=cap)
    if out.returncode == 0:
        return json.loads(out.stdout.strip().splitlines()[-1])
    if out_of_memory(out):  # an allocation failed outside the guarded call, or the OOM killer
        return {"algorithm": algorithm, "steps": steps, "peak_mib": None}
    raise RuntimeError(f"the measurement of {algorithm} at K={steps} crashed (exit "
                       f"{out.returncode}), not for lack of memory:\n{out.stderr[-3000:]}")


def out_of_memory(run: subprocess.CompletedProcess) -> bool:
    """Whether a measuring subprocess died for memory: a failed allocation, or SIGKILL."""
    signs = ("MemoryError", "Cannot allocate memory", "DefaultCPUAllocator: can't allocate",
             "std::bad_alloc")
    return run.returncode == -9 or any(sign in run.stderr for sign in signs)


def cell(value, reference) -> list:
    if value is None:
        return ["out of memory", ""]
    return [f"{value:.0f}", f"{value / reference:.2f}x" if reference else ""]


def main(steps, plot, limit_gib):
    rows = []
    for algorithm in ("imaml", "maml"):
        for k in steps:
            rows.append(measure_in_subprocess(algorithm, k, limit_gib))
            print(rows[-1], flush=True)
    print(machine())
    print(f"one Omniglot {WAYS}-way {SHOTS}-shot task, conv-4 (64 channels), {QUERIES} queries/class\n")
    by = {(r["algorithm"], r["steps"]): r["peak_mib"] for r in rows}
    table = [[k, *cell(by["imaml", k], by["imaml", steps[0]]), *cell(by["maml", k], by["maml", steps[0]])]
             for k in steps]
    print(markdown_table(["inner steps K", "iMAML peak MiB", f"vs K={steps[0]}",
                          "MAML peak MiB", f"vs K={steps[0]}"], table))
    print(f"\ntarget: iMAML at K={steps[-1]} <= 1.1x its K={steps[0]} peak; "
          f"address space capped at {limit_gib:g} GiB per run")
    if plot:  # out-of-memory runs are left off the curve
        nan = float("nan")
        save_line_plot(plot, steps, {a: [nan if by[a, k] is None else by[a, k] for k in steps]
                                     for a in ("imaml", "maml")},
                       "inner steps K", "peak memory of one meta-gradient (MiB)",
                       f"Omniglot {WAYS}-way {SHOTS}-shot, conv-4")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, nargs="+", help="default 5 25 100 200 (--quick: 1)")
    parser.add_argument("--plot", help="default: benchmarks/results/solver_memory.png ('' for none; "
                                       "--quick: a temporary folder)")
    parser.add_argument("--limit-gib", type=float, default=20.0)
    parser.add_argument("--one", nargs=2, metavar=("ALGORITHM", "STEPS"))
    parser.add_argument("--quick", action="store_true", help=QUICK_HELP)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure_one(args.one[0], int(args.one[1]))))
    elif args.quick:
        with tempfile.TemporaryDirectory() as folder:
            main(args.steps or [1], Path(folder) / "solver_memory.png" if args.plot is None else args.plot,
                 args.limit_gib)
    else:
        main(args.steps or [5, 25, 100, 200],
             "benchmarks/results/solver_memory.png" if args.plot is None else args.plot, args.limit_gib)
