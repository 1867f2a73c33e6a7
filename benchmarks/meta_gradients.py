"""What launches are compared by: every rank's episodes, parameters and meta-gradient at every
meta-step, recorded by a callback (benchmarks.device_check's runs, tests/test_distributed.py and
tests/test_launch.py), and the relative distance between two meta-gradients."""
import hashlib
import time
from pathlib import Path
from typing import Optional

import torch
from pytorch_lightning.callbacks import Callback


def task_fingerprints(batch) -> list:
    """One short hash per task of a meta-batch (support_x, support_y, query_x, query_y, each
    with a leading task dimension): which episodes a rank drew, comparable across runs."""
    tensors = [t.detach().cpu().contiguous() for t in batch]
    return [hashlib.sha256(b"".join(t[i].numpy().tobytes() for t in tensors)).hexdigest()[:16]
            for i in range(len(tensors[0]))]


class MetaGradientRecorder(Callback):
    """What a launch is compared by, recorded on every rank at every meta-step: the tasks this
    rank drew, the parameters the step started from, and the meta-gradient the optimizer is
    about to apply (after the strategy's all-reduce: Lightning calls on_before_optimizer_step
    inside the manual optimizer.step(), after manual_backward). Also the step's seconds (the
    device synchronized) and the peak device memory. Written to OUT/rank{global rank}.pt after
    every step, so a run stopped at any moment leaves what it did.

    replay: another run's recording folder. Each step then starts from the parameters that
    run's step started from, so that both meta-gradients of a step are taken at the same point
    (the reference of a comparison). Without it two runs drift apart: float32 rounding in the
    parameters, amplified by Adam, and the inner loop's safeguard deciding a step differently
    (on the sinusoid config, a parameter difference of 6e-9 after step 1 made step 2's
    meta-gradients differ by 1e-3).

    On the command line: --trainer.callbacks+=benchmarks.meta_gradients.MetaGradientRecorder
    --trainer.callbacks.out DIR [--trainer.callbacks.replay OTHER_DIR]."""

    def __init__(self, out: str, replay: Optional[str] = None):
        self.out, self.replay = Path(out), replay and Path(replay)
        self.steps = []
        self._current = None
        self._replayed = None

    def _synchronize(self, pl_module) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_start(self, trainer, pl_module) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.replay:
            if self._replayed is None:
                self._replayed = {s["step"]: s["params"] for s in torch.load(
                    self.replay / "rank0.pt", weights_only=False)}
            with torch.no_grad():
                for name, value in pl_module.named_parameters():
                    value.copy_(self._replayed[trainer.global_step][name])
        self._synchronize(pl_module)
        self._current = {
            "step": trainer.global_step, "rank": trainer.global_rank,
            "world_size": trainer.world_size, "precision": trainer.precision,
            "environment": type(getattr(trainer.strategy, "cluster_environment", None)).__name__,
            "tasks": task_fingerprints(batch),
            "params": {k: v.detach().cpu().clone() for k, v in pl_module.named_parameters()},
            "start": time.perf_counter()}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self._current["grad"] = {k: v.grad.detach().cpu().clone()
                                 for k, v in pl_module.named_parameters()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._synchronize(pl_module)
        current, self._current = self._current, None
        current["seconds"] = time.perf_counter() - current.pop("start")
        if pl_module.device.type == "cuda":
            current["peak_memory"] = torch.cuda.max_memory_allocated(pl_module.device)
        self.steps.append(current)
        self.out.mkdir(parents=True, exist_ok=True)
        torch.save(self.steps, self.out / f"rank{trainer.global_rank}.pt")


def relative_distance(a: dict, b: dict) -> float:
    """||a - b|| / ||b|| over all parameters' tensors together."""
    flat = lambda d: torch.cat([v.double().flatten() for v in d.values()])  # noqa: E731
    return ((flat(a) - flat(b)).norm() / flat(b).norm().clamp_min(1e-30)).item()
