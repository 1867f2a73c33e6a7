"""`python -m imaml_lightning {fit,validate,test} --config configs/X.yaml [--model.X ...]`."""
import json
import pickle
import sys
import warnings
from argparse import ArgumentError
from pathlib import Path
from typing import Optional

import torch
from pytorch_lightning.cli import LightningCLI
from pytorch_lightning.utilities import rank_zero_info
from pytorch_lightning.utilities.exceptions import MisconfigurationException

from imaml_lightning.allocator import keep_freed_memory
from imaml_lightning.charts import TrainingCharts
from imaml_lightning.checkpointing import RunCheckpoint, resumable
from imaml_lightning.compat import ConfigFileCheckpointHook
from imaml_lightning.data import EpisodicDataModule
from imaml_lightning.data.learn2learn_datasets import LEARN2LEARN_NAMES
from imaml_lightning.errors import (
    SettingError, display_path, find_setting_error, require, summarize_parse_error,
)
from imaml_lightning.module import IMAML
from imaml_lightning.result_file import ResultFile
from imaml_lightning.run_settings import (
    RunSettings, check_checkpoint_fits, recorded_network, settings_of, upgrade)


class IMAMLCLI(ConfigFileCheckpointHook, LightningCLI):
    def add_arguments_to_parser(self, parser):
        # --checkpoint.dirpath moves checkpoints; the defaults keep the latest state (last.ckpt)
        # and the best by validation score (configs for regression switch the monitor to
        # val/mse, mode min); --checkpoint.every_n_minutes times the saves between validations.
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
        parser.add_lightning_class_args(TrainingCharts, "charts")  # --charts.every_n_steps
        parser.add_lightning_class_args(ResultFile, "result_file")
        parser.set_defaults({
            "checkpoint.dirpath": "checkpoints",
            "checkpoint.filename": "best-step{step}",
            "checkpoint.auto_insert_metric_name": False,
            "checkpoint.monitor": "val/acc",
            "checkpoint.mode": "max",
            "checkpoint.save_last": True,
        })
        # The data decides the network's output size and the loss.
        parser.link_arguments("data.out_features", "model.out_features", apply_on="instantiate")
        parser.link_arguments("data.problem", "model.problem", apply_on="instantiate")

    def before_fit(self) -> None:
        """`--ckpt_path last` with no last.ckpt yet: say so in one line (Lightning warns in
        several) and train from scratch, so one command serves a job's first start and its
        restarts."""
        if self.config.fit.get("ckpt_path") == "last" and self.last_checkpoint() is None:
            folder = display_path(self.trainer.checkpoint_callback.dirpath)
            rank_zero_info(f"ckpt_path=last: no last.ckpt in {folder}, so training starts from "
                           f"meta-step 0")
            warnings.filterwarnings("ignore", message=".*there is no last checkpoint available.*")
        self.check_checkpoint_fits("fit")

    def before_validate(self) -> None:
        self.check_checkpoint_fits("validate")

    def before_test(self) -> None:
        self.check_checkpoint_fits("test")

    def last_checkpoint(self) -> Optional[Path]:
        folder = self.trainer.checkpoint_callback.dirpath
        found = sorted(Path(folder).glob("last*.ckpt"), key=lambda p: p.stat().st_mtime) if folder else []
        return found[-1] if found else None

    def check_checkpoint_fits(self, subcommand: str) -> None:
        """A checkpoint whose parameters this model cannot take: one line naming the settings
        that differ, before Lightning's load_state_dict traceback. Uses the checkpoint that
        parse_arguments read (`last` is found only now, in the trainer's checkpoint folder)."""
        checkpoint, self.checkpoint = self.checkpoint, None  # not held through training
        if self.config[subcommand].get("ckpt_path") == "last":
            last = self.last_checkpoint()
            checkpoint = last and torch.load(last, map_location="cpu", weights_only=False, mmap=True)
        if checkpoint:
            check_checkpoint_fits(checkpoint, self.model.state_dict(), settings_of(self.config[subcommand]))
            require(subcommand != "fit" or resumable(checkpoint), "ckpt_path", self.config[subcommand].get("ckpt_path"),
                    "holds weights and settings only (a shared model, e.g. models/*.ckpt): validate, "
                    "test and predict take it, fit cannot resume from it")

    def parse_arguments(self, parser, args) -> None:
        """The model settings of a run given a checkpoint (its network included): the config
        file's, then the checkpoint's over them, then the flags typed on the command line over
        both. LightningCLI's own rule puts the checkpoint over everything, so `test --ckpt_path X
        --model.batch_norm support` silently ran with the checkpoint's setting; and it applies
        them after a first parse, which fails where the config file (for other data, say) does
        not name the network."""
        self.command_line = list(sys.argv[1:] if args is None else args)
        self.typed_ckpt_path = ckpt_path_argument(self.command_line)
        # Every checkpoint file is read once, here: its settings, then check_checkpoint_fits.
        self.checkpoint = check_checkpoint_file(self.typed_ckpt_path)
        settings = model_settings(self.checkpoint)
        if settings:
            args = with_model_settings(self.command_line, settings)
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        self.config_file_checkpoint = None  # a ckpt_path set in a config file rather than typed
        if subcommand and self.config[subcommand].get("ckpt_path") != self.typed_ckpt_path:
            self.config_file_checkpoint = check_checkpoint_file(self.config[subcommand].get("ckpt_path"))
            self.checkpoint = self.config_file_checkpoint

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except ValueError as error:  # the solver names its settings solver.X: say where they are
            setting_error = find_setting_error(error)
            if setting_error is None or not str(setting_error).startswith("solver."):
                raise
            raise SettingError(f"model.{setting_error}") from None

    def apply_config_file_checkpoint(self) -> None:
        """A ckpt_path set in a config file rather than typed: its model settings as in
        parse_arguments (a typed one's are applied there)."""
        settings, self.config_file_checkpoint = model_settings(self.config_file_checkpoint), None
        if settings:
            self.config = self.parser.parse_args(with_model_settings(self.command_line, settings))


