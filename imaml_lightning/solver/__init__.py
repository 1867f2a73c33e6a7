"""The iMAML solver: plain PyTorch (torch.func), usable without Lightning."""
from imaml_lightning.solver.cg import CGResult, conjugate_gradient
from imaml_lightning.solver.losses import mse_loss
from imaml_lightning.solver.imaml import (
    IMAMLConfig,
    MetaGradient,
    Task,
    adapt_and_predict,
    hessian_vector_product,
    meta_gradient,
    surrogate_loss,
    task_meta_gradient,
)

__all__ = [
    "CGResult",
    "IMAMLConfig",
    "MetaGradient",
    "Task",
    "adapt_and_predict",
    "conjugate_gradient",
    "hessian_vector_product",
    "meta_gradient",
    "mse_loss",
    "surrogate_loss",
    "task_meta_gradient",
]
