"""Everything a GPU machine has to show, in one command of at most 8 minutes:

    python -m benchmarks.device_check [--out benchmarks/results/device_check.md]

It prints one Markdown table and writes it to --out:

- the machine: GPU model, torch, CUDA and cuDNN versions;
- the tests that take the device fixture, on the GPU (`pytest tests/solver
  tests/test_predict.py -m device --device cuda`: the solver's closed forms in float64, finite
  differences, the vectorized solver against its per-task loop, autocast with BatchNorm; predict);
- a 5-way 1-shot fit on 1 GPU (the shipped Omniglot config): meta-steps/s, tasks/s, peak memory;
- precision: 32-true, bf16-mixed and 16-mixed fits; each runs, with its meta-gradient's relative
  distance to 32-true's at the same parameters and its speed, or stops with its one-line error;
- `--model.compile_solver true` on the GPU: compile time, speed, distance to eager;
- DDP over every visible GPU: its meta-gradient against 1 GPU's, and the episodes each rank drew;
- benchmarks.peer_speed's reference meta-iteration on the GPU (the authors' code beside ours).

Each fit runs the command line in a subprocess with benchmarks.meta_gradients.MetaGradientRecorder, which records
every step's meta-gradient, episodes, seconds and peak memory; the runs compared with the
32-true fit replay its parameters, so each step's meta-gradients are taken at the same point.

Without CUDA (or with --quick) the same command runs its quick form on the CPU: tiny settings,
a subset of the device tests, 2 CPU processes for DDP, peer_speed at its --quick sizes, and the
rows that need a GPU marked "no GPU". tests/test_device_check.py runs that form, so the script
cannot rot unnoticed.
"""
import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Optional

import torch

from benchmarks.meta_gradients import relative_distance

ROOT = Path(__file__).resolve().parents[1]
OMNIGLOT = ROOT.parent / "shared" / "data" / "omniglot"
NO_GPU = "no GPU"


