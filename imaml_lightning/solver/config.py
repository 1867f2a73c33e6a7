"""What the solver takes: a task, the settings of the meta-learning algorithm, and its result."""
from dataclasses import dataclass
from typing import Literal, NamedTuple, Optional

import torch

from imaml_lightning.errors import require
from imaml_lightning.solver.curvature import CURVATURES
from imaml_lightning.solver.inner import INNER_SOLVERS
from imaml_lightning.solver.tree import Params

ALGORITHMS = ("imaml", "maml", "fomaml", "reptile")


class Task(NamedTuple):
    """Support and query sets; the solver's batched functions take a leading task dimension."""

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor


@dataclass(frozen=True)
class SolverConfig:
    """The meta-learning algorithm and its inner and implicit solves (one object for iMAML and
    the baselines; the command line sets it as --model.solver.NAME)."""

    algorithm: Literal["imaml", "maml", "fomaml", "reptile"] = "imaml"
    """iMAML, or a baseline on the same data and network: MAML, first-order MAML, Reptile."""
    lam: float = 0.5
    """Proximal regularization strength lambda of the inner problem (iMAML only)."""
    curvature: Literal["hessian", "gauss_newton", "gauss_newton_fd"] = "gauss_newton"
    """The matrix C of the implicit system I + C/lam and of HF's Newton system: the generalized
    Gauss-Newton matrix (positive semi-definite, cheaper per product; "_fd": J v by
    a forward difference), or the exact Hessian (indefinite away from the inner minimizer)."""
    inner_solver: Literal["gd", "adam", "hf"] = "gd"
    """Inner solver: gradient descent, Adam, or Hessian-free Newton with line search (iMAML-HF)."""
    inner_steps: int = 10
    """Iterations of the inner solver in training."""
    inner_lr: float = 0.1
    """Step size of gd and adam (hf searches from the full Newton step)."""
    reptile_batch_size: Optional[int] = 10
    """Reptile's training only: examples per inner step, every step on the next minibatch of the
    task's examples (Nichol et al. use 10); null: all of them at every step."""
    hf_cg_steps: int = 5
    """CG iterations per Newton direction of hf."""
    inner_tol: float = 0.0
    """A task stops adapting once the gradient norm of its inner objective is below this."""
    cg_steps: int = 5
    """Conjugate-gradient iterations for the implicit meta-gradient."""
    cg_tol: float = 0.0
    """Stop CG once its residual is below cg_tol times the norm of the query gradient."""

    def __post_init__(self):
        require(self.algorithm in ALGORITHMS, "solver.algorithm", self.algorithm, f"must be one of {ALGORITHMS}")
        require(self.lam > 0, "solver.lam", self.lam, "must be > 0 (the proximal strength lambda)")
        require(self.curvature in CURVATURES, "solver.curvature", self.curvature,
                f"must be one of {CURVATURES}")
        require(self.inner_solver in INNER_SOLVERS, "solver.inner_solver", self.inner_solver,
                f"must be one of {tuple(INNER_SOLVERS)}")
        require(self.algorithm != "maml" or self.inner_solver == "gd", "solver.inner_solver",
                self.inner_solver, "MAML differentiates through gradient descent: use gd")
        require(self.algorithm != "reptile" or self.inner_solver == "gd", "solver.inner_solver",
                self.inner_solver, "Reptile's inner loop is minibatch gradient descent: use gd")
        require(self.inner_steps >= 0, "solver.inner_steps", self.inner_steps, "must be >= 0")
        require(self.inner_lr > 0, "solver.inner_lr", self.inner_lr, "must be > 0")
        require(self.reptile_batch_size is None or self.reptile_batch_size >= 1,
                "solver.reptile_batch_size", self.reptile_batch_size, "must be >= 1 or null")
        require(self.hf_cg_steps >= 1, "solver.hf_cg_steps", self.hf_cg_steps, "must be >= 1")
        require(self.inner_tol >= 0, "solver.inner_tol", self.inner_tol, "must be >= 0")
        require(self.cg_steps >= 1, "solver.cg_steps", self.cg_steps, "must be >= 1")
        require(self.cg_tol >= 0, "solver.cg_tol", self.cg_tol, "must be >= 0")

    @property
    def proximal_strength(self) -> float:
        """lambda of the inner objective: iMAML's; the baselines minimize the plain loss."""
        return self.lam if self.algorithm == "imaml" else 0.0


class MetaGradient(NamedTuple):
    grads: Params  # meta-gradient averaged over the meta-batch, same keys as the parameters
    diagnostics: dict  # per-task tensors with a leading task dimension
