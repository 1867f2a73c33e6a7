"""Resuming: bit-exact continuation on CPU, crash safety of checkpoints, incompatible settings."""
import random
import signal
import subprocess
import time

import pytest

from tests.helpers import RESUME_RUN, assert_same_tree, cli_command, cli_env, load, run_cli, scalars

RUN = RESUME_RUN


@pytest.mark.slow
def test_a_resumed_run_is_bit_identical_to_an_uninterrupted_one(tmp_path):
    straight, halves = tmp_path / "straight", tmp_path / "halves"
    straight.mkdir(), halves.mkdir()
    run_cli(straight, "fit", *RUN, "--trainer.max_steps", "6")
    run_cli(halves, "fit", *RUN, "--trainer.max_steps", "3")
    run_cli(halves, "fit", *RUN, "--trainer.max_steps", "6", "--ckpt_path", "last")

    a, b = load(straight / "checkpoints/last.ckpt"), load(halves / "checkpoints/last.ckpt")
    assert a["global_step"] == b["global_step"] == 6
    assert_same_tree(a["state_dict"], b["state_dict"], "state_dict")
    assert_same_tree(a["optimizer_states"], b["optimizer_states"], "optimizer_states")

    logs = scalars(straight / "lightning_logs/version_0")
    first, second = (scalars(halves / f"lightning_logs/version_{v}") for v in (0, 1))
    for tag in ("train/query_loss_after", "train/meta_grad_norm", "train/cg_residual",
                "train/outer_lr", "val/mse"):
        assert logs[tag] == first[tag] + second[tag], tag


def test_kill_9_at_any_moment_leaves_a_checkpoint_to_resume_from(tmp_path):
    """Checkpoints are written after every step; the run is killed at random moments (often in
    the middle of a write). Each time the last checkpoint must load, and the run must resume."""
    rng = random.Random(0)
    every_step = [*RUN, "--trainer.val_check_interval", "1", "--trainer.max_steps", "100000"]
    for attempt in range(3):
        args = every_step + (["--ckpt_path", "last"] if attempt else [])
        process = subprocess.Popen(cli_command("fit", *args), cwd=tmp_path, env=cli_env(),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        last = tmp_path / "checkpoints/last.ckpt"
        deadline = time.time() + 120
        while not (last.exists() and load(last)["global_step"] >= 3 * (attempt + 1)):
            assert time.time() < deadline and process.poll() is None, "training did not progress"
            time.sleep(0.2)
        time.sleep(rng.uniform(0, 1.5))
        process.send_signal(signal.SIGKILL)
        process.wait()
        step = load(last)["global_step"]  # loads: not truncated
        assert step >= 3 * (attempt + 1)
    run_cli(tmp_path, "fit", *RUN, "--trainer.max_steps", str(step + 2), "--ckpt_path", "last")
    assert load(tmp_path / "checkpoints/last.ckpt")["global_step"] == step + 2
    assert not list((tmp_path / "checkpoints").glob(".*.partial"))  # a killed write's leftovers go


def test_resuming_with_another_network_shape_is_one_clear_error(tmp_path):
    run_cli(tmp_path, "fit", *RUN, "--trainer.max_steps", "2")
    run = subprocess.run(cli_command("fit", *RUN, "--trainer.max_steps", "4", "--ckpt_path", "last",
                                     "--model.net.init_args.hidden", "[20, 20]"),
                         cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    last_line = run.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: ckpt_path is invalid: the checkpoint holds another network")
    assert "net.net.0.weight is [40, 1] there, [20, 1] here" in last_line
    assert "model.net.init_args.hidden=[40, 40] there, [20, 20] here" in last_line
    assert "Traceback" not in run.stderr
