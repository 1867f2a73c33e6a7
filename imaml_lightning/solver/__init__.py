"""The iMAML solver: plain PyTorch (torch.func), usable without Lightning.

config.py      what it takes: Task, SolverConfig
algorithms.py  each algorithm's meta-gradient for one task (iMAML, MAML, FOMAML, Reptile)
batched.py     a meta-batch at once (vmap, optionally compiled): VectorizedMetaGradient,
               meta_gradient, adapt_tasks, adapt_and_predict
inner.py       inner solvers (gd, adam, hf) on the proximal objective (objective.py)
curvature.py   Hessian and Gauss-Newton products; cg.py: conjugate gradient
batch_norm.py  BatchNorm with the support set's statistics (non-transductive predictions)
reference.py   the per-task loop meta_gradient is tested against
"""
from imaml_lightning.solver.batch_norm import BATCH_NORM_MODES
from imaml_lightning.solver.batched import (
    VectorizedMetaGradient, adapt_and_predict, adapt_tasks, meta_gradient, predict, surrogate_loss,
)
from imaml_lightning.solver.cg import CGResult, conjugate_gradient
from imaml_lightning.solver.config import ALGORITHMS, MetaGradient, SolverConfig, Task
from imaml_lightning.solver.curvature import CURVATURES, hessian_vector_product
from imaml_lightning.solver.inner import INNER_SOLVERS
from imaml_lightning.solver.losses import mse_loss
from imaml_lightning.solver.algorithms import task_meta_gradient

__all__ = [
    "ALGORITHMS", "BATCH_NORM_MODES", "CURVATURES", "INNER_SOLVERS", "CGResult", "MetaGradient",
    "SolverConfig", "Task", "VectorizedMetaGradient", "adapt_and_predict", "adapt_tasks",
    "conjugate_gradient", "hessian_vector_product", "meta_gradient", "mse_loss", "predict",
    "surrogate_loss", "task_meta_gradient",
]
