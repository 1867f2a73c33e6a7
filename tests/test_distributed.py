"""World-size invariance: one process and two DDP processes (gloo, CPU) train identically.
(Launches by torchrun, by NODE_RANK and under SLURM: tests/test_launch.py.)"""
import subprocess

import pytest

from tests.helpers import (
    REPO, assert_compiled_trains_as_eager, assert_same_meta_gradients, cli_command, cli_env, load,
    recording, run_cli, tiny_omniglot,
)

TINY_SINUSOID = [
    "--config", str(REPO / "configs/sinusoid.yaml"), "--data.init_args.meta_batch_size", "8",
    "--data.init_args.val_episodes", "9", "--model.solver.inner_steps", "3", "--trainer.max_steps", "5",
    "--trainer.val_check_interval", "5", "--trainer.enable_progress_bar", "false",
    "--trainer.accelerator", "cpu",
]


def fit(workdir, *args):
    workdir.mkdir()
    run_cli(workdir, "fit", *TINY_SINUSOID, *args)
    return load(workdir / "checkpoints" / "last.ckpt")


def recorder(folder, replay=None) -> list:
    """benchmarks.meta_gradients.MetaGradientRecorder into `folder` (tests/test_launch.py says
    what it records and why the reference replays the other run's parameters)."""
    return ["--trainer.callbacks+=benchmarks.meta_gradients.MetaGradientRecorder",
            "--trainer.callbacks.out", str(folder),
            *(["--trainer.callbacks.replay", str(replay)] if replay else [])]


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["imaml", "maml"])
def test_two_ddp_processes_train_like_one(tmp_path, algorithm):
    """At each of the 5 steps: the episodes and the all-reduced meta-gradient of one process at
    the same parameters (relative 1e-6; float32 rounding, the tasks summed in another order).
    A rank solving the wrong tasks, or a meta-gradient left unreduced, would differ by orders of
    magnitude more."""
    two = fit(tmp_path / "two", "--model.solver.algorithm", algorithm, "--trainer.devices", "2",
              "--trainer.strategy", "ddp", *recorder(tmp_path / "two_recording"))
    one = fit(tmp_path / "one", "--model.solver.algorithm", algorithm, "--trainer.devices", "1",
              *recorder(tmp_path / "one_recording", replay=tmp_path / "two_recording"))
    assert one["global_step"] == two["global_step"] == 5
    [reference] = recording(tmp_path / "one_recording", 1)
    assert_same_meta_gradients(reference, recording(tmp_path / "two_recording", 2),
                               "LightningEnvironment", 5)
    # The 9 validation episodes are split 5/4 across the ranks and every one is counted once.
    [one_callback], [two_callback] = (
        [v for k, v in c["callbacks"].items() if k.startswith("RunCheckpoint")] for c in (one, two))
    assert one_callback["best_model_score"].item() == pytest.approx(
        two_callback["best_model_score"].item(), rel=1e-5)


@pytest.mark.slow
def test_the_compiled_solver_trains_under_ddp_as_one_eager_process(tmp_path, omniglot_root,
                                                                    cache_dir):
    """--model.compile_solver with two DDP processes: each compiles its own solver for its half of
    the meta-batch, and the run's weights are the single eager process's (to float32 rounding)."""
    tiny = [*tiny_omniglot(omniglot_root, cache_dir, meta_batch_size=4), "--trainer.max_steps", "2",
            "--trainer.accelerator", "cpu"]
    run_cli(tmp_path, "fit", *tiny, "--trainer.devices", "1", "--checkpoint.dirpath", "eager")
    run_cli(tmp_path, "fit", *tiny, "--trainer.devices", "2", "--trainer.strategy", "ddp",
            "--model.compile_solver", "true", "--checkpoint.dirpath", "compiled")
    eager, compiled = (load(tmp_path / d / "last.ckpt") for d in ("eager", "compiled"))
    assert eager["global_step"] == compiled["global_step"] == 2
    assert compiled["hyper_parameters"]["compile_solver"]
    assert_compiled_trains_as_eager(compiled, eager)


def test_meta_batch_must_split_evenly_across_processes(tmp_path):
    run = subprocess.run(cli_command("fit", *TINY_SINUSOID, "--data.init_args.meta_batch_size", "5",
                                     "--trainer.devices", "2", "--trainer.strategy", "ddp"),
                         cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert "data.meta_batch_size=5 is invalid: must be divisible by the number of processes (2)" in run.stderr
