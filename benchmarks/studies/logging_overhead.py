"""What logging costs a training run: seconds per meta-step with the default logging and with none.

Omniglot 5-way 1-shot (the shipped config, validation off) with the default logging (scalars
every 10 steps, charts every 100) and with logging off (no logger, no charts). Target: <= 3%
overhead.

Logging costs the scalars (and the one diagnostic that takes extra compute, the query pass
before adaptation, done only on the steps whose scalars are written), the TensorBoard writes and
the matplotlib charts.
A callback times every step from one on_train_batch_start to the next; the first 20 are warm-up.
Runs of one arm can differ by more than the target on a machine whose speed drifts
(docs/studies/logging_overhead.md), so a last run also times the logging code itself inside a
default run (`instrumented`): the seconds spent in it per step, against that run's step time.

Usage: python -m benchmarks.studies.logging_overhead [--omniglot-root ../shared/data/omniglot]
       [--steps 220] [--rounds 2]
"""
import argparse
import statistics
import tempfile
import time

from pytorch_lightning import Callback

from benchmarks.common import OMNIGLOT_ROOT, ROOT, machine, markdown_table
from imaml_lightning.cli import main as cli

WARMUP = 20


class StepTimer(Callback):
    starts: list = []  # shared with the benchmark that reads them after the run

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        StepTimer.starts.append(time.perf_counter())


def seconds_per_step(root: str, steps: int, *logging_flags) -> float:
    # The command line builds the callback from its class path, i.e. from the imported module,
    # which is not this __main__ module when the file runs with -m.
    from benchmarks.studies.logging_overhead import StepTimer as timer

    timer.starts = []
    with tempfile.TemporaryDirectory() as workdir:
        cli(["fit", "--config", str(ROOT / "configs/omniglot_5way_1shot.yaml"), "--data.root", root,
             "--trainer.max_steps", str(steps), "--trainer.limit_val_batches", "0",
             "--trainer.enable_progress_bar", "false", "--checkpoint.dirpath", workdir,
             "--trainer.default_root_dir", workdir, "--trainer.logger.init_args.save_dir", workdir,
             "--trainer.callbacks+=benchmarks.studies.logging_overhead.StepTimer", *logging_flags])
    gaps = [b - a for a, b in zip(timer.starts[WARMUP:], timer.starts[WARMUP + 1:])]
    return statistics.mean(gaps)  # a mean: the chart steps are rare and slow


ARMS = {
    "off (no logger, no charts)": ("--trainer.logger", "false", "--charts.every_n_steps", "0"),
    "scalars every 10 steps, no charts": ("--charts.every_n_steps", "0"),
    "default (scalars every 10 steps, charts every 100)": (),
}


def logging_code():
    """(owner, attribute) of every function that does logging work, and nothing else."""
    from pytorch_lightning.loggers import TensorBoardLogger

    from imaml_lightning.charts import TrainingCharts
    from imaml_lightning.module import IMAML
    from imaml_lightning.solver import batched

    return [(batched, "query_loss_before_adaptation"), (IMAML, "log_training"),
            (IMAML, "score_after_adaptation"), (IMAML, "log_progress"),
            (TrainingCharts, "on_train_batch_end"),
            (TensorBoardLogger, "log_metrics")]


def instrumented(root: str, steps: int):
    """Seconds per step of a default run, and {logging function: its seconds per step}."""
    spent = {}

    def timed(name, function):
        def run(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                spent[name] = spent.get(name, 0.0) + time.perf_counter() - start
        return run

    originals = [(owner, name, getattr(owner, name)) for owner, name in logging_code()]
    for owner, name, function in originals:
        setattr(owner, name, timed(f"{owner.__name__.rsplit('.', 1)[-1]}.{name}", function))
    try:
        step = seconds_per_step(root, steps)
    finally:
        for owner, name, function in originals:
            setattr(owner, name, function)
    return step, {name: seconds / steps for name, seconds in spent.items()}


def ab_table(root: str, steps: int, rounds: int) -> None:
    # Arms alternate round by round: a shared machine's speed drifts over minutes, which
    # back-to-back runs of one arm would mistake for overhead (docs/studies/logging_overhead.md).
    times = {arm: [] for arm in ARMS}
    for _ in range(rounds):
        for arm, flags in ARMS.items():
            times[arm].append(seconds_per_step(root, steps, *flags))
    baseline = next(iter(ARMS))
    off = statistics.median(times[baseline])
    print(f"Omniglot 5w1s, shipped config, validation off; {rounds} alternating rounds of "
          f"{steps - WARMUP - 1} timed meta-steps per arm (mean step, median over rounds)\n")
    rows = []
    for arm, values in times.items():
        median = statistics.median(values)
        rows.append([arm, " / ".join(f"{v:.4f}" for v in values), f"{median:.4f}",
                     f"{100 * (median / off - 1):+.1f}%" if arm != baseline else "",
                     "<= 3%" if arm.startswith("default") else ""])
    print(markdown_table(["logging", "seconds per meta-step, each round", "median", "overhead",
                          "target"], rows))


def main(root: str, steps: int, rounds: int) -> None:
    print(machine())
    if rounds:
        ab_table(root, steps, rounds)
    step, spent = instrumented(root, steps)
    print(f"\nInside a default run ({step:.4f} s per meta-step): time in logging code\n")
    rows = [[name, f"{seconds * 1e3:.2f}", f"{100 * seconds / step:.2f}%", ""]
            for name, seconds in spent.items()]
    total = sum(spent.values())
    rows.append(["all logging code", f"{total * 1e3:.2f}", f"{100 * total / step:.2f}%", "<= 3%"])
    print(markdown_table(["function", "ms per meta-step", "share of the step", "target"], rows))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--omniglot-root", default=OMNIGLOT_ROOT)
    parser.add_argument("--steps", type=int, default=220)
    parser.add_argument("--rounds", type=int, default=2, help="0: only the instrumented run")
    args = parser.parse_args()
    main(args.omniglot_root, args.steps, args.rounds)
