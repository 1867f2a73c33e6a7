"""Checkpoints that never lose training progress.

Lightning 2.6's ModelCheckpoint writes last.ckpt after a validation only when the monitored score
made a new top-k checkpoint, and with manual optimization it ignores `train_time_interval`. So a
run whose validation score peaked early kept last.ckpt at the peak, and `--ckpt_path last` would
have thrown away everything after it. RunCheckpoint keeps the best-by-validation checkpoints as
they are and makes last.ckpt the latest state: after every validation, every `every_n_minutes`
of training, at the end of training, and when the run is asked to stop (SIGTERM: cluster
preemption, SLURM's signal before a time limit; SIGINT: Ctrl-C), after which it ends the run
cleanly.
"""
import signal
import time

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities import rank_zero_info
from pytorch_lightning.utilities.exceptions import SIGTERMException

from imaml_lightning.compat import last_saved_step, save_last_checkpoint, set_last_saved_step
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
        self._last_saved_as_last = None  # the step last.ckpt holds, when this run wrote it

    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._last_write = time.monotonic()
        # Ctrl-C would raise KeyboardInterrupt wherever the step is; finish the step instead (a
        # second Ctrl-C interrupts at once). SIGTERM is Lightning's: trainer.received_sigterm.
        self._previous_sigint = signal.getsignal(signal.SIGINT)
        try:
            signal.signal(signal.SIGINT, self._request_stop)
        except ValueError:  # not the main thread: leave Ctrl-C as it is
            self._previous_sigint = None

    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._restore_sigint()
        self.save_latest(trainer)  # the final step, when no validation ended on it

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._restore_sigint()
        super().on_exception(trainer, pl_module, exception)
        if isinstance(exception, SIGTERMException) and self._stop_signal is None:
            # SIGTERM during a validation: Lightning stops there, after the meta-step's end.
            self._stop_signal = "SIGTERM"
            self.save_latest(trainer)
            self._report_stop(trainer, "SIGTERM")

    def _restore_sigint(self) -> None:
        if self._previous_sigint is not None:
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None

    def _request_stop(self, signum, frame) -> None:
        self._stop_signal = signal.Signals(signum).name
        self._restore_sigint()

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if trainer.received_sigterm and self._stop_signal is None:
            self._stop_signal = "SIGTERM"
        due = self.every_n_minutes > 0 and time.monotonic() - self._last_write >= 60 * self.every_n_minutes
        # Every rank takes part in a save: rank 0 decides for all (clocks and signals differ).
        stop, due = trainer.strategy.broadcast((self._stop_signal, due))
        if stop or due:
            # Not marked as this step's save: a validation after this step still writes its
            # best-by-score checkpoint (ModelCheckpoint skips steps it has saved).
            self.save_latest(trainer, mark_step=False)
        if stop:
            self._report_stop(trainer, stop)
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
    return {**kept, "run_settings": {**kept.get("run_settings", {}), **settings}}


def resumable(checkpoint: dict) -> bool:
    return "optimizer_states" in checkpoint and "loops" in checkpoint
