"""last.ckpt is always the latest state: after every validation, on a timer, and on a stop signal."""
import errno
import json
import os
import signal
import subprocess
import time

import pytest
import torch
from pytorch_lightning.callbacks import Callback

from imaml_lightning import checkpoint_io
from imaml_lightning.checkpointing import SHAREABLE_KEYS, resumable, shareable
from imaml_lightning.cli import main
from imaml_lightning.errors import SettingError
from imaml_lightning.predict import main as predict
from tests.helpers import (
    RESUME_RUN as RUN, assert_same_tree, cli_command, cli_env, load, run_cli, scalars)

SINUSOID = ["--config", "configs/sinusoid.yaml", "--data.init_args.val_episodes", "6",
            "--data.init_args.meta_batch_size", "4", "--model.solver.inner_steps", "3",
            "--trainer.enable_progress_bar", "false"]


def test_last_checkpoint_follows_training_when_the_score_stops_improving(tmp_path):
    """The reproduction of the issue: a monitor whose best came first (ModelCheckpoint alone
    left last.ckpt at step 2). The run is killed after its 4th validation, so no end-of-training
    save can stand in: last.ckpt must hold step 8 by then."""
    process = subprocess.Popen(
        cli_command("fit", *RUN, "--trainer.val_check_interval", "2", "--trainer.max_steps",
                    "100000", "--checkpoint.monitor", "val/mse", "--checkpoint.mode", "max",
                    "--checkpoint.every_n_minutes", "0"),
        cwd=tmp_path, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(process, tmp_path / "lightning_logs", "val/mse", 4)
        time.sleep(1.0)  # the 4th validation's checkpoint writes follow its log
    finally:
        process.kill()
        process.wait()
    assert load(tmp_path / "checkpoints/last.ckpt")["global_step"] >= 8
    assert len(list((tmp_path / "checkpoints").glob("best-step*.ckpt"))) == 1  # best ones as before


def test_last_checkpoint_advances_between_validations_on_a_timer(tmp_path):
    """No validation within the run: only the timer writes last.ckpt while it trains (the run is
    then killed, so no end-of-training save can stand in)."""
    process = subprocess.Popen(
        cli_command("fit", *RUN, "--trainer.val_check_interval", "1000", "--trainer.max_steps",
                    "100000", "--checkpoint.every_n_minutes", "1e-9"),
        cwd=tmp_path, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last, deadline, seen = tmp_path / "checkpoints/last.ckpt", time.time() + 180, set()
    try:
        while len(seen) < 3:
            assert time.time() < deadline and process.poll() is None, "no timed checkpoints"
            if last.exists():
                seen.add(load(last)["global_step"])
            time.sleep(0.1)
    finally:
        process.kill()
        process.wait()
    assert not list((tmp_path / "checkpoints").glob("best-step*.ckpt"))  # no validation ran


def test_ckpt_path_last_with_nothing_to_resume_says_so_and_starts_from_scratch(workdir, capsys, caplog):
    main(["fit", *SINUSOID, "--trainer.max_steps", "2", "--trainer.val_check_interval", "2",
          "--ckpt_path", "last"])
    said = caplog.text + capsys.readouterr().err
    assert "ckpt_path=last: no last.ckpt in checkpoints, so training starts from meta-step 0" in said
    assert "there is no last checkpoint available" not in said  # Lightning's own warning: replaced
    assert load(workdir / "checkpoints/last.ckpt")["global_step"] == 2


def test_a_failed_write_is_one_error_and_keeps_the_previous_checkpoint(workdir, monkeypatch):
    real_save = torch.save
    calls = []

    def save_then_fill_the_disk(obj, file, *args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, file, *args, **kwargs)

    monkeypatch.setattr(checkpoint_io.torch, "save", save_then_fill_the_disk)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *SINUSOID, "--trainer.max_steps", "6", "--trainer.val_check_interval", "2",
              "--checkpoint.save_top_k", "0"])
    message = str(exit_info.value.code)
    assert message.startswith("error: checkpoint.dirpath='checkpoints' is invalid: cannot write "
                              "last.ckpt there (No space left on device)")
    assert load(workdir / "checkpoints/last.ckpt")["global_step"] == 2  # the previous one, whole
    assert not list((workdir / "checkpoints").glob(".*.partial"))