def with_model_settings(command_line: list, settings: dict) -> list:
    """The command line with --model SETTINGS between its config files and its other flags."""
    config_files, flags = split_config_files(command_line)
    return [*config_files, "--model", json.dumps(settings), *flags]


def ckpt_path_argument(args: list) -> Optional[str]:
    """The --ckpt_path typed on the command line (the last one), if any."""
    found = None
    for arg, following in zip(args, args[1:] + [None]):
        if arg == "--ckpt_path" and following is not None:
            found = following
        elif arg.startswith("--ckpt_path="):
            found = arg.split("=", 1)[1]
    return found


def model_settings(checkpoint: Optional[dict]) -> dict:
    """A checkpoint's model settings for --model: its module hyperparameters and its network
    (no hyperparameter of the module: it is built from --model.net, and recorded in the run
    settings)."""
    if checkpoint is None:
        return {}
    checkpoint = upgrade(checkpoint)
    hparams = checkpoint.get("hyper_parameters") or {}
    settings = {k: v for k, v in hparams.items() if k not in NOT_MODEL_SETTINGS}
    network = recorded_network(checkpoint.get("run_settings") or {})
    if network:
        settings["net"] = network
    return settings


# In a checkpoint's hyperparameters, but no model settings: Lightning's bookkeeping, and the
# values the data module links into the model.
NOT_MODEL_SETTINGS = ("_instantiator", "_class_path", "out_features", "problem")


def split_config_files(args: list) -> tuple:
    """([subcommand, --config files...], [every other argument]), each in its given order."""
    config_files, flags, rest = [], [], list(args)
    while rest:
        arg = rest.pop(0)
        if arg in ("-c", "--config") and rest:
            config_files += [arg, rest.pop(0)]
        elif arg.startswith("--config="):
            config_files.append(arg)
        elif not config_files and not flags and not arg.startswith("-"):
            config_files.append(arg)  # the subcommand
        else:
            flags.append(arg)
    return config_files, flags


LIGHTNING_CHECKPOINT_NAMES = ("last", "best", "hpc", "registry")  # resolved by Lightning itself


