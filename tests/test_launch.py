"""Launches that other tools start, on one machine: torchrun; two "nodes" that differ only in
NODE_RANK; and the environment srun gives a 2-node SLURM job (its variables, simulated for two
local processes). Each must train as one process does, and stop and resume as one does.

"Trains as one process" is compared step by step (benchmarks.meta_gradients.MetaGradientRecorder
records every rank): the meta-gradient the optimizer applies, after the all-reduce, within 1e-6
of one process's at the same parameters (the reference replays the launch's parameters at every
step: two runs' parameters drift apart by float32 rounding, which Adam and the inner loop's
safeguard amplify), and the global meta-batch split across the ranks in rank order, the same
episodes one process draws. Parameters after several steps are not compared for that reason.
"""
import json
import random
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import (
    REPO, assert_same_meta_gradients, assert_same_tree, cli_command, cli_env, load, recording, run_cli)

STEPS = 4
TINY_SINUSOID = [
    "--config", str(REPO / "configs/sinusoid.yaml"), "--data.init_args.meta_batch_size", "8",
    "--data.init_args.val_episodes", "6", "--model.solver.inner_steps", "3",
    "--trainer.val_check_interval", "1000", "--trainer.enable_progress_bar", "false",
    "--trainer.accelerator", "cpu", "--seed_everything", "3",
]
TWO_NODES = ["--trainer.strategy", "ddp", "--trainer.num_nodes", "2", "--trainer.devices", "1"]
# Which of Lightning's cluster environments each launch must be detected as.
ENVIRONMENTS = {"torchrun": "TorchElasticEnvironment", "node_rank": "LightningEnvironment",
                "slurm": "SLURMEnvironment"}
# Variables by which launchers tell a process its place; none may leak in from the machine that
# runs the tests (a CI job inside SLURM, say).
LAUNCH_VARIABLES = re.compile(r"SLURM_\w+|MASTER_ADDR|MASTER_PORT|NODE_RANK|GROUP_RANK|RANK|"
                              r"LOCAL_RANK|WORLD_SIZE|LOCAL_WORLD_SIZE|TORCHELASTIC_\w+")


def recorded(workdir: Path, name: str) -> list:
    """Flags that record the run's meta-gradients into workdir/name and its checkpoint writes
    into workdir/name.writes (replacing the default plugins: the recorder is the writer)."""
    plugin = {"class_path": "tests.helpers.RecordingCheckpointIO",
              "init_args": {"log": str(workdir / f"{name}.writes")}}
    return ["--trainer.callbacks+=benchmarks.meta_gradients.MetaGradientRecorder",
            "--trainer.callbacks.out", str(workdir / name), "--trainer.plugins", json.dumps([plugin])]


def checkpoint_writes(workdir: Path, name: str) -> list:
    return [json.loads(line) for line in (workdir / f"{name}.writes").read_text().splitlines()]


def free_port(low: int = 0, high: int = 0) -> int:
    """A TCP port nobody listens on now, in [low, high] if given."""
    for _ in range(1000):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", random.randint(low, high) if high else 0))
            except OSError:
                continue
            return probe.getsockname()[1]
    raise RuntimeError(f"no free port in [{low}, {high}]")


def launch(workdir: Path, how: str, *args) -> list:
    """Start `fit ARGS` the way `how` says; returns the processes started (output in
    workdir/out{i}.txt). torchrun: one torchrun for 2 local processes. node_rank: one process
    per "node", as one would type on each node, differing only in NODE_RANK. slurm: one process
    per task of `srun` in a 2-node job with 1 task per node (srun starts them; here the test
    does, with the variables srun sets)."""
    workdir.mkdir(parents=True, exist_ok=True)
    base = {k: v for k, v in cli_env().items() if not LAUNCH_VARIABLES.fullmatch(k)}
    fit = ["fit", *TINY_SINUSOID, *args]
    if how == "torchrun":  # --standalone: a rendezvous on a free local port
        commands = [[sys.executable, "-m", "torch.distributed.run", "--standalone",
                     "--nproc_per_node", "2", "-m", "imaml_lightning", *fit,
                     "--trainer.strategy", "ddp", "--trainer.devices", "2"]]
        environments = [base]
    elif how == "node_rank":
        port = free_port()
        commands = [cli_command(*fit, *TWO_NODES)] * 2
        environments = [{**base, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                         "NODE_RANK": str(node)} for node in (0, 1)]
    else:
        # Lightning's SLURMEnvironment takes the port from the job id (15000 + its last 4
        # digits) and the address from the first host of SLURM_NODELIST (both "nodes" are this
        # machine). A job named "bash" or "interactive" would make Lightning ignore SLURM.
        port = free_port(15000, 24999)
        job = {"SLURM_JOB_ID": f"9{port - 15000:04d}", "SLURM_JOB_NAME": "imaml",
               "SLURM_NTASKS": "2", "SLURM_NNODES": "2", "SLURM_JOB_NUM_NODES": "2",
               "SLURM_NTASKS_PER_NODE": "1", "SLURM_NODELIST": "localhost",
               "SLURM_JOB_NODELIST": "localhost", "SLURM_LOCALID": "0"}
        commands = [cli_command(*fit, *TWO_NODES)] * 2
        environments = [{**base, **job, "SLURM_PROCID": str(task), "SLURM_NODEID": str(task)}
                        for task in (0, 1)]
    processes = []
    for i, (command, env) in enumerate(zip(commands, environments)):
        with open(workdir / f"out{i}.txt", "w") as out:
            processes.append(subprocess.Popen(command, cwd=workdir, env=env, stdout=out,
                                              stderr=subprocess.STDOUT))
    return processes


