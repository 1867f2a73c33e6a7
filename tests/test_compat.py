"""Each private name in imaml_lightning.compat still does what we rely on, in the installed
Lightning and torch: these fail first when an upgrade changes one."""
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.cli import LightningCLI
from pytorch_lightning.demos.boring_classes import BoringDataModule, BoringModel

from imaml_lightning import compat


def test_global_seed_is_the_seed_everything_set(monkeypatch):
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    assert compat.global_seed() is None
    pl.seed_everything(1234, verbose=False)
    assert compat.global_seed() == 1234


def fit(tmp_path, callback, steps):
    trainer = pl.Trainer(default_root_dir=tmp_path, max_steps=steps, callbacks=[callback],
                         logger=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0)
    trainer.fit(BoringModel(), BoringDataModule())
    return trainer


def test_model_checkpoint_records_its_last_saved_step_and_writes_last_on_request(tmp_path):
    callback = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_last=True)
    assert compat.last_saved_step(callback) == 0
    trainer = fit(tmp_path, callback, steps=3)
    assert compat.last_saved_step(callback) == 2  # its every-2-steps save, not step 3
    compat.set_last_saved_step(callback, 1)
    assert compat.last_saved_step(callback) == 1
    (tmp_path / "ckpt" / "last.ckpt").unlink()
    compat.save_last_checkpoint(callback, trainer)
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=False)
    assert saved["global_step"] == 3


def test_lightning_cli_applies_checkpoint_settings_through_the_hook(tmp_path):
    called = []

    class CLI(compat.ConfigFileCheckpointHook, LightningCLI):
        def apply_config_file_checkpoint(self):
            called.append(self.config["subcommand"])

    CLI(BoringModel, BoringDataModule, args=["validate", "--trainer.logger", "false"],
        trainer_defaults={"default_root_dir": str(tmp_path), "enable_progress_bar": False})
    assert called == ["validate"]


def test_dynamo_error_is_what_torch_compile_raises_when_it_cannot_trace():
    @torch.compile(backend="eager", fullgraph=True)
    def untraceable(x):
        torch._dynamo.graph_break()
        return x + 1

    with pytest.raises(compat.DynamoError):
        untraceable(torch.ones(2))


class StopAt(pl.Callback):
    """Stops the run at the end of meta-step `step` the way RunCheckpoint does on a signal."""

    def __init__(self, step):
        self.step, self.validated_at = step, []

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            compat.skip_unscheduled_validation(trainer)
            trainer.should_stop = True

    def on_validation_start(self, trainer, *args):
        self.validated_at.append(trainer.global_step)


@pytest.mark.parametrize("stop_at, validated_at", [(3, [2]), (4, [2, 4])])
def test_a_stop_skips_only_the_validation_lightning_adds_for_it(tmp_path, stop_at, validated_at):
    callback = StopAt(stop_at)
    trainer = pl.Trainer(default_root_dir=tmp_path, max_steps=10, val_check_interval=2,
                         limit_val_batches=1, num_sanity_val_steps=0, callbacks=[callback],
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(BoringModel(), BoringDataModule())
    assert trainer.global_step == stop_at
    assert callback.validated_at == validated_at
