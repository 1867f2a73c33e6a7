"""`python -m imaml_lightning {fit,validate,test} --config configs/X.yaml [--model.X ...]`."""
import json
import pickle
import sys
import warnings
from argparse import ArgumentError
from pathlib import Path

import torch
from pytorch_lightning.cli import LightningCLI, SaveConfigCallback
from pytorch_lightning.utilities import rank_zero_info
from pytorch_lightning.utilities.exceptions import MisconfigurationException

from imaml_lightning.allocator import keep_freed_memory
from imaml_lightning.charts import TrainingCharts
from imaml_lightning.checkpointing import RunCheckpoint
from imaml_lightning.data import EpisodicDataModule
from imaml_lightning.errors import (
    SettingError, display_path, find_setting_error, require, summarize_parse_error,
)
from imaml_lightning.module import IMAML


class IMAMLCLI(LightningCLI):
    def add_arguments_to_parser(self, parser):
        # --checkpoint.dirpath moves checkpoints; the defaults keep the latest state (last.ckpt)
        # and the best by validation score (configs for regression switch the monitor to
        # val/mse, mode min); --checkpoint.every_n_minutes times the saves between validations.
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
        parser.add_lightning_class_args(TrainingCharts, "charts")  # --charts.every_n_steps
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
        if self.config.fit.get("ckpt_path") != "last":
            return
        folder = self.trainer.checkpoint_callback.dirpath
        if folder and not list(Path(folder).glob("last*.ckpt")):
            rank_zero_info(f"ckpt_path=last: no last.ckpt in {display_path(folder)}, so training "
                           f"starts from meta-step 0")
            warnings.filterwarnings("ignore", message=".*there is no last checkpoint available.*")

    def parse_arguments(self, parser, args) -> None:
        super().parse_arguments(parser, args)
        # Before LightningCLI itself reads the checkpoint's hyperparameters (with torch.load).
        subcommand = self.config.get("subcommand")
        if subcommand:
            check_checkpoint_file(self.config[subcommand].get("ckpt_path"))


LIGHTNING_CHECKPOINT_NAMES = ("last", "best", "hpc", "registry")  # resolved by Lightning itself


def check_checkpoint_file(ckpt_path) -> None:
    """A --ckpt_path that does not exist, is not a checkpoint, or is not one of this program's:
    one line naming it, instead of torch.load's or load_state_dict's traceback."""
    if ckpt_path is None or ckpt_path in LIGHTNING_CHECKPOINT_NAMES or "://" in str(ckpt_path):
        return
    path = Path(ckpt_path)
    require(path.is_file(), "ckpt_path", str(ckpt_path), "no such file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as error:
        raise SettingError(f"ckpt_path={str(ckpt_path)!r} is invalid: not a checkpoint that "
                           f"torch.load can read ({str(error).splitlines()[0][:120]})") from None
    require(isinstance(checkpoint, dict) and "state_dict" in checkpoint and "global_step" in checkpoint,
            "ckpt_path", str(ckpt_path), "not a Lightning checkpoint of this program (no state_dict)")


class SaveConfigInCheckpoints(SaveConfigCallback):
    """Writes config.yaml to the log folder (Lightning's behaviour) and hands the model and data
    settings to the module, which records them in every checkpoint: a resume with settings that
    change the network can then name them."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        config = self.config.clone().as_dict()
        pl_module.run_settings = {k: json.dumps(v, default=str) for section in ("model", "data")
                                  for k, v in flatten(config.get(section) or {}, section).items()}


def flatten(tree: dict, prefix: str) -> dict:
    """{"a": {"b": 1}} -> {"prefix.a.b": 1}"""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}"
        flat.update(flatten(value, name) if isinstance(value, dict) else {name: value})
    return flat


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


DATASETS = {  # --data.dataset NAME: a short name for LightningCLI's --data CLASS_PATH
    "sinusoid": "imaml_lightning.data.SinusoidDataModule",
    "omniglot": "imaml_lightning.data.OmniglotDataModule",
    "miniimagenet": "imaml_lightning.data.MiniImageNetDataModule",
    "folder": "imaml_lightning.data.FolderDataModule",
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
            expanded += ["--data", DATASETS[name]]
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
            save_config_callback=SaveConfigInCheckpoints,
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
