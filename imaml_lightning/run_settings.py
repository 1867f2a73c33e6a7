"""What a run was started with: written next to its logs, into every checkpoint and into
TensorBoard's HPARAMS tab, and checked against the data and against a checkpoint to resume or
evaluate before anything runs, so a mismatch is one line naming the settings."""
import json
from dataclasses import fields
from typing import Optional

import torch
from pytorch_lightning.cli import SaveConfigCallback

from imaml_lightning.errors import SettingError
from imaml_lightning.solver import SolverConfig

SECTIONS = ("model", "data")
VERSION = 2  # 1: solver settings flat (model.lam), run_settings values as JSON strings
SOLVER_FIELDS = tuple(f.name for f in fields(SolverConfig))


class RunSettings(SaveConfigCallback):
    """Lightning's config.yaml in the log folder, plus: the model and data settings as plain
    values in every checkpoint ("run_settings"), the HPARAMS table, and two checks at setup."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self.settings = settings_of(self.config)
        check_network_fits_data(pl_module, trainer.datamodule)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint["run_settings"] = self.settings
        checkpoint["run_settings_version"] = VERSION

    def on_fit_start(self, trainer, pl_module) -> None:
        self.log_hyperparameters(pl_module, "val")

    def on_test_start(self, trainer, pl_module) -> None:
        self.log_hyperparameters(pl_module, "test")

    def log_hyperparameters(self, pl_module, stage: str) -> None:
        """Every model and data setting in TensorBoard's HPARAMS tab, next to the run's score
        (`hp/val_acc` follows each validation, `hp/test_acc` the test), so runs can be compared."""
        settings = {k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v)
                    for k, v in self.settings.items()}
        for logger in pl_module.loggers:
            logger.log_hyperparams(settings, {f"hp/{stage}_{pl_module.score_name}": float("nan")})


def settings_of(config) -> dict:
    """{"model.solver.lam": 0.5, "data.init_args.ways": 5, ...} of a run's parsed config, as JSON
    values (str, numbers, lists, dicts): a checkpoint must load with weights_only=True."""
    config = config.clone().as_dict()
    flat = {k: v for section in SECTIONS for k, v in flatten(config.get(section) or {}, section).items()}
    return json.loads(json.dumps(flat, default=str))


def flatten(tree: dict, prefix: str) -> dict:
    """{"a": {"b": 1}} -> {"prefix.a.b": 1}"""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}"
        flat.update(flatten(value, name) if isinstance(value, dict) else {name: value})
    return flat


def upgrade(checkpoint: dict) -> dict:
    """A checkpoint of version 1 (before the solver settings were nested) read as version 2, in
    place: its hyperparameters and run_settings in today's names and types."""
    if checkpoint.get("run_settings_version", 1) >= VERSION:
        return checkpoint
    hparams = checkpoint.get("hyper_parameters") or {}
    solver = {k: hparams.pop(k) for k in SOLVER_FIELDS if k in hparams}
    if solver:
        hparams["solver"] = solver
    renamed = {f"model.{k}": f"model.solver.{k}" for k in SOLVER_FIELDS}
    checkpoint["run_settings"] = {renamed.get(k, k): json.loads(v) if isinstance(v, str) else v
                                  for k, v in (checkpoint.get("run_settings") or {}).items()}
    checkpoint["run_settings_version"] = VERSION
    return checkpoint


def check_network_fits_data(pl_module, datamodule) -> None:
    """One forward pass on one support set: a network built for other inputs (channels, image
    size) fails here with one message, not deep inside the vectorized solver."""
    sampler = getattr(datamodule, "sampler", None)
    if sampler is None:
        return
    x = sampler("val", torch.Generator().manual_seed(0))[0]
    weight = next(pl_module.net.parameters())
    x = x.to(weight.device, weight.dtype if weight.is_floating_point() else torch.float32)
    error = forward_error(pl_module.net, x)
    if error:
        raise SettingError(
            f"model.net is invalid for this data: its inputs are {list(x.shape[1:])} ({error}); "
            f"make model.net.init_args (in_channels, image_size, in_features) match the data "
            f"(data.channels, data.image_size)")


def forward_error(net, x: torch.Tensor) -> Optional[str]:
    """torch's first error line when `net` cannot take `x` (shapes, dtypes), else None; out of
    memory is no input error and surfaces as it is."""
    training = net.training
    try:
        net.eval()  # a user's network may keep running statistics: leave them be
        with torch.no_grad():
            net(x)
    except RuntimeError as error:
        if "out of memory" in str(error):
            raise
        return str(error).splitlines()[0]
    finally:
        net.train(training)
    return None


# Where a run read and wrote its data: they differ between machines and never change the network.
PLACE_SETTINGS = ("data.init_args.root", "data.init_args.cache_dir", "data.init_args.download",
                  "data.init_args.num_workers")


def check_checkpoint_fits(checkpoint: dict, state_dict: dict, settings: dict) -> None:
    error = incompatibility(upgrade(checkpoint), state_dict, settings)
    if error:
        raise SettingError(f"ckpt_path is invalid: {error}")


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
                 if k in saved and saved[k] != v and k not in PLACE_SETTINGS]
    return (f"the checkpoint holds another network ({'; '.join(problems[:3])}); settings that "
            f"differ: {', '.join(differing) or 'unknown (not recorded)'}. Use the settings it "
            f"was trained with (config.yaml in its lightning_logs version folder, or models/models.json "
            f"for a shipped model)")


def section(settings: dict, prefix: str) -> dict:
    """The keyword arguments recorded under `prefix`, nested again ("a.b": 1 -> {"a": {"b": 1}})."""
    arguments = {}
    for key, value in settings.items():
        if key.startswith(prefix):
            *parents, name = key[len(prefix):].split(".")
            node = arguments
            for parent in parents:
                node = node.setdefault(parent, {})
            node[name] = value
    return arguments


def recorded_network(settings: dict) -> Optional[dict]:
    """The network a checkpoint was trained with ({"class_path", "init_args"}), from its
    run_settings; None where they do not record it."""
    if "model.net.class_path" not in settings:
        return None
    return {"class_path": settings["model.net.class_path"],
            "init_args": section(settings, "model.net.init_args.")}
