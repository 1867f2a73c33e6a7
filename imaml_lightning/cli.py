"""`python -m imaml_lightning {fit,validate,test} --config configs/X.yaml [--model.X ...]`."""
import sys

from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.cli import LightningCLI

from imaml_lightning.allocator import keep_freed_memory
from imaml_lightning.data import EpisodicDataModule
from imaml_lightning.errors import find_setting_error
from imaml_lightning.module import IMAML


class IMAMLCLI(LightningCLI):
    def add_arguments_to_parser(self, parser):
        # --checkpoint.dirpath moves checkpoints; the defaults keep the last one and the best by
        # validation score (configs for regression switch the monitor to val/mse, mode min).
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
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


TRAINER_DEFAULTS = {
    "logger": {
        "class_path": "pytorch_lightning.loggers.TensorBoardLogger",
        "init_args": {"save_dir": ".", "name": "lightning_logs"},
    },
    "max_steps": 1000,
    "val_check_interval": 100,  # training steps between validations (the stream is endless)
    "check_val_every_n_epoch": None,
    "log_every_n_steps": 10,
    "inference_mode": False,  # evaluation adapts to each task, which needs autograd
    "use_distributed_sampler": False,  # the data module shards episodes across ranks itself
    "plugins": [{"class_path": "imaml_lightning.checkpoint_io.AtomicCheckpointIO"}],
}


def main(args=None) -> None:
    keep_freed_memory()
    try:
        IMAMLCLI(
            IMAML,
            EpisodicDataModule,
            subclass_mode_data=True,
            seed_everything_default=0,
            trainer_defaults=TRAINER_DEFAULTS,
            args=args,
        )
    except ValueError as error:
        setting_error = find_setting_error(error)
        if setting_error is None:
            raise
        sys.exit(f"error: {setting_error}")


if __name__ == "__main__":
    main()
