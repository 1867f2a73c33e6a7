"""`validate` and `test` leave their score in a file: {stage}_result.json next to the logs."""
import json
from pathlib import Path

from pytorch_lightning import Callback
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities import rank_zero_info


class ResultFile(Callback):
    """Writes the module's `evaluation_result` (mean, 95% CI, episodes, meta-steps, BatchNorm
    mode, checkpoint) and the dataset's name after validate and test; `report` reads these files."""

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.state.fn == TrainerFn.VALIDATING:  # not the validations inside fit
            self.write(trainer, pl_module)

    def on_test_end(self, trainer, pl_module) -> None:
        self.write(trainer, pl_module)

    def write(self, trainer, pl_module) -> None:
        result = pl_module.evaluation_result
        if result is None or trainer.log_dir is None or not trainer.is_global_zero:
            return
        result = {**result, "dataset": getattr(trainer.datamodule, "dataset_name", None)}
        path = Path(trainer.log_dir) / f"{result['stage']}_result.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
        rank_zero_info(f"result written to {path}")
