"""The LightningModule: orchestrates the solver, the optimizer and the logs.

The algorithm itself lives in imaml_lightning.solver (plain PyTorch); this layer turns a batch
into solver calls, hands the meta-gradient to the optimizer through autograd (so distributed
strategies reduce it) and logs what happens.
"""
import math
import time
from dataclasses import asdict
from functools import partial
from typing import Callable, Literal, NamedTuple, Optional

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.utilities import rank_zero_info
from torch import nn

from imaml_lightning.compat import DynamoError
from imaml_lightning.errors import SettingError, require
from imaml_lightning.metrics import MeanConfidenceInterval
from imaml_lightning.solver import (
    BATCH_NORM_MODES, SolverConfig, Task, VectorizedMetaGradient, adapt_and_predict, adapt_tasks,
    mse_loss, predict, surrogate_loss,
)


# --trainer.precision values a meta-step runs correctly in. 16-mixed's loss scaling (GradScaler)
# reaches only the surrogate loss's backward, not the gradients the solver takes inside a
# meta-step with torch.func (the inner loop's), which float16 would underflow unscaled; "16-true"
# and "bf16-true" would also run CG in 16 bits, where its recurrences lose conjugacy. bf16-mixed
# has float32's range and needs no scaling (docs/distributed.md#mixed-precision).
PRECISIONS = ("32-true", "bf16-mixed", "64-true")


