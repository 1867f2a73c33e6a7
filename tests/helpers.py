"""Running the command line in a subprocess, as a user (or a launcher) would."""
import os
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
