"""What logging costs a training run: seconds per meta-step of Omniglot 5-way 1-shot (the shipped
config, validation off) with the default logging (scalars every 10 steps, charts every 100) and
with logging off (no logger, no charts). Target: <= 3% overhead.

Logging costs the scalars (and the one diagnostic that takes extra compute, the query pass
before adaptation, done only on the steps whose scalars are written), the TensorBoard writes and
the matplotlib charts.
A callback times every step from one on_train_batch_start to the next; the first 20 are warm-up.
Usage: python -m benchmarks.logging_overhead [--omniglot-root ../shared/data/omniglot] [--steps 150] [--rounds 3]
"""
import argparse
import statistics
import tempfile
import time
from pathlib import Path

from pytorch_lightning import Callback

from benchmarks.common import machine, markdown_table
from imaml_lightning.cli import main as cli

ROOT = Path(__file__).resolve().parents[1]
WARMUP = 20


class StepTimer(Callback):
    starts: list = []  # shared with the benchmark that reads them after the run

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        StepTimer.starts.append(time.perf_counter())


def seconds_per_step(root: str, steps: int, *logging_flags) -> float:
    # The command line builds the callback from its class path, i.e. from the imported module,
    # which is not this __main__ module when the file runs with -m.
    from benchmarks.logging_overhead import StepTimer as timer

    timer.starts = []
    with tempfile.TemporaryDirectory() as workdir:
        cli(["fit", "--config", str(ROOT / "configs/omniglot_5way_1shot.yaml"), "--data.root", root,
             "--trainer.max_steps", str(steps), "--trainer.limit_val_batches", "0",
             "--trainer.enable_progress_bar", "false", "--checkpoint.dirpath", workdir,
             "--trainer.default_root_dir", workdir, "--trainer.logger.init_args.save_dir", workdir,
             "--trainer.callbacks+=benchmarks.logging_overhead.StepTimer", *logging_flags])
    gaps = [b - a for a, b in zip(timer.starts[WARMUP:], timer.starts[WARMUP + 1:])]
    return statistics.mean(gaps)  # a mean: the chart steps are rare and slow


ARMS = {
    "off (no logger, no charts)": ("--trainer.logger", "false", "--charts.every_n_steps", "0"),
    "scalars every 10 steps, no charts": ("--charts.every_n_steps", "0"),
    "default (scalars every 10 steps, charts every 100)": (),
}


def main(root: str, steps: int, rounds: int) -> None:
    # Arms alternate round by round: this machine's speed drifts by 20-30% over minutes, which
    # back-to-back runs of one arm would mistake for overhead.
    times = {arm: [] for arm in ARMS}
    for _ in range(rounds):
        for arm, flags in ARMS.items():
            times[arm].append(seconds_per_step(root, steps, *flags))
    off = statistics.median(times["off (no logger, no charts)"])
    print(machine())
    print(f"Omniglot 5w1s, shipped config, validation off; {rounds} alternating rounds of "
          f"{steps - WARMUP - 1} timed meta-steps per arm (mean step, median over rounds)\n")
    rows = []
    for arm, values in times.items():
        median = statistics.median(values)
        rows.append([arm, " / ".join(f"{v:.4f}" for v in values), f"{median:.4f}",
                     f"{100 * (median / off - 1):+.1f}%" if median is not off else "",
                     "<= 3%" if arm.startswith("default") else ""])
    print(markdown_table(["logging", "seconds per meta-step, each round", "median", "overhead",
                          "target"], rows))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--omniglot-root", default=str(ROOT.parent / "shared/data/omniglot"))
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    main(args.omniglot_root, args.steps, args.rounds)
