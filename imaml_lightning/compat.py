"""Every private name of another library that this program relies on, in one place.

A release of Lightning or torch may rename or change any of these without notice; each one here
says why we need it, and tests/test_compat.py fails when one is gone or changes what it does.
pyproject.toml pins the Lightning range they were checked on.
"""
import os
from typing import Optional

import torch
from pytorch_lightning.callbacks import ModelCheckpoint

# Lightning's seed_everything exports the run's seed under this name, so that every process a
# launcher starts (DDP ranks, workers) can read it; the training episodes are drawn from it.
_GLOBAL_SEED_VARIABLE = "PL_GLOBAL_SEED"


def global_seed() -> Optional[int]:
    """The seed --seed_everything set for this run (in any of its processes), or None."""
    seed = os.environ.get(_GLOBAL_SEED_VARIABLE)
    return None if seed is None else int(seed)


# ModelCheckpoint keeps the step of its latest save in a private attribute and writes last.ckpt
# through a private method. RunCheckpoint needs both: it writes last.ckpt at moments
# ModelCheckpoint does not (every validation, a timer, SIGTERM) and must know whether a
# validation's save already holds the current step.
def last_saved_step(checkpoint: ModelCheckpoint) -> int:
    return checkpoint._last_global_step_saved


def set_last_saved_step(checkpoint: ModelCheckpoint, step: int) -> None:
    checkpoint._last_global_step_saved = step


def save_last_checkpoint(checkpoint: ModelCheckpoint, trainer) -> None:
    """Write last.ckpt now, with the metrics a save records (ModelCheckpoint's own way)."""
    checkpoint._save_last_checkpoint(trainer, checkpoint._monitor_candidates(trainer))


# Lightning validates at the end of any meta-step that sets `trainer.should_stop` (meant for early
# stopping), through its training epoch loop's private `_should_check_val_fx`, and skips the next
# validation when the private `_skip_next_val` is set. A stop by signal must not add a validation:
# it would cost a whole validation inside a scheduler's kill grace period, and the steps that get
# validated (so the best checkpoint) would depend on where a run happened to be stopped.
def skip_unscheduled_validation(trainer) -> None:
    """Call before setting `trainer.should_stop` at the end of a meta-step: the validation that
    Lightning would add for the stop is skipped; one the schedule has at this step still runs."""
    loop = trainer.fit_loop.epoch_loop
    if not loop._should_check_val_fx(trainer.fit_loop._data_fetcher):
        loop._skip_next_val = True


class ConfigFileCheckpointHook:
    """LightningCLI applies a checkpoint's hyperparameters in its private `_parse_ckpt_path`,
    after the command line is parsed, with the checkpoint's values over the typed flags. We
    apply them ourselves (flags win), so a subclass replaces that step with
    `apply_config_file_checkpoint`. Mix in before LightningCLI."""

    def _parse_ckpt_path(self) -> None:
        self.apply_config_file_checkpoint()

    def apply_config_file_checkpoint(self) -> None:
        raise NotImplementedError


# Raised by torch.compile when Dynamo cannot trace a function: a network the compiled solver
# cannot take is then one clear error instead of a traceback from inside the compiler.
DynamoError = torch._dynamo.exc.TorchDynamoException
