"""Test accuracy of each curvature after the same CPU time of meta-training.

The shipped Omniglot 5-way 1-shot config meta-trained for the same wall time with each
(curvature, CG steps) arm, then tested on its best checkpoint by validation accuracy (600 fixed
test episodes, mean ± 95% CI).

Each arm's cosine schedule must end with its budget, and a faster arm takes more meta-steps in the
same time, so each arm first times 30 meta-steps (train/step_seconds, median) and is then given
max_steps = --minutes of steps at that speed, less 10% for validation; --trainer.max_time stops
it at --minutes all the same. Everything else is the shipped config and seed 0. The results:
docs/studies/curvature_at_equal_time.md.

Usage: python -m benchmarks.studies.curvature_at_equal_time [--minutes 8]
       [--arms hessian:5 gauss_newton:5 gauss_newton:10]
"""
import argparse
import shutil
import statistics
import tempfile
from pathlib import Path

from benchmarks.common import OMNIGLOT_ROOT, ROOT, cli, machine, markdown_table, step_seconds


def arm_flags(root: str, curvature: str, cg_steps: int) -> list:
    return ["--config", str(ROOT / "configs/omniglot_5way_1shot.yaml"), "--data.root", root,
            "--model.solver.curvature", curvature, "--model.solver.cg_steps", str(cg_steps), "--seed_everything", "0"]


def calibrate(flags: list) -> float:
    """Median seconds per meta-step of this arm (30 steps, no validation)."""
    with tempfile.TemporaryDirectory() as workdir:
        cli("fit", *flags, "--trainer.max_steps", "30", "--trainer.val_check_interval", "30",
            "--data.init_args.val_episodes", "8", "--trainer.log_every_n_steps", "1",
            workdir=Path(workdir))
        return statistics.median(step_seconds(Path(workdir) / "lightning_logs"))


def run_arm(flags: list, minutes: float, out: Path) -> list:
    seconds = calibrate(flags)
    steps = int(0.9 * minutes * 60 / seconds)
    shutil.rmtree(out, ignore_errors=True)  # a fresh run: no checkpoint of an earlier one
    out.mkdir(parents=True)
    hours, rest = divmod(int(minutes * 60), 3600)
    scores, wall = cli("fit", *flags, "--trainer.max_steps", str(steps),
                       "--trainer.val_check_interval", str(max(1, steps // 6)),
                       "--trainer.max_time", f"00:{hours:02d}:{rest // 60:02d}:{rest % 60:02d}",
                       workdir=out)
    (best,) = (out / "checkpoints").glob("best-step*.ckpt")
    (test,), _ = cli("test", *flags, "--ckpt_path", str(best), workdir=out)
    val = max((m for m in scores if m[0] == "val"), key=lambda m: float(m[2]))
    return [f"{seconds:.3f}", str(steps), f"{wall / 60:.1f}", f"{val[2]}% (step {val[5]})",
            f"**{test[2]} ± {test[3]}%**"]


def main(args) -> None:
    rows = []
    for arm in args.arms:
        curvature, cg_steps = arm.split(":")
        out = Path(args.out) / f"{curvature}_cg{cg_steps}"
        rows.append([curvature, cg_steps, *run_arm(arm_flags(args.omniglot_root, curvature,
                                                              int(cg_steps)), args.minutes, out)])
    print(f"\n{machine()}")
    print(f"Omniglot 5-way 1-shot, configs/omniglot_5way_1shot.yaml, seed 0, {args.minutes} minutes "
          f"of meta-training per arm (cosine schedule over each arm's steps), test on the best "
          f"checkpoint by val acc\n")
    print(markdown_table(["curvature", "CG steps", "s per meta-step", "meta-steps", "fit minutes",
                          "best val acc", "test acc (600 episodes)"], rows))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, default=8)
    parser.add_argument("--arms", nargs="+", default=["hessian:5", "gauss_newton:5", "gauss_newton:10"])
    parser.add_argument("--omniglot-root", default=OMNIGLOT_ROOT)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/curvature_at_equal_time"))
    main(parser.parse_args())
