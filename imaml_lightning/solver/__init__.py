"""The iMAML solver: plain PyTorch (torch.func), usable without Lightning."""
from imaml_lightning.solver.cg import CGResult, conjugate_gradient
from imaml_lightning.solver.losses import mse_loss
from imaml_lightning.solver.curvature import CURVATURES, hessian_vector_product
from imaml_lightning.solver.imaml import (
    ALGORITHMS,
    IMAMLConfig,
    MetaGradient,
    Task,
    adapt_and_predict,
    meta_gradient,
    meta_gradient_loop,
    surrogate_loss,
    task_meta_gradient,
)
from imaml_lightning.solver.inner import INNER_SOLVERS

__all__ = [
    "ALGORITHMS",
    "CURVATURES",
    "INNER_SOLVERS",
    "meta_gradient_loop",
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
