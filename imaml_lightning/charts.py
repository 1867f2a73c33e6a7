"""Curves inside a meta-step, drawn into TensorBoard's IMAGES tab every few steps."""
from typing import Dict, Optional

import torch
from pytorch_lightning import Callback
from pytorch_lightning.loggers import TensorBoardLogger

from imaml_lightning.errors import require


def new_figure(width: float, height: float):
    """A matplotlib figure that needs no display (rendered to pixels or files only)."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def line_figure(curves: Dict[str, torch.Tensor], xlabel: str, ylabel: str, log_y: bool = False):
    figure = new_figure(4, 3)
    axes = figure.subplots()
    for label, values in curves.items():
        axes.plot(range(len(values)), values.float().cpu().numpy(), "o-", markersize=3, label=label)
    axes.set(xlabel=xlabel, ylabel=ylabel, yscale="log" if log_y else "linear")
    if len(curves) > 1:
        axes.legend()
    figure.tight_layout()
    return figure


def episode_figure(batch, query_predictions: torch.Tensor, max_images: int = 10):
    """The meta-batch's first task: support images with their labels, then query images with
    true and predicted (after adaptation) labels; wrong predictions in red."""
    support_x, support_y, query_x, query_y = (t[0].detach().cpu() for t in batch)
    panels = [(x, f"support: {y}", "black") for x, y in zip(support_x[:max_images], support_y.tolist())]
    panels += [(x, f"query: {y} -> {p}", "black" if y == p else "red")
               for x, y, p in zip(query_x[:max_images], query_y.tolist(), query_predictions.tolist())]
    columns = min(len(panels), 10)
    rows = -(-len(panels) // columns)
    figure = new_figure(1.3 * columns, 1.5 * rows)
    for i, (image, title, color) in enumerate(panels):
        axes = figure.add_subplot(rows, columns, i + 1)
        pixels = image.permute(1, 2, 0).float().numpy()
        axes.imshow(pixels.squeeze(-1) if pixels.shape[-1] == 1 else pixels.clip(0, 1), cmap="gray")
        axes.set_title(title, fontsize=7, color=color)
        axes.axis("off")
    figure.tight_layout()
    return figure


class TrainingCharts(Callback):
    """Every `every_n_steps` meta-steps (0: never): the inner objective G against the inner step
    and the CG residual norm against the CG iteration, each averaged over the meta-batch, and for
    image data a picture of one episode with the labels predicted after adaptation.

    Reads the curves the module's training_step returns (`inner_objective_trace`,
    `cg_residual_norms`); only rank 0 draws, and only into a TensorBoardLogger.
    """

    def __init__(self, every_n_steps: int = 100):
        require(every_n_steps >= 0, "charts.every_n_steps", every_n_steps, "must be >= 0 (0: off)")
        self.every_n_steps = every_n_steps

    def _writer(self, trainer) -> Optional[object]:
        loggers = [logger for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]
        return loggers[0].experiment if loggers and trainer.is_global_zero else None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step - 1  # the step that just ran, as the scalars are logged
        writer = self._writer(trainer)
        if not self.every_n_steps or step % self.every_n_steps or writer is None or not outputs:
            return
        writer.add_figure("charts/inner_objective", line_figure(
            {"G(phi_k), mean over tasks": outputs["inner_objective_trace"]},
            "inner step k", "proximal objective G"), global_step=step)
        if "query_predictions" in outputs and batch[0].dim() == 5:  # images: [tasks, n, C, H, W]
            writer.add_figure("charts/episode", episode_figure(batch, outputs["query_predictions"]),
                              global_step=step)
        if "cg_residual_norms" in outputs:
            writer.add_figure("charts/cg_residual", line_figure(
                {"||r_k||, mean over tasks": outputs["cg_residual_norms"]},
                "CG iteration k", "residual norm", log_y=True), global_step=step)