def check_checkpoint_file(ckpt_path) -> Optional[dict]:
    """A --ckpt_path that does not exist, is not a checkpoint, or is not one of this program's:
    one line naming it, instead of torch.load's or load_state_dict's traceback. Returns the
    checkpoint (memory-mapped), or None for the names Lightning resolves itself."""
    if ckpt_path is None or ckpt_path in LIGHTNING_CHECKPOINT_NAMES or "://" in str(ckpt_path):
        return None
    path = Path(ckpt_path)
    require(path.is_file(), "ckpt_path", str(ckpt_path), "no such file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as error:
        raise SettingError(f"ckpt_path={str(ckpt_path)!r} is invalid: not a checkpoint that "
                           f"torch.load can read ({str(error).splitlines()[0][:120]})") from None
    require(isinstance(checkpoint, dict) and "state_dict" in checkpoint and "global_step" in checkpoint,
            "ckpt_path", str(ckpt_path), "not a Lightning checkpoint of this program (no state_dict)")
    return checkpoint


TRAINER_DEFAULTS = {
    "logger": {
        "class_path": "pytorch_lightning.loggers.TensorBoardLogger",
        # The module logs the hyperparameters itself, with its score as the HPARAMS metric.
        "init_args": {"save_dir": ".", "name": "lightning_logs", "default_hp_metric": False},
    },
    "max_steps": 1000,
    "val_check_interval": 100,  # training steps between validations (the stream is endless)
    "check_val_every_n_epoch": None,
    "log_every_n_steps": 10,
    "inference_mode": False,  # evaluation adapts to each task, which needs autograd
    "use_distributed_sampler": False,  # the data module shards episodes across ranks itself
    "plugins": [{"class_path": "imaml_lightning.checkpoint_io.AtomicCheckpointIO"}],
}


DATASETS = {  # --data.dataset NAME: short for LightningCLI's --data CLASS_PATH (and its name)
    "sinusoid": ["imaml_lightning.data.SinusoidDataModule"],
    "omniglot": ["imaml_lightning.data.OmniglotDataModule"],
    "miniimagenet": ["imaml_lightning.data.MiniImageNetDataModule"],
    "folder": ["imaml_lightning.data.FolderDataModule"],
    **{name: ["imaml_lightning.data.Learn2LearnDataModule", "--data.name", name]
       for name in LEARN2LEARN_NAMES},
}


def expand_dataset_names(args: list) -> list:
    """["--data.dataset", "folder"] -> ["--data", "imaml_lightning.data.FolderDataModule"], in
    place, so that it overrides a --config before it and settings after it apply to it."""
    expanded, rest = [], list(args)
    while rest:
        arg = rest.pop(0)
        if arg == "--data.dataset" or arg.startswith("--data.dataset="):
            name = arg.partition("=")[2] or (rest.pop(0) if rest else "")
            require(name in DATASETS, "data.dataset", name, f"must be one of {tuple(DATASETS)}")
            expanded += ["--data", *DATASETS[name]]
        else:
            expanded.append(arg)
    return expanded


def main(args=None) -> None:
    keep_freed_memory()
    try:
        if args is None:  # LightningCLI reads sys.argv itself (and warns when given both)
            sys.argv[1:] = expand_dataset_names(sys.argv[1:])
        else:
            args = expand_dataset_names(args)
        IMAMLCLI(
            IMAML,
            EpisodicDataModule,
            subclass_mode_data=True,
            seed_everything_default=0,
            save_config_callback=RunSettings,
            trainer_defaults=TRAINER_DEFAULTS,
            parser_kwargs={"exit_on_error": False},  # parse errors come to us, as one line
            args=args,
        )
    except ArgumentError as error:
        sys.exit(f"error: {summarize_parse_error(str(error))} (--help lists every setting)")
    except MisconfigurationException as error:  # Lightning's own checks of trainer settings
        sys.exit(f"error: a trainer setting is invalid: {str(error).splitlines()[0]}")
    except ValueError as error:
        setting_error = find_setting_error(error)
        if setting_error is None:
            raise
        sys.exit(f"error: {setting_error}")


if __name__ == "__main__":
    main()