def wait_for(process, log_dir, tag: str, count: int, timeout: float = 180) -> None:
    """Until TensorBoard holds `count` values of `tag` from the running `process`."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert process.poll() is None, "training ended too early"
        if list(log_dir.glob("version_0/events.out.tfevents.*")) and len(
                scalars(log_dir / "version_0").get(tag, [])) >= count:
            return
        time.sleep(0.3)
    raise AssertionError("training did not progress")


@pytest.mark.slow
@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_saves_the_step_and_resuming_matches_an_uninterrupted_run(tmp_path, stop_signal):
    stopped, straight = tmp_path / "stopped", tmp_path / "straight"
    stopped.mkdir(), straight.mkdir()
    args = [*RUN, "--trainer.val_check_interval", "1000"]  # no checkpoint before the signal
    process = subprocess.Popen(cli_command("fit", *args, "--trainer.max_steps", "100000"),
                               cwd=stopped, env=cli_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(process, stopped / "lightning_logs", "train/query_loss_after", 3)  # logged every step
    process.send_signal(stop_signal)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output[-3000:]
    assert "Traceback" not in output
    step = load(stopped / "checkpoints/last.ckpt")["global_step"]
    assert step >= 3
    assert f"Stopped on {stop_signal.name} after meta-step {step}" in output
    assert "--ckpt_path last" in output

    run_cli(stopped, "fit", *args, "--trainer.max_steps", str(step + 2), "--ckpt_path", "last")
    run_cli(straight, "fit", *args, "--trainer.max_steps", str(step + 2))
    a, b = load(straight / "checkpoints/last.ckpt"), load(stopped / "checkpoints/last.ckpt")
    assert a["global_step"] == b["global_step"] == step + 2
    assert_same_tree(a["state_dict"], b["state_dict"], "state_dict")
    assert_same_tree(a["optimizer_states"], b["optimizer_states"], "optimizer_states")


class SignalAtStep(Callback):
    """Sends this process SIGINT at the end of meta-step `step`, as Ctrl-C would (Lightning runs
    it before RunCheckpoint, which as a ModelCheckpoint comes last)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGINT)


@pytest.mark.parametrize("stop_at, validated", [(3, [2]), (4, [2, 4])])
def test_a_stop_validates_only_where_the_schedule_does(workdir, stop_at, validated):
    """Lightning validates at any meta-step that stops early; a stop by signal must not, or the
    validated steps (so the best checkpoint) would depend on where runs were stopped. A stop at
    a scheduled validation keeps it."""
    main(["fit", *SINUSOID, "--trainer.max_steps", "100", "--trainer.val_check_interval", "2",
          "--trainer.log_every_n_steps", "1", "--trainer.callbacks+=tests.test_checkpointing.SignalAtStep",
          f"--trainer.callbacks.step={stop_at}"])
    assert load(workdir / "checkpoints/last.ckpt")["global_step"] == stop_at
    logged = scalars(workdir / "lightning_logs/version_0")["val/mse"]
    assert [step + 1 for step, _ in logged] == validated  # Lightning logs them one step back


def test_every_n_minutes_must_not_be_negative(workdir):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *SINUSOID, "--checkpoint.every_n_minutes", "-1"])
    assert "checkpoint.every_n_minutes=-1.0 is invalid: must be >= 0" in str(exit_info.value.code)



@pytest.mark.parametrize("subcommand", ["fit", "validate", "test"])
def test_a_file_that_is_no_checkpoint_of_ours_is_one_error(workdir, subcommand):
    (workdir / "notes.ckpt").write_text("not a checkpoint")
    torch.save({"weights": torch.zeros(3)}, workdir / "other.ckpt")
    for name, message in (("notes.ckpt", "not a checkpoint that torch.load can read"),
                          ("other.ckpt", "not a Lightning checkpoint of this program")):
        with pytest.raises(SystemExit) as exit_info:
            main([subcommand, *SINUSOID, "--ckpt_path", name])
        assert str(exit_info.value.code).startswith(f"error: ckpt_path='{name}' is invalid: {message}")


def test_a_shareable_checkpoint_tests_and_predicts_as_the_full_one_and_cannot_resume(workdir):
    main(["fit", *SINUSOID, "--trainer.max_steps", "3", "--trainer.val_check_interval", "3"])
    full = load(workdir / "checkpoints/last.ckpt")
    shared = shareable(full, **{"data.init_args.num_workers": 0})
    assert set(shared) == set(SHAREABLE_KEYS) and not resumable(shared) and resumable(full)
    torch.save(shared, workdir / "shared.ckpt")
    assert (workdir / "shared.ckpt").stat().st_size < 0.5 * (workdir / "checkpoints/last.ckpt").stat().st_size
    for name in ("checkpoints/last.ckpt", "shared.ckpt"):
        main(["test", *SINUSOID, "--ckpt_path", name])
    (first, second) = sorted(workdir.rglob("test_result.json"), key=lambda p: p.stat().st_mtime)
    score = lambda path: [json.loads(path.read_text())[k] for k in ("mean", "ci95", "episodes")]  # noqa: E731
    assert score(first) == score(second)
    (workdir / "support.csv").write_text("0.5,0.4\n1.0,0.8\n2.0,0.9\n")
    (workdir / "query.csv").write_text("0.7\n1.5\n")
    for name in ("checkpoints/last.ckpt", "shared.ckpt"):
        predict(["--ckpt_path", name, "--support", "support.csv", "--query", "query.csv",
                 "--out", name.replace("/", "_") + ".csv"])
    assert (workdir / "shared.ckpt.csv").read_text() == (workdir / "checkpoints_last.ckpt.csv").read_text()
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *SINUSOID, "--ckpt_path", "shared.ckpt"])
    assert str(exit_info.value.code).startswith("error: ckpt_path='shared.ckpt' is invalid: holds "
                                                "weights and settings only")
    with pytest.raises(SettingError, match="settings=.*must be run settings of the checkpoint"):
        shareable(full, **{"data.init_args.rooot": "x"})
    evaluated_longer = shareable(full, **{"model.solver.inner_steps": 7})  # what evaluation reads
    assert evaluated_longer["hyper_parameters"]["solver"]["inner_steps"] == 7
    assert evaluated_longer["run_settings"]["model.solver.inner_steps"] == 7
    assert full["hyper_parameters"]["solver"]["inner_steps"] == 3