def kill(processes: list) -> None:
    """Ours only, by their own handles."""
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait()


def finish(processes: list, workdir: Path, timeout: float = 300) -> str:
    """Wait for the processes; every one must exit with status 0. Returns their output."""
    deadline = time.time() + timeout
    try:
        for process in processes:
            process.wait(timeout=max(1.0, deadline - time.time()))
    finally:
        kill(processes)  # none left, unless one timed out
    output = "".join((workdir / f"out{i}.txt").read_text() for i in range(len(processes)))
    assert [p.returncode for p in processes] == [0] * len(processes), output[-4000:]
    assert "Traceback" not in output, output[-4000:]
    return output


def run_launch(workdir: Path, how: str, *args) -> str:
    return finish(launch(workdir, how, *args), workdir)


def assert_trains_like_one_process(workdir: Path, launched: Path, how: str) -> None:
    """The launch's recording against one process replaying its parameters at every step."""
    run_cli(workdir, "fit", *TINY_SINUSOID, "--trainer.devices", "1",
            "--trainer.max_steps", str(STEPS), "--checkpoint.dirpath", "reference_checkpoints",
            "--trainer.callbacks+=benchmarks.meta_gradients.MetaGradientRecorder",
            "--trainer.callbacks.out", "reference", "--trainer.callbacks.replay", str(launched))
    [reference] = recording(workdir / "reference", 1)
    assert_same_meta_gradients(reference, recording(launched, 2), ENVIRONMENTS[how], STEPS)


def assert_only_rank_0_wrote(writes: list, last_step: int) -> None:
    """Every checkpoint was written by global rank 0 alone (not once per "node"), and last.ckpt
    last holds `last_step`. (A stop signal at a scheduled validation writes last.ckpt twice at
    the same step: RunCheckpoint's save on the signal, then the validation's.)"""
    assert writes and all(w["rank"] == 0 for w in writes), writes
    assert [w["step"] for w in writes if w["file"] == "last.ckpt"][-1] == last_step, writes


@pytest.mark.slow
@pytest.mark.parametrize("how", ["torchrun", "node_rank", "slurm"])
def test_a_launch_trains_like_one_process(tmp_path, how):
    output = run_launch(tmp_path, how, "--trainer.max_steps", str(STEPS), *recorded(tmp_path, "run"))
    assert_trains_like_one_process(tmp_path, tmp_path / "run", how)
    assert_only_rank_0_wrote(checkpoint_writes(tmp_path, "run"), STEPS)
    assert load(tmp_path / "checkpoints/last.ckpt")["global_step"] == STEPS
    if how == "slurm":  # Lightning took the SLURM environment as such (signal handling included)
        assert "SLURM auto-requeueing enabled" in output


def wait_for_steps(processes: list, folder: Path, steps: int, timeout: float = 300) -> None:
    """Until rank 0's recording holds `steps` meta-steps."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert all(p.poll() is None for p in processes), "a process ended before the signal"
        try:
            if len(torch.load(folder / "rank0.pt", weights_only=False)) >= steps:
                return
        except (FileNotFoundError, RuntimeError, EOFError):  # not there yet, or being written
            pass
        time.sleep(0.2)
    raise AssertionError("training did not progress")


@pytest.mark.slow
@pytest.mark.parametrize("how, signalled", [("node_rank", "the last rank"), ("slurm", "every rank")])
def test_sigterm_stops_every_process_cleanly_and_resumes_bit_exactly(tmp_path, how, signalled):
    """Preemption: the scheduler sends SIGTERM to every process of the job at once, or only to
    one node's. Every process finishes its meta-step and exits with status 0, rank 0 having
    written last.ckpt (alone); the same launch with --ckpt_path last continues from there, and
    ends where an uninterrupted launch ends, bit for bit. (Lightning 2.6's own SIGTERM handler
    hung here: it broadcasts from inside the handler, wherever the other rank is.)"""
    stopped, straight = tmp_path / "stopped", tmp_path / "straight"
    processes = launch(stopped, how, "--trainer.max_steps", "100000", *recorded(stopped, "first"))
    try:
        wait_for_steps(processes, stopped / "first", 2)
    except BaseException:
        kill(processes)
        raise
    time.sleep(random.Random(0).uniform(0, 0.5))  # somewhere in a meta-step
    for process in processes if signalled == "every rank" else processes[-1:]:
        process.send_signal(signal.SIGTERM)
    output = finish(processes, stopped)
    step = load(stopped / "checkpoints/last.ckpt")["global_step"]
    assert step >= 2
    assert output.count(f"Stopped on SIGTERM after meta-step {step}: checkpoints/last.ckpt "
                        f"holds that state") == 1  # rank 0 says it
    assert_only_rank_0_wrote(checkpoint_writes(stopped, "first"), step)

    run_launch(stopped, how, "--trainer.max_steps", str(step + 2), "--ckpt_path", "last",
               *recorded(stopped, "resumed"))
    # It resumed: its first meta-step is the one after the checkpoint's.
    assert [s["step"] for s in recording(stopped / "resumed", 2)[0]] == [step, step + 1]
    assert_only_rank_0_wrote(checkpoint_writes(stopped, "resumed"), step + 2)
    run_launch(straight, how, "--trainer.max_steps", str(step + 2))
    a, b = load(straight / "checkpoints/last.ckpt"), load(stopped / "checkpoints/last.ckpt")
    assert a["global_step"] == b["global_step"] == step + 2
    assert_same_tree(a["state_dict"], b["state_dict"], "state_dict")
    assert_same_tree(a["optimizer_states"], b["optimizer_states"], "optimizer_states")
