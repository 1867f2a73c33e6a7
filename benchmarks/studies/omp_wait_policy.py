"""Seconds per meta-step with OpenMP's default wait policy and with OMP_WAIT_POLICY=PASSIVE.

In one process and in two DDP processes (gloo) on this machine.

OpenMP threads that finish their share of an operation spin, waiting for the next one (libgomp's
default spins for a while before sleeping). Where two processes share the cores (DDP on one CPU
host, or another job on the machine), one process's spinning threads take the cycles the other's
working threads need. PASSIVE makes them sleep at once. The command line leaves OpenMP's default
(why: docs/studies/omp_wait_policy.md); this study starts `python -m imaml_lightning.cli` with
and without the variable.

Each arm is a `fit` of the shipped Omniglot 5-way 1-shot config for --steps meta-steps; the time
per meta-step is the median of the train/step_seconds scalars (rank 0; the meta-step without data
loading) over the logged steps after the first 5. The arms alternate over --rounds rounds. The
results: docs/studies/omp_wait_policy.md.

Usage: python -m benchmarks.studies.omp_wait_policy [--steps 60] [--rounds 2]
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import OMNIGLOT_ROOT, ROOT, machine, markdown_table, step_seconds

ARMS = {  # name: (processes, OMP_WAIT_POLICY or None for the library's default)
    "1 process, default": (1, None), "1 process, PASSIVE": (1, "PASSIVE"),
    "2 DDP processes, default": (2, None), "2 DDP processes, PASSIVE": (2, "PASSIVE"),
}


def run_arm(processes: int, policy, root: str, steps: int) -> list:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["PYTHONWARNINGS"] = "ignore"
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    with tempfile.TemporaryDirectory() as workdir:
        command = [sys.executable, "-m", "imaml_lightning.cli", "fit",
                   "--config", str(ROOT / "configs/omniglot_5way_1shot.yaml"), "--data.root", root,
                   "--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(steps),
                   "--data.init_args.val_episodes", "8", "--trainer.log_every_n_steps", "1",
                   "--charts.every_n_steps", "0", "--trainer.enable_progress_bar", "false",
                   "--trainer.accelerator", "cpu", "--trainer.devices", str(processes)]
        if processes > 1:
            command += ["--trainer.strategy", "ddp"]
        run = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True)
        if run.returncode:
            sys.exit(run.stdout[-2000:] + run.stderr[-3000:])
        return step_seconds(Path(workdir) / "lightning_logs")


def main(args) -> None:
    seconds = {name: [] for name in ARMS}
    for _ in range(args.rounds):
        for name, (processes, policy) in ARMS.items():
            seconds[name] += run_arm(processes, policy, args.omniglot_root, args.steps)
    print(machine())
    print(f"Omniglot 5-way 1-shot shipped config (meta-batch 8: 4 tasks per process with 2), "
          f"{args.steps} meta-steps per fit, {args.rounds} alternating rounds; seconds per "
          f"meta-step on rank 0 (train/step_seconds), median and quartiles over the logged steps\n")
    rows = []
    for name, values in seconds.items():
        q = statistics.quantiles(values, n=4)
        default = statistics.median(seconds[name.replace("PASSIVE", "default")])
        rows.append([name, f"{statistics.median(values):.3f}", f"{q[0]:.3f}-{q[2]:.3f}",
                     f"{default / statistics.median(values):.2f}x"])
    print(markdown_table(["arm", "s per meta-step (median)", "quartiles", "speed-up over default"],
                         rows))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--omniglot-root", default=OMNIGLOT_ROOT)
    main(parser.parse_args())