class Check:
    """The settings of one form of the check (full on a GPU, quick on the CPU) and its rows."""

    def __init__(self, args):
        self.gpu = torch.cuda.is_available() and not args.quick
        self.quick = not self.gpu
        self.device = "cuda" if self.gpu else "cpu"
        self.gpus = torch.cuda.device_count() if self.gpu else 0
        self.data_root = Path(args.omniglot_root)
        self.deadline = time.time() + 60 * args.minutes
        self.steps = 3 if self.quick else args.steps
        self.warmup = 1 if self.quick else 5  # steps left out of the speeds (the first compiles)
        # DDP: every visible GPU; the quick form 2 CPU processes (gloo). The global meta-batch
        # must split evenly across them.
        self.world = self.gpus if self.gpu else 2
        self.meta_batch = 4 if self.quick else (8 if 8 % self.world == 0 else 8 * self.world)
        self.work = Path(tempfile.mkdtemp(prefix="device_check_"))
        self.cache = Path(args.cache_dir) if args.cache_dir else self.work / "cache"
        self.rows = []

    # -- the table --------------------------------------------------------------------------

    def row(self, check: str, where: str, result: str, detail: str = "") -> None:
        self.rows.append((check, where, result, detail))
        print(f"  {check} | {where} | {result} | {detail}", flush=True)

    def seconds_left(self, wanted: float) -> float:
        return max(1.0, min(wanted, self.deadline - time.time()))

    def spent(self) -> bool:
        return time.time() >= self.deadline

    # -- running the command line -----------------------------------------------------------

    def fit_args(self) -> list:
        """The fit every row runs: the shipped 5-way 1-shot Omniglot config on the GPU; on the
        CPU (quick form) the same config shrunk to seconds per step; no validation."""
        if not (self.data_root / "images_background").is_dir():
            raise FileNotFoundError(f"no Omniglot at {self.data_root} (--omniglot-root)")
        args = ["--config", str(ROOT / "configs/omniglot_5way_1shot.yaml"),
                "--data.root", str(self.data_root),
                "--data.init_args.cache_dir", str(self.cache),
                "--data.init_args.meta_batch_size", str(self.meta_batch),
                "--trainer.max_steps", str(self.steps),
                "--trainer.val_check_interval", str(self.steps + 1),
                "--trainer.num_sanity_val_steps", "0", "--trainer.enable_progress_bar", "false",
                "--trainer.logger", "false", "--charts.every_n_steps", "0",
                "--checkpoint.every_n_minutes", "0",
                "--trainer.accelerator", "gpu" if self.gpu else "cpu"]
        if self.quick:
            args += ["--model.solver.inner_steps", "2", "--model.solver.cg_steps", "2",
                     "--model.net.init_args.hidden", "8"]
        return args

    def fit(self, name: str, *extra, replay: Optional[str] = None, world: int = 1,
            timeout: float = 240) -> dict:
        """One `fit` in a subprocess of its own folder: {"ok", "error" (its one-line message),
        "ranks": [rank][step] recordings, "wall": seconds}."""
        folder = self.work / name
        folder.mkdir(parents=True, exist_ok=True)
        recorder = ["--trainer.callbacks+=benchmarks.meta_gradients.MetaGradientRecorder",
                    "--trainer.callbacks.out", str(folder / "recording")]
        if replay:
            recorder += ["--trainer.callbacks.replay", str(self.work / replay / "recording")]
        devices = ["--trainer.devices", str(world)] + (
            ["--trainer.strategy", "ddp"] if world > 1 or name.startswith("ddp") else [])
        command = [sys.executable, "-m", "imaml_lightning", "fit", *self.fit_args(), *devices,
                   *extra, *recorder]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
        start = time.time()
        try:
            run = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True,
                                 timeout=self.seconds_left(timeout))
        except subprocess.TimeoutExpired as expired:
            return {"ok": False, "error": f"did not finish in {expired.timeout:.0f} s", "ranks": []}
        wall = time.time() - start
        print(f"  ({name}: {wall:.0f} s)", flush=True)
        if run.returncode != 0:
            lines = [line for line in run.stderr.strip().splitlines() if line.strip()]
            errors = [line for line in lines if line.startswith("error:")]
            return {"ok": False, "error": (errors or lines or ["(no output)"])[-1][:300],
                    "ranks": [], "wall": wall}
        ranks = [torch.load(folder / "recording" / f"rank{r}.pt", weights_only=False)
                 for r in range(world)]
        return {"ok": True, "error": "", "ranks": ranks, "wall": wall}

    def speed(self, result: dict) -> tuple:
        """(meta-steps/s, tasks/s, first step s, peak memory GiB or None) of rank 0, its first
        `warmup` steps left out."""
        steps = result["ranks"][0]
        seconds = statistics.median(s["seconds"] for s in steps[self.warmup:] or steps)
        peak = max((s.get("peak_memory", 0) for s in steps), default=0) / 2**30
        return 1 / seconds, self.meta_batch / seconds, steps[0]["seconds"], peak or None

    def speed_text(self, result: dict) -> str:
        steps_per_second, tasks_per_second, first, peak = self.speed(result)
        memory = f", peak memory {peak:.2f} GiB" if peak else ""
        return (f"{steps_per_second:.2f} meta-steps/s, {tasks_per_second:.1f} tasks/s "
                f"(median of steps {self.warmup + 1}-{self.steps}; first step {first:.1f} s)"
                f"{memory}")

    def distance_text(self, result: dict, reference: dict) -> str:
        distances = [relative_distance(s["grad"], r["grad"])
                     for s, r in zip(result["ranks"][0], reference["ranks"][0])]
        return (f"meta-gradient vs 32-true: relative distance max {max(distances):.2e}, "
                f"median {statistics.median(distances):.2e} over {len(distances)} steps")

    # -- the rows ---------------------------------------------------------------------------

    def machine(self) -> None:
        if torch.cuda.is_available():
            names = sorted({torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())})
            gpu = f"{torch.cuda.device_count()} x {', '.join(names)}"
        else:
            gpu = NO_GPU
        versions = (f"torch {torch.__version__}, CUDA {torch.version.cuda or 'none'}, cuDNN "
                    f"{torch.backends.cudnn.version() if torch.cuda.is_available() else 'none'}, "
                    f"Python {platform.python_version()}")
        form = "full form" if self.gpu else ("quick form on the CPU" + (
            " (--quick)" if torch.cuda.is_available() else ""))
        self.row("machine", gpu, versions, f"{date.today()}, {os.cpu_count()} CPU cores, {form}")

    def solver_tests(self) -> None:
        if self.gpu:
            selection = ["tests/solver", "tests/test_predict.py", "-m", "device", "--device", "cuda"]
            where = "cuda"
        else:  # the machinery, on a subset: the closed form
            selection = ["tests/solver/test_imaml.py::test_meta_gradient_matches_ridge_regression_"
                         "closed_form", "--device", "cpu"]
            where = "cpu (subset; the GPU run needs CUDA)"
        command = [sys.executable, "-m", "pytest", *selection, "-q", "-p", "no:cacheprovider"]
        try:
            run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                                 timeout=self.seconds_left(330))
        except subprocess.TimeoutExpired as expired:
            return self.row("device tests", where, "stopped",
                            f"did not finish in {expired.timeout:.0f} s")
        lines = run.stdout.strip().splitlines()
        summary = lines[-1].strip("= ") if lines else run.stderr.strip()[-200:]
        failed = [line.split(" - ")[0].removeprefix("FAILED ") for line in lines
                  if line.startswith("FAILED")]
        self.row("device tests", where, "passed" if run.returncode == 0 else "FAILED",
                 summary + (f"; failed: {', '.join(failed)}" if failed else ""))

    def fits(self, rounds: int) -> None:
        """1 device at 32-true (the reference), then the precisions and DDP at the reference's
        parameters, peer_speed, and last (it may take minutes to compile) the compiled solver."""
        where = self.device
        try:
            reference = self.fit("32-true", "--trainer.precision", "32-true")
        except FileNotFoundError as missing:
            for check in ("5-way 1-shot fit", "precision 32-true", "precision bf16-mixed",
                          "precision 16-mixed", "DDP", "peer_speed", "compile_solver"):
                self.row(check, where, "not run", str(missing))
            return
        if not reference["ok"]:
            for check in ("5-way 1-shot fit", "precision 32-true", "precision bf16-mixed",
                          "precision 16-mixed", "DDP", "peer_speed", "compile_solver"):
                self.row(check, where, "FAILED" if check == "5-way 1-shot fit" else "not run",
                         f"the 32-true fit failed: {reference['error']}")
            return
        settings = ("shipped config" if self.gpu else "config shrunk: 8 channels, 2 inner and "
                    "2 CG steps") + f", meta-batch {self.meta_batch}, {self.steps} steps"
        self.row("5-way 1-shot fit", "1 x " + where, self.speed_text(reference), settings)
        self.row("precision 32-true", where, "runs", self.speed_text(reference))
        for precision in ("bf16-mixed", "16-mixed"):
            extra = ["--trainer.precision", precision]
            if precision == "16-mixed" and not self.gpu:
                # Lightning turns 16-mixed into bf16-mixed on a CPU by itself: its plugin, given
                # explicitly, reaches the program's check as a GPU's 16-mixed does.
                extra = ['--trainer.plugins+={"class_path": "pytorch_lightning.plugins.precision.'
                         'MixedPrecision", "init_args": {"precision": "16-mixed", "device": "cpu"}}']
            result = self.fit(precision, *extra, replay="32-true")
            if result["ok"]:
                self.row(f"precision {precision}", where, "runs",
                         f"{self.distance_text(result, reference)}; {self.speed_text(result)}")
            else:
                self.row(f"precision {precision}", where, "stops", result["error"])
        self.ddp(reference)
        self.peer_speed(rounds)
        self.compiled(reference)

    def compiled(self, reference: dict) -> None:
        if not self.gpu:
            return self.row("compile_solver", NO_GPU, NO_GPU,
                            "compiling takes minutes on a CPU (tests/test_distributed.py and "
                            "tests/solver/test_batched.py cover it there)")
        if self.spent():
            return self.row("compile_solver", "cuda", "not run", "the time budget was spent")
        result = self.fit("compiled", "--model.compile_solver", "true", replay="32-true",
                          timeout=300)
        if result["ok"]:
            self.row("compile_solver", "cuda", "runs",
                     f"{self.distance_text(result, reference)}; {self.speed_text(result)}")
        else:
            self.row("compile_solver", "cuda", "stops", result["error"])

    def ddp(self, reference: dict) -> None:
        where = f"{self.world} x cuda" if self.gpu else "2 CPU processes (gloo; no GPU)"
        if self.spent():
            return self.row("DDP", where, "not run", "the time budget was spent")
        result = self.fit("ddp", replay="32-true", world=self.world)
        if not result["ok"]:
            return self.row("DDP", where, "stops", result["error"])
        ranks = result["ranks"]
        same_tasks = all(sum((steps[i]["tasks"] for steps in ranks), []) == one["tasks"]
                         for i, one in enumerate(reference["ranks"][0]))
        same_grad = all(torch.equal(steps[i]["grad"][k], ranks[0][i]["grad"][k])
                        for steps in ranks for i in range(len(steps)) for k in steps[i]["grad"])
        distances = [relative_distance(s["grad"], r["grad"])
                     for s, r in zip(ranks[0], reference["ranks"][0])]
        good = same_tasks and same_grad and max(distances) <= 1e-6
        self.row("DDP", where, "same as 1 device" if good else "DIFFERS",
                 f"meta-gradient vs 1 device: relative distance max {max(distances):.2e} over "
                 f"{len(distances)} steps; episodes {'the same' if same_tasks else 'DIFFER'}; "
                 f"ranks apply {'the same' if same_grad else 'DIFFERENT'} meta-gradient; "
                 f"{self.speed_text(result)}")

    def peer_speed(self, rounds: int) -> None:
        where = "cuda" if self.gpu else "cpu (quick sizes; no GPU)"
        if self.spent():
            return self.row("peer_speed", where, "not run", "the time budget was spent")
        try:
            self.row("peer_speed", where, *peer_speed_on(self.device, self.data_root,
                                                         rounds if self.gpu else 1, self.quick))
        except Exception as error:  # noqa: BLE001 (a row, not a crash)
            self.row("peer_speed", where, "stops", f"{type(error).__name__}: {str(error)[:200]}")

    def table(self) -> str:
        lines = ["| check | where | result | detail |", "|---|---|---|---|"]
        lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |"
                  for row in self.rows]
        return "\n".join(lines)


