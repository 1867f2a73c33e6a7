"""The LightningModule: orchestrates the solver, the optimizer and the logs.

The algorithm itself lives in imaml_lightning.solver (plain PyTorch); this layer turns a batch
into solver calls, hands the meta-gradient to the optimizer through autograd (so distributed
strategies reduce it) and logs what happens.
"""
import json
import math
import time
from pathlib import Path
from typing import Callable, Literal, Optional

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.utilities import rank_zero_info
from torch import nn

from imaml_lightning.errors import SettingError, require
from imaml_lightning.metrics import MeanConfidenceInterval
from imaml_lightning.solver import (
    IMAMLConfig, Task, adapt_and_predict, meta_gradient, mse_loss, surrogate_loss,
)


class IMAML(pl.LightningModule):
    """Implicit MAML (iMAML-GD, iMAML-HF), and the MAML, first-order MAML and Reptile baselines.

    Args:
        net: builds the network from its output size (the data module supplies the size).
        out_features: network output size; set from the data module by the command line.
        problem: "classification" (cross-entropy, accuracy) or "regression" (MSE).
        algorithm: "imaml", or a baseline on the same data and network: "maml", "fomaml", "reptile".
        lam: proximal regularization strength lambda of the inner problem (iMAML).
        curvature: the matrix C of the implicit system I + C/lam and of HF's Newton system:
            "gauss_newton" (default: positive semi-definite, about half the cost per product;
            chosen by test accuracy at equal CPU time, benchmarks/curvature_at_equal_time.py),
            "gauss_newton_fd" (the same, J v by a forward difference) or "hessian" (exact;
            indefinite away from the inner minimizer).
        inner_solver: "gd", "adam" or "hf" (Hessian-free Newton with line search, iMAML-HF).
        inner_steps / inner_lr: iterations of the inner solver, and the step size of gd and adam.
        hf_cg_steps: CG iterations per Newton direction ("hf").
        inner_tol: a task stops adapting once the gradient norm of its inner objective is below.
        cg_steps / cg_tol: conjugate gradient for the implicit meta-gradient.
        outer_lr / adam_eps: Adam on the meta-parameters.
        lr_schedule: "constant", or "cosine": outer_lr decays to 0 along a half cosine over
            lr_schedule_steps meta-steps (default trainer.max_steps), which settles the
            meta-parameters for the final checkpoint.
        test_inner_steps: inner steps at validation and test (default: inner_steps).
        chunk_size: tasks vectorized together (None: the whole meta-batch).
    """

    def __init__(
        self,
        net: Callable[[int], nn.Module],
        out_features: int = 1,
        problem: Literal["classification", "regression"] = "classification",
        algorithm: Literal["imaml", "maml", "fomaml", "reptile"] = "imaml",
        lam: float = 0.5,
        curvature: Literal["hessian", "gauss_newton", "gauss_newton_fd"] = "gauss_newton",
        inner_solver: Literal["gd", "adam", "hf"] = "gd",
        inner_steps: int = 10,
        inner_lr: float = 0.1,
        hf_cg_steps: int = 5,
        inner_tol: float = 0.0,
        cg_steps: int = 5,
        cg_tol: float = 0.0,
        outer_lr: float = 1e-3,
        adam_eps: float = 1e-8,
        lr_schedule: Literal["constant", "cosine"] = "constant",
        lr_schedule_steps: Optional[int] = None,
        test_inner_steps: Optional[int] = None,
        chunk_size: Optional[int] = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["net"])
        self.automatic_optimization = False
        try:
            self.config = IMAMLConfig(lam=lam, inner_steps=inner_steps, inner_lr=inner_lr,
                                      cg_steps=cg_steps, cg_tol=cg_tol, algorithm=algorithm,
                                      inner_solver=inner_solver, hf_cg_steps=hf_cg_steps,
                                      inner_tol=inner_tol, curvature=curvature)
        except SettingError as error:  # the solver names its own fields; say where they are set
            raise SettingError(f"model.{error}") from None
        require(outer_lr > 0, "model.outer_lr", outer_lr, "must be > 0")
        require(test_inner_steps is None or test_inner_steps >= 0, "model.test_inner_steps",
                test_inner_steps, "must be >= 0 or null")
        require(chunk_size is None or chunk_size >= 1, "model.chunk_size", chunk_size,
                "must be >= 1 or null")
        self.net = net(out_features)
        self.classification = problem == "classification"
        self.loss_fn = F.cross_entropy if self.classification else mse_loss
        self.score_name = "acc" if self.classification else "mse"
        self.val_score = MeanConfidenceInterval()
        self.test_score = MeanConfidenceInterval()
        self.checkpoint_step = 0  # meta-steps of the loaded checkpoint (validate/test report it)
        self.run_settings = {}  # model and data settings of this run (set by the command line)

    def setup(self, stage: str) -> None:
        self.check_network_fits_data()

    def check_network_fits_data(self) -> None:
        """One forward pass on one support set: a network built for other inputs (channels,
        image size) fails here with one message, not deep inside the vectorized solver."""
        sampler = getattr(self.trainer.datamodule, "sampler", None) if self._trainer else None
        if sampler is None:
            return
        x = sampler("val", torch.Generator().manual_seed(0))[0]
        weight = next(self.net.parameters())
        x = x.to(weight.device, weight.dtype if weight.is_floating_point() else torch.float32)
        training = self.net.training
        try:
            self.net.eval()  # a user's network may keep running statistics: leave them be
            with torch.no_grad():
                self.net(x)
        except RuntimeError as error:
            raise SettingError(
                f"model.net is invalid for this data: its inputs are {list(x.shape[1:])} "
                f"({str(error).splitlines()[0]}); make model.net.init_args (in_channels, "
                f"image_size, in_features) match the data (data.channels, data.image_size)"
            ) from None
        finally:
            self.net.train(training)

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
        result = meta_gradient(self.net, params, tasks, self.loss_fn, self.config,
                               self.hparams.chunk_size, diagnose_before=logs)
        if not all(torch.isfinite(g).all() for g in result.grads.values()):
            raise SettingError(
                f"model.inner_lr={self.config.inner_lr} is invalid for this problem: the "
                f"meta-gradient became non-finite at step {self.global_step} because the inner "
                f"loop diverged; lower model.inner_lr or raise model.lam ({self.config.lam})")
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

    def score_after_adaptation(self, result, query_y: torch.Tensor) -> torch.Tensor:
        """Meta-batch mean query accuracy (or loss) after adaptation: progress bar and logs."""
        d = result.diagnostics
        return (self.episode_scores(d["query_output_after"], query_y).mean()
                if self.classification else d["query_loss_after"].mean())

    def logs_this_step(self) -> bool:
        """Whether this step's scalars reach a logger (every trainer.log_every_n_steps): only
        then are the diagnostics that cost extra work (the query pass before adaptation)
        computed. Lightning's own test, which is not public API."""
        trainer = self.trainer
        return bool(self.loggers) and (trainer._logger_connector.should_update_logs
                                       or bool(trainer.fast_dev_run))

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
            # first-order term instead (solver.imaml.stalled_solve_fallback).
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
                                        self.hparams.test_inner_steps, self.hparams.chunk_size)
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
                       f"(95% CI) after {steps} meta-steps")
        if self.trainer.state.fn != "fit":  # validate / test: a result file next to the logs
            self.write_result(stage, {"metric": name, "mean": mean.item(), "ci95": ci.item(),
                                      "episodes": episodes, "meta_steps": steps,
                                      "checkpoint": self.trainer.ckpt_path})

    def write_result(self, stage: str, result: dict) -> None:
        folder = self.trainer.log_dir
        if folder is None or not self.trainer.is_global_zero:
            return
        path = Path(folder) / f"{stage}_result.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
        rank_zero_info(f"result written to {path}")

    def on_save_checkpoint(self, checkpoint):
        checkpoint["run_settings"] = self.run_settings

    def on_load_checkpoint(self, checkpoint):
        self.checkpoint_step = checkpoint.get("global_step", 0)
        error = incompatibility(checkpoint, self.state_dict(), self.run_settings)
        if error:
            raise SettingError(f"ckpt_path is invalid: {error}")

    def on_fit_start(self):
        self.log_hyperparameters("val")

    def on_test_start(self):
        self.log_hyperparameters("test")

    def log_hyperparameters(self, stage: str) -> None:
        """Every model and data setting in TensorBoard's HPARAMS tab, next to the run's score
        (`hp/val_acc` follows each validation, `hp/test_acc` the test), so runs can be compared."""
        settings = {k: json.loads(v) for k, v in self.run_settings.items()} or dict(self.hparams)
        settings = {k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v)
                    for k, v in settings.items()}
        for logger in self.loggers:
            logger.log_hyperparams(settings, {f"hp/{stage}_{self.score_name}": float("nan")})

    def on_validation_epoch_end(self):
        self.log_score("val", self.val_score)

    def on_test_epoch_end(self):
        self.log_score("test", self.test_score)


def incompatibility(checkpoint: dict, state_dict: dict, settings: dict) -> Optional[str]:
    """Why a checkpoint's parameters cannot load into this model (None if they can), naming the
    settings that differ, instead of the shape traceback load_state_dict would give."""
    saved = checkpoint.get("state_dict", {})
    problems = [f"{k} is {list(saved[k].shape)} there, {list(v.shape)} here"
                for k, v in state_dict.items() if k in saved and saved[k].shape != v.shape]
    problems += [f"{k} is missing there" for k in state_dict if k not in saved]
    problems += [f"{k} is not in this model" for k in saved if k not in state_dict]
    if not problems:
        return None
    saved = checkpoint.get("run_settings") or {}
    differing = [f"{k}={saved[k]} there, {v} here" for k, v in settings.items()
                 if k in saved and saved[k] != v]
    return (f"the checkpoint holds another network ({'; '.join(problems[:3])}); settings that "
            f"differ: {', '.join(differing) or 'unknown (not recorded)'}. Resume with the settings "
            f"it was trained with (config.yaml in its lightning_logs version folder)")
