"""Seconds per meta-step of real training with the solver eager and compiled (--model.compile_solver).

The shipped Omniglot 5-way 1-shot config (meta-batch 8, 10 inner GD steps, 5 CG steps: a quarter
of the reference meta-batch, so less element-wise work for Inductor to fuse) fit for N
meta-steps eager and compiled, each run its own `python -m imaml_lightning fit` process as a
user runs it, the arms alternating over rounds (eager, compiled, then compiled, eager, ...). Per
arm: the meta-step's time (train/step_seconds, logged every 5 steps, median over the logged
steps after the first 10) and the wall-clock time of the whole command, whose difference between
the arms holds the compilation (the first compiled run compiles with Inductor's cache as it
finds it; later ones find it warm). The latest table, with its date and machine:
docs/benchmarks.md.

Usage: python -m benchmarks.compiled_training [--steps 150] [--rounds 2] [--omniglot-root ...]
       python -m benchmarks.compiled_training --quick   (a tiny network, 15 meta-steps, 1 round)
"""
import argparse
import statistics
import tempfile
from pathlib import Path

from benchmarks.common import OMNIGLOT_ROOT, QUICK_HELP, ROOT, TINY_OMNIGLOT, cli, machine, markdown_table
from benchmarks.table2 import scalars


def fit(root: str, steps: int, compiled: bool, out: Path, extra: list) -> tuple:
    """(wall-clock seconds of the command, [train/step_seconds of the logged steps after 10])."""
    _, wall = cli("fit", "--config", str(ROOT / "configs/omniglot_5way_1shot.yaml"),
                  "--data.root", root, "--trainer.max_steps", str(steps),
                  "--trainer.val_check_interval", str(steps), "--data.init_args.val_episodes", "20",
                  "--trainer.log_every_n_steps", "5", "--checkpoint.dirpath", str(out / "checkpoints"),
                  "--trainer.logger.init_args.save_dir", str(out),
                  "--model.compile_solver", str(compiled).lower(), *extra, workdir=ROOT)
    return wall, scalars(out, "train/step_seconds")[2:]


def main(args) -> None:
    if not (Path(args.omniglot_root) / "images_background").is_dir():
        print(f"skipped: no Omniglot at {args.omniglot_root}")
        return
    results = {False: [], True: []}
    with tempfile.TemporaryDirectory() as folder:
        for round_ in range(args.rounds):
            for compiled in ((False, True) if round_ % 2 == 0 else (True, False)):
                out = Path(folder) / f"{round_}_{compiled}"
                results[compiled].append(fit(args.omniglot_root, args.steps, compiled, out,
                                             TINY_OMNIGLOT if args.quick else []))
    print(f"{machine()}\nOmniglot 5-way 1-shot, shipped config, {args.steps} meta-steps per run, "
          f"{args.rounds} rounds (runs in the order eager, compiled, compiled, eager, ...)\n")
    eager_step = statistics.median(s for _, steps in results[False] for s in steps)
    rows = []
    for compiled, runs in results.items():
        steps = [s for _, run_steps in runs for s in run_steps]
        rows.append(["compiled" if compiled else "eager",
                     f"{statistics.median(steps):.3f} ({min(steps):.3f}-{max(steps):.3f})",
                     f"{statistics.median(steps) / eager_step:.2f}",
                     ", ".join(f"{wall:.0f}" for wall, _ in runs)])
    print(markdown_table(["solver", "meta-step s, median (range)", "/ eager", "wall s of each run"], rows))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, help="per run (default 150; --quick: 15)")
    parser.add_argument("--rounds", type=int, help="default 2 (--quick: 1)")
    parser.add_argument("--omniglot-root", default=OMNIGLOT_ROOT)
    parser.add_argument("--quick", action="store_true", help=QUICK_HELP)
    args = parser.parse_args()
    args.steps = args.steps or (15 if args.quick else 150)  # 15: three logged steps, one after 10
    args.rounds = args.rounds or (1 if args.quick else 2)
    main(args)