def peer_speed_on(device: str, data_root: Path, rounds: int, quick: bool = False) -> tuple:
    """benchmarks.peer_speed's reference meta-iteration (Omniglot 5-way 1-shot, meta-batch 32,
    16 GD steps, 5 CG steps; quick: its --quick sizes) on `device`: the authors' code and ours
    (Gauss-Newton and exact Hessian) on their conv-4, `rounds` alternating rounds after a
    warm-up. Returns (result, detail)."""
    from benchmarks import peer_speed
    from benchmarks.common import PEER_ROOT, alternating_rounds
    from benchmarks.solver_speed import QUICK, REFERENCE

    if not (Path(PEER_ROOT) / "implicit_maml" / "learner_model.py").is_file():
        return "not run", f"the authors' code is not at {PEER_ROOT}"
    sys.path.insert(0, PEER_ROOT)
    from implicit_maml import learner_model, utils

    sizes = QUICK if quick else REFERENCE
    torch.manual_seed(0)
    tasks = peer_speed.omniglot_tasks(str(data_root), sizes.meta_batch)
    tasks = type(tasks)(*(t.to(device) for t in tasks))
    network = lambda: learner_model.make_conv_network(1, peer_speed.WAYS).to(device)  # noqa: E731
    arms = {"authors' code": peer_speed.peer_iteration((learner_model, utils), network(), tasks,
                                                       sizes),
            "ours, gauss_newton": peer_speed.our_iteration(network(), tasks, "gauss_newton", sizes),
            "ours, hessian": peer_speed.our_iteration(network(), tasks, "hessian", sizes)}

    def synchronize() -> None:
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)

    def timer(run):
        def seconds() -> float:
            synchronize()
            start = time.perf_counter()
            run()
            synchronize()
            return time.perf_counter() - start
        return seconds

    timers = {name: timer(run) for name, run in arms.items()}
    for seconds in timers.values():
        seconds()  # warm-up
    times = {name: statistics.median(t) for name, t in alternating_rounds(timers, rounds).items()}
    authors = times["authors' code"]
    detail = "; ".join(f"{name} {t:.3f} s ({authors / t:.2f}x the authors')"
                       for name, t in times.items())
    iteration = ("--quick's meta-iteration (2 tasks, 2 GD and 2 CG steps)" if quick else
                 "reference meta-iteration (32 tasks, 16 GD and 5 CG steps)")
    return f"ours {authors / times['ours, gauss_newton']:.2f}x the authors' speed", (
        f"seconds per {iteration}, their conv-4, median of {rounds} rounds: {detail}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/device_check.md"))
    parser.add_argument("--quick", action="store_true",
                        help="the quick CPU form even where CUDA is present")
    parser.add_argument("--steps", type=int, default=30, help="meta-steps per fit (full form)")
    parser.add_argument("--rounds", type=int, default=3, help="peer_speed rounds (full form)")
    parser.add_argument("--minutes", type=float, default=7.5,
                        help="time budget: checks not started by then are reported as not run")
    parser.add_argument("--omniglot-root", default=str(OMNIGLOT))
    parser.add_argument("--cache-dir", help="Omniglot's preprocessing cache (default: a new "
                                            "one in the temporary working folder)")
    args = parser.parse_args(argv)
    check = Check(args)
    print(f"device check: {'full form on the GPU' if check.gpu else 'quick form on the CPU'}, "
          f"working in {check.work}", flush=True)
    check.machine()
    check.solver_tests()
    check.fits(args.rounds)
    table = check.table()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table + "\n")
    shutil.rmtree(check.work, ignore_errors=True)  # the runs' folders (recordings, checkpoints)
    print(f"\n{table}\n\nwritten to {out}")


if __name__ == "__main__":
    main()