class IMAML(pl.LightningModule):
    """Implicit MAML (iMAML-GD, iMAML-HF), and the MAML, first-order MAML and Reptile baselines.

    Args:
        net: builds the network from its output size (the data module supplies the size).
        out_features: network output size; set from the data module by the command line.
        problem: "classification" (cross-entropy, accuracy) or "regression" (MSE).
        solver: the algorithm and its inner and implicit solves (solver.SolverConfig: each
            field is documented there and set as --model.solver.NAME).
        outer_lr / adam_eps: Adam on the meta-parameters.
        lr_schedule: "constant", or "cosine": outer_lr decays to 0 along a half cosine over
            lr_schedule_steps meta-steps (default trainer.max_steps), which settles the
            meta-parameters for the final checkpoint.
        test_inner_steps: inner steps at validation, test and predict (default: solver.inner_steps).
        batch_norm: how validation and test normalize the query images after adaptation:
            "transductive" (default, the paper's protocol): BatchNorm uses the query batch's own
            statistics; "support": the support set's, so a prediction depends on its image
            alone (predict always uses this).
        chunk_size: tasks vectorized together (None: the whole meta-batch).
        compile_solver: meta-train with the solver compiled by torch.compile: shorter
            meta-steps after a first step that compiles for minutes, so for long runs (the
            measurements: docs/benchmarks.md#compiled_training). Evaluation stays eager.
    """

    def __init__(
        self,
        net: Callable[[int], nn.Module],
        out_features: int = 1,
        problem: Literal["classification", "regression"] = "classification",
        solver: SolverConfig = SolverConfig(),
        outer_lr: float = 1e-3,
        adam_eps: float = 1e-8,
        lr_schedule: Literal["constant", "cosine"] = "constant",
        lr_schedule_steps: Optional[int] = None,
        test_inner_steps: Optional[int] = None,
        batch_norm: Literal["transductive", "support"] = "transductive",
        chunk_size: Optional[int] = None,
        compile_solver: bool = False,
    ):
        super().__init__()
        self.config = solver if isinstance(solver, SolverConfig) else SolverConfig(**solver)
        # Saved as plain values: LightningCLI reads a checkpoint's with weights_only=True.
        solver = asdict(self.config)
        self.save_hyperparameters(ignore=["net"])
        self.automatic_optimization = False
        require(outer_lr > 0, "model.outer_lr", outer_lr, "must be > 0")
        require(test_inner_steps is None or test_inner_steps >= 0, "model.test_inner_steps",
                test_inner_steps, "must be >= 0 or null")
        require(batch_norm in BATCH_NORM_MODES, "model.batch_norm", batch_norm,
                f"must be one of {BATCH_NORM_MODES}")
        require(chunk_size is None or chunk_size >= 1, "model.chunk_size", chunk_size,
                "must be >= 1 or null")
        self.net = net(out_features)
        self.classification = problem == "classification"
        self.loss_fn = F.cross_entropy if self.classification else mse_loss
        self.meta_gradient = VectorizedMetaGradient(self.net, self.loss_fn, self.config,
                                                    chunk_size, compile=compile_solver)
        self.score_name = "acc" if self.classification else "mse"
        self.val_score = MeanConfidenceInterval()
        self.test_score = MeanConfidenceInterval()
        self.checkpoint_step = 0  # meta-steps of the loaded checkpoint (validate/test report it)
        self.evaluation_result = None  # the last validate/test score (results.ResultFile writes it)
        self.adapted = None  # predict's task: Adapted

    def setup(self, stage: str) -> None:
        require(self.trainer.precision in PRECISIONS, "trainer.precision", self.trainer.precision,
                f"must be one of {PRECISIONS}: float16's loss scaling does not reach the "
                f"gradients the solver takes inside a meta-step; use bf16-mixed")

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams.outer_lr, eps=self.hparams.adam_eps)
        if self.hparams.lr_schedule == "constant":
            return optimizer
        total = self.hparams.lr_schedule_steps or self.trainer.max_steps
        require(total > 0, "model.lr_schedule_steps", total,
                "must be > 0 with model.lr_schedule=cosine (it defaults to trainer.max_steps)")
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total)))
        return {"optimizer": optimizer, "lr_scheduler": schedule}

    def params(self):
        return dict(self.net.named_parameters())

    def episode_scores(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Accuracy or MSE of each task's query set: [tasks]."""
        if self.classification:
            return (outputs.argmax(-1) == targets).float().mean(-1)
        return (outputs - targets).pow(2).flatten(1).mean(-1)

    def training_step(self, batch, batch_idx):
        start = time.perf_counter()
        tasks = Task(*batch)
        params = self.params()
        logs = self.logs_this_step()
        result = self.solve(params, tasks, diagnose_before=logs)
        if not all(torch.isfinite(g).all() for g in result.grads.values()):
            raise SettingError(
                f"model.solver.inner_lr={self.config.inner_lr} is invalid for this problem: the "
                f"meta-gradient became non-finite at step {self.global_step} because the inner "
                f"loop diverged; lower model.solver.inner_lr or raise model.solver.lam ({self.config.lam})")
        optimizer = self.optimizers()
        outer_lr = optimizer.param_groups[0]["lr"]
        optimizer.zero_grad()
        self.manual_backward(surrogate_loss(params, result.grads))
        optimizer.step()
        schedule = self.lr_schedulers()
        if schedule is not None:  # manual optimization steps the schedule itself
            schedule.step()
        seconds = time.perf_counter() - start
        tasks_per_second = len(tasks.query_y) * self.trainer.world_size / seconds
        score_after = self.score_after_adaptation(result, tasks.query_y)
        if logs:
            self.log_training(result, tasks.query_y, score_after, outer_lr, seconds,
                              tasks_per_second)
        self.log_progress(score_after, tasks_per_second)
        d = result.diagnostics
        curves = ("inner_objective_trace", "cg_residual_norms")  # for the TrainingCharts callback
        outputs = {k: d[k].mean(0) for k in curves if k in d}
        if self.classification:  # the first task's query predictions, for the episode picture
            outputs["query_predictions"] = d["query_output_after"][0].argmax(-1)
        return outputs

    def solve(self, params, tasks: Task, diagnose_before: bool):
        try:
            return self.meta_gradient(params, tasks, diagnose_before)
        except DynamoError as error:
            # Dynamo cannot trace the network (torch 2.14 fails on jvp through nn.Linear with
            # per-task weights under vmap when the layer's input carries no tangent: the
            # sinusoid's MLP does not compile, the conv-4 does), or Inductor cannot build its
            # kernels (it needs a C++ compiler).
            reason = str(error).strip().splitlines()[0]
            raise SettingError(f"model.compile_solver=True is invalid here: torch.compile "
                               f"cannot compile the solver for this network and machine "
                               f"({reason}); train with model.compile_solver false") from error

    def score_after_adaptation(self, result, query_y: torch.Tensor) -> torch.Tensor:
        """Meta-batch mean query accuracy (or loss) after adaptation: progress bar and logs."""
        d = result.diagnostics
        return (self.episode_scores(d["query_output_after"], query_y).mean()
                if self.classification else d["query_loss_after"].mean())

    def logs_this_step(self) -> bool:
        """Whether this step's scalars reach a logger (every trainer.log_every_n_steps, counted
        as Lightning counts: one optimizer step per batch here): only then are the diagnostics
        that cost extra work (the query pass before adaptation) computed."""
        trainer = self.trainer
        return bool(self.loggers) and ((self.global_step + 1) % trainer.log_every_n_steps == 0
                                       or trainer.should_stop or bool(trainer.fast_dev_run))

    def log_training(self, result, query_y: torch.Tensor, score_after: torch.Tensor,
                     outer_lr: float, seconds: float, tasks_per_second: float) -> None:
        d = result.diagnostics
        metrics = {f"train/{name}": d[name].float().mean() for name in (
            "query_loss_before", "query_loss_after", "inner_objective_before",
            "inner_objective_after", "inner_grad_norm", "inner_rejected_steps")}
        metrics["train/outer_lr"] = float(outer_lr)
        metrics["train/step_seconds"] = seconds  # the meta-step itself, without data loading
        metrics["train/tasks_per_second"] = tasks_per_second
        metrics["train/lam"] = self.config.lam
        metrics["train/meta_grad_norm"] = torch.linalg.vector_norm(
            torch.cat([g.flatten() for g in result.grads.values()]))
        if "cg_residual_norms" in d:  # iMAML's implicit solve
            metrics["train/cg_residual"] = d["cg_residual_norms"][:, -1].mean()
            metrics["train/cg_iterations"] = d["cg_iterations"].mean()
            metrics["train/cg_negative_curvature"] = d["cg_negative_curvature"].float().mean()
            # Tasks (of this process's share) whose CG returned x0: they contribute their
            # first-order term instead (solver.algorithms.stalled_solve_fallback).
            metrics["train/cg_returned_start"] = d["cg_returned_start"].float().sum()
        if self.classification:
            metrics["train/acc_before"] = self.episode_scores(d["query_output_before"], query_y).mean()
            metrics["train/acc_after"] = score_after
        self.log_dict(metrics, prog_bar=False)

    def log_progress(self, score_after: torch.Tensor, tasks_per_second: float) -> None:
        """The progress bar: meta-train score after adaptation and tasks/s, every step."""
        self.log(f"train/{self.score_name}", score_after, prog_bar=True, logger=False)
        self.log("tasks/s", tasks_per_second, prog_bar=True, logger=False)

    def evaluate(self, batch, score: MeanConfidenceInterval) -> None:
        # Lightning may run evaluation under inference mode; adaptation needs autograd, and
        # inference tensors cannot take part in it, hence the copies.
        with torch.inference_mode(False), torch.enable_grad():
            tasks = Task(*(t.clone() for t in batch))
            outputs = adapt_and_predict(self.net, self.params(), tasks, self.loss_fn, self.config,
                                        adaptation_steps(self.hparams), self.hparams.chunk_size,
                                        self.hparams.batch_norm)
        score.update(self.episode_scores(outputs.detach(), tasks.query_y))

    def validation_step(self, batch, batch_idx):
        self.evaluate(batch, self.val_score)

    def test_step(self, batch, batch_idx):
        self.evaluate(batch, self.test_score)

    def log_score(self, stage: str, score: MeanConfidenceInterval) -> None:
        mean, ci, episodes = score.compute()
        name = f"{stage}/{self.score_name}"
        # Already gathered over every rank's episodes: averaging across ranks changes nothing.
        self.log_dict({name: mean.float(), f"{name}_ci95": ci.float(),
                       f"hp/{stage}_{self.score_name}": mean.float()}, prog_bar=stage == "val",
                      sync_dist=True)
        score.reset()
        if self.trainer.sanity_checking:
            return
        unit, factor = ("%", 100) if self.classification else ("", 1)
        steps = max(self.trainer.global_step, self.checkpoint_step)
        rank_zero_info(f"{name} = {factor * mean:.4g} ± {factor * ci:.2g}{unit} "
                       f"(95% CI) after {steps} meta-steps, batch_norm={self.hparams.batch_norm}")
        self.evaluation_result = {
            "stage": stage, "metric": name, "mean": mean.item(), "ci95": ci.item(),
            "episodes": episodes, "meta_steps": steps, "batch_norm": self.hparams.batch_norm,
            "checkpoint": self.trainer.ckpt_path}

    def on_load_checkpoint(self, checkpoint):
        self.checkpoint_step = checkpoint.get("global_step", 0)

    def on_validation_epoch_end(self):
        self.log_score("val", self.val_score)

    def on_test_epoch_end(self):
        self.log_score("test", self.test_score)

    # predict: one task, its support set given once, its queries in batches (imaml_lightning.predict)

    def on_predict_start(self) -> None:
        support = self.trainer.datamodule.support
        self.adapted = self.adapt(support.x, support.y, len(support.classes) or None)

    def adapt(self, support_x: torch.Tensor, support_y: torch.Tensor,
              classes: Optional[int] = None) -> "Adapted":
        """The network adapted to one support set (test_inner_steps inner steps). A support set
        of fewer classes than the network's outputs uses the first `classes` outputs: the
        meta-learned head is shared across label permutations."""
        weight = next(self.net.parameters())
        support_x, support_y = support_x.to(weight.device, weight.dtype), support_y.to(weight.device)
        loss_fn = partial(first_outputs_cross_entropy, classes) if classes else self.loss_fn
        task = Task(support_x[None], support_y[None], support_x[None, :1], support_y[None, :1])
        with torch.inference_mode(False), torch.enable_grad():
            phi = adapt_tasks(self.net, self.params(), task, loss_fn, self.config,
                              adaptation_steps(self.hparams))
        return Adapted(support_x, {k: v[0].detach() for k, v in phi.items()}, classes)

    def predict_step(self, batch, batch_idx=0):
        """Class probabilities (classification) or outputs (regression) of the adapted network
        for a batch of queries, BatchNorm normalizing with the support set's statistics."""
        support_x, phi, classes = self.adapted
        with torch.no_grad():
            outputs = predict(self.net, phi, support_x, batch.to(support_x), batch_norm="support")
        return outputs[..., :classes].softmax(-1) if self.classification else outputs


def adaptation_steps(hyper_parameters) -> int:
    """The inner steps validation, test and predict adapt with: test_inner_steps, else the
    training's (hyper_parameters: a module's, or a checkpoint's "hyper_parameters")."""
    steps = hyper_parameters["test_inner_steps"]
    return hyper_parameters["solver"]["inner_steps"] if steps is None else steps


class Adapted(NamedTuple):
    support_x: torch.Tensor  # what BatchNorm takes its statistics from
    phi: dict  # the adapted parameters
    classes: Optional[int]  # outputs in use (classification), None: all


def first_outputs_cross_entropy(classes: int, output: torch.Tensor, target: torch.Tensor):
    return F.cross_entropy(output[..., :classes], target)
