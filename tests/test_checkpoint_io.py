"""Checkpoint writes survive kill -9 in the middle of a write."""
import random
import signal
import subprocess
import sys
import time

import torch

from imaml_lightning.checkpoint_io import atomic_torch_save
from tests.helpers import cli_env

WRITER = """
import sys, torch
from imaml_lightning.checkpoint_io import atomic_torch_save
version = 0
while True:  # ~64 MB per write, so most kills land inside one
    version += 1
    atomic_torch_save({"version": version, "data": torch.full((16 * 2**20,), float(version))}, sys.argv[1])
"""


def test_a_write_killed_at_a_random_moment_leaves_the_previous_file_whole(tmp_path):
    target = tmp_path / "last.ckpt"
    rng = random.Random(0)
    for _ in range(5):
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(target)], env=cli_env())
        deadline = time.time() + 60
        while not target.exists():
            assert time.time() < deadline and writer.poll() is None
            time.sleep(0.05)
        time.sleep(rng.uniform(0.1, 1.0))
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        checkpoint = torch.load(target, weights_only=True)
        assert torch.equal(checkpoint["data"], torch.full((16 * 2**20,), float(checkpoint["version"])))
    assert len(list(tmp_path.glob(".last.ckpt.*.partial"))) <= 1  # at most the one cut short


def test_stale_partial_files_are_removed_by_the_next_write(tmp_path):
    (tmp_path / ".last.ckpt.abc.partial").write_bytes(b"torn")
    atomic_torch_save({"x": 1}, tmp_path / "last.ckpt")
    assert not list(tmp_path.glob("*.partial")) and not list(tmp_path.glob(".*.partial"))
    assert torch.load(tmp_path / "last.ckpt")["x"] == 1
