"""Checkpoints that never lose training progress.

Lightning 2.6's ModelCheckpoint writes last.ckpt after a validation only when the monitored score
made a new top-k checkpoint, and with manual optimization it ignores `train_time_interval`. So a
run whose validation score peaked early kept last.ckpt at the peak, and `--ckpt_path last` would
have thrown away everything after it. RunCheckpoint keeps the best-by-validation checkpoints as
they are and makes last.ckpt the latest state: after every validation, every `every_n_minutes`
of training, at the end of training, and when the run is asked to stop (SIGTERM: cluster
preemption, SLURM's signal before a time limit; SIGINT: Ctrl-C), after which it ends the run
cleanly, without the validation Lightning would add for the stop (the validated steps, and so
the best checkpoint, then depend on `val_check_interval` alone, not on where a run was stopped).
"""
import copy
import functools
import signal
import time

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities import rank_zero_info
from pytorch_lightning.utilities.exceptions import SIGTERMException

from imaml_lightning.compat import (
    last_saved_step, save_last_checkpoint, set_last_saved_step, skip_unscheduled_validation)
from imaml_lightning.errors import display_path, require


class RunCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose last.ckpt is always the latest state.

    Args:
        every_n_minutes: also write last.ckpt after the first meta-step that ends this many
            minutes of training after the previous write (0: only at validations and stops).
            Default 10: a run that validates rarely loses at most that, and writing the
            checkpoint (a few MB) costs a negligible part of it.
        (every other argument is ModelCheckpoint's)
    """

    def __init__(self, *args, every_n_minutes: float = 10.0, **kwargs):
        super().__init__(*args, **kwargs)
        require(every_n_minutes >= 0, "checkpoint.every_n_minutes", every_n_minutes, "must be >= 0")
        self.every_n_minutes = every_n_minutes
        self._last_write = time.monotonic()
        self._stop_signal = None  # the signal that asked this process to stop
        self._previous_sigint = None
        self._launcher = None
        self._last_saved_as_last = None  # the step last.ckpt holds, when this run wrote it

    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._last_write = time.monotonic()
        # A stop signal only marks the request; the ranks agree on it at the end of a meta-step
        # (or a validation), all at the same point. Lightning 2.6's own SIGTERM handler
        # calls dist.broadcast inside the handler, which pairs with whatever collective another
        # rank is in (the meta-gradient's all-reduce): signalled at once, the ranks hung (CI,
        # stop 33). Ctrl-C would raise KeyboardInterrupt mid-step; a second one still does.
        self._launcher = trainer.strategy.launcher
        try:
            self._previous_sigint = signal.signal(signal.SIGINT, self._request_stop)
            signal.signal(signal.SIGTERM, self._request_stop)  # Lightning's teardown restores its own
        except ValueError:  # not the main thread: leave the signals as they are
            self._previous_sigint = None

    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._restore_sigint()
        self.save_latest(trainer)  # the final step, when no validation ended on it

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._restore_sigint()
        super().on_exception(trainer, pl_module, exception)
        if isinstance(exception, SIGTERMException) and self._stop_signal is None:
            # SIGTERM before training started (Lightning's handler then): stop there.
            self._stop_signal = "SIGTERM"
            self.save_latest(trainer)
            self._report_stop(trainer, "SIGTERM")

    def _restore_sigint(self) -> None:
        if self._previous_sigint is not None:
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None

    def _request_stop(self, signum, frame) -> None:
        self._stop_signal = self._stop_signal or signal.Signals(signum).name
        if signum == signal.SIGINT:
            self._restore_sigint()
        elif self._launcher is not None:  # processes Lightning started itself get it too
            self._launcher.kill(signum)

    def _agreed(self, trainer: "pl.Trainer", due: bool = False) -> tuple:
        """(the stop signal if any rank has one, rank 0's `due`): one all-reduce, the same on
        every rank, so each takes part in the same saves."""
        mine = signal.Signals[self._stop_signal].value if self._stop_signal else 0
        rank_0_due = float(due and trainer.is_global_zero)
        signum, due = trainer.strategy.reduce(  # max: the other ranks' due is 0
            torch.tensor([float(mine), rank_0_due], device=trainer.strategy.root_device),
            reduce_op="max").tolist()
        return (signal.Signals(int(signum)).name if signum else None), bool(due)

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        due = self.every_n_minutes > 0 and time.monotonic() - self._last_write >= 60 * self.every_n_minutes
        stop, due = self._agreed(trainer, due)  # rank 0's clock decides `due`
        if stop or due:
            # Not marked as this step's save: a validation after this step still writes its
            # best-by-score checkpoint (ModelCheckpoint skips steps it has saved).
            self.save_latest(trainer, mark_step=False)
        if stop:
            skip_unscheduled_validation(trainer)  # a stop is no reason to validate
            self._stop(trainer, stop)

    def _stop(self, trainer: "pl.Trainer", name: str) -> None:
        self._stop_signal = name
        self._report_stop(trainer, name)
        trainer.should_stop = True

    def _report_stop(self, trainer: "pl.Trainer", name: str) -> None:
        rank_zero_info(f"Stopped on {name} after meta-step {trainer.global_step}: "
                       f"{display_path(self.last_model_path)} holds that state. Resume with the "
                       f"same command and --ckpt_path last")

    def on_validation_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        super().on_validation_end(trainer, pl_module)  # best-by-score, and last if that saved
        if last_saved_step(self) == trainer.global_step:  # ModelCheckpoint's rule for last
            self._last_saved_as_last = trainer.global_step
        self.save_latest(trainer)
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking and not trainer.should_stop:
            # A signal during the validation: stop here, not a meta-step later. (Not per
            # validation batch: the ranks' shares of the episodes may differ by one.)
            stop, _ = self._agreed(trainer)
            if stop:
                self._stop(trainer, stop)

    def save_latest(self, trainer: "pl.Trainer", mark_step: bool = True) -> None:
        """Write last.ckpt unless it already holds this step (or this is no training run)."""
        not_training = (bool(trainer.fast_dev_run) or trainer.state.fn != TrainerFn.FITTING
                        or trainer.sanity_checking)
        if self.save_last and not not_training and self._last_saved_as_last != trainer.global_step:
            saved_step = last_saved_step(self)
            save_last_checkpoint(self, trainer)
            self._last_saved_as_last = trainer.global_step
            if not mark_step:
                set_last_saved_step(self, saved_step)
        self._last_write = time.monotonic()


# What `validate`, `test` and `predict` read from a checkpoint: the weights, the settings that
# rebuild the network and solver, and the bookkeeping Lightning checks on load.
SHAREABLE_KEYS = ("state_dict", "hyper_parameters", "hparams_name", "run_settings",
                  "run_settings_version", "global_step", "epoch", "pytorch-lightning_version")


def shareable(checkpoint: dict, **settings) -> dict:
    """A checkpoint to give away: weights and settings only (no optimizer state, loops or
    callbacks: a third of the size, and nothing of the machine it trained on), with `settings`
    over its run settings (e.g. data.init_args.root). It validates, tests and predicts; it
    cannot resume training."""
    kept = {key: checkpoint[key] for key in SHAREABLE_KEYS if key in checkpoint}
    unknown = set(settings) - set(kept.get("run_settings", {}))
    require(not unknown, "settings", sorted(unknown), "must be run settings of the checkpoint")
    hyper_parameters = copy.deepcopy(kept.get("hyper_parameters", {}))
    for name, value in settings.items():
        if name.startswith("model."):  # evaluation rebuilds the model from its hyperparameters
            *parents, key = name.split(".")[1:]
            functools.reduce(dict.__getitem__, parents, hyper_parameters)[key] = value
    return {**kept, "hyper_parameters": hyper_parameters,
            "run_settings": {**kept.get("run_settings", {}), **settings}}


def resumable(checkpoint: dict) -> bool:
    return "optimizer_states" in checkpoint and "loops" in checkpoint
