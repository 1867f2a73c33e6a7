"""Running the command line in a subprocess, as a user (or a launcher) would."""
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def cli_command(*args) -> list:
    return [sys.executable, "-m", "imaml_lightning", *args]


def cli_env() -> dict:
    return {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(REPO)}


def run_cli(workdir: Path, *args) -> subprocess.CompletedProcess:
    run = subprocess.run(cli_command(*args), cwd=workdir, env=cli_env(), capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    return run


def load(path: Path) -> dict:
    return torch.load(path, weights_only=False, map_location="cpu")


def tiny_omniglot(root, cache_dir, meta_batch_size: int = 2) -> list:
    """The shipped Omniglot config shrunk to seconds per step (an 8-channel conv-4, 2 inner and
    2 CG steps), 2 meta-steps with a validation at the end: for the compiled solver's tests."""
    return ["--config", str(REPO / "configs/omniglot_5way_1shot.yaml"), "--data.root", str(root),
            "--data.init_args.cache_dir", str(cache_dir),
            "--data.init_args.meta_batch_size", str(meta_batch_size),
            "--data.init_args.val_episodes", "4", "--model.solver.inner_steps", "2",
            "--model.solver.cg_steps", "2", "--model.net.init_args.hidden", "8",
            "--trainer.val_check_interval", "2", "--trainer.enable_progress_bar", "false"]


def assert_compiled_trains_as_eager(compiled: dict, eager: dict) -> None:
    """The same weights to float32 rounding (Inductor sums in another order), except a
    convolution's bias before BatchNorm: its gradient is 0 up to rounding, which Adam's
    normalized step turns into a full step either way."""
    for name, value in eager["state_dict"].items():
        if not re.fullmatch(r"net\.features\.\d+\.0\.bias", name):
            torch.testing.assert_close(compiled["state_dict"][name], value, rtol=1e-4, atol=1e-6)
