"""Meta-gradients of a meta-batch, on parameter dicts with torch.func.

iMAML (Rajeswaran et al., 2019), for a task with support set S and query set Q:

    phi*  = argmin_phi  G(phi) = L(phi; S) + lam/2 ||phi - theta||^2      (inner problem)
    g     = (I + H/lam)^{-1} grad L(phi*; Q),   H = hess L(phi*; S)       (implicit gradient)

phi* is approximated by an inner solver on G itself (the proximal term acts at every step), and
g by conjugate gradient with Hessian-vector products of the support loss at phi. Nothing is
differentiated through the inner loop, so memory does not grow with the number of inner steps.

Baselines with the same interface, on the plain support loss: MAML (differentiates through the
unrolled inner gradient descent), first-order MAML (grad L(phi; Q)) and Reptile (theta - phi).
"""
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from imaml_lightning.errors import require
from imaml_lightning.solver import tree
from imaml_lightning.solver.cg import CGResult, conjugate_gradient
from imaml_lightning.solver.curvature import CURVATURES
from imaml_lightning.solver.inner import INNER_SOLVERS, gradient_descent
from imaml_lightning.solver.objective import LossFn, ProximalObjective, TaskLoss
from imaml_lightning.solver.tree import Params

ALGORITHMS = ("imaml", "maml", "fomaml", "reptile")


class Task(NamedTuple):
    """Support and query sets; the solver's batched functions take a leading task dimension."""

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor


@dataclass(frozen=True)
class IMAMLConfig:
    lam: float = 0.5  # proximal regularization strength lambda (iMAML only)
    inner_steps: int = 10  # inner solver iterations
    inner_lr: float = 0.1  # step size of "gd" and "adam" ("hf" searches from the full Newton step)
    cg_steps: int = 5  # CG iterations for the implicit meta-gradient
    cg_tol: float = 0.0  # stop CG once ||r|| <= cg_tol * ||grad L(phi; Q)||
    algorithm: str = "imaml"  # or a baseline: "maml", "fomaml", "reptile"
    inner_solver: str = "gd"  # "gd", "adam" or "hf" (Hessian-free Newton, iMAML-HF)
    hf_cg_steps: int = 5  # CG iterations per Newton direction of "hf"
    inner_tol: float = 0.0  # a task stops its inner loop once ||grad G|| <= inner_tol
    curvature: str = "gauss_newton"  # C in I + C/lam (and HF's Newton system): one of CURVATURES

    def __post_init__(self):
        require(self.lam > 0, "lam", self.lam, "must be > 0 (the proximal strength lambda)")
        require(self.inner_steps >= 0, "inner_steps", self.inner_steps, "must be >= 0")
        require(self.inner_lr > 0, "inner_lr", self.inner_lr, "must be > 0")
        require(self.cg_steps >= 1, "cg_steps", self.cg_steps, "must be >= 1")
        require(self.cg_tol >= 0, "cg_tol", self.cg_tol, "must be >= 0")
        require(self.algorithm in ALGORITHMS, "algorithm", self.algorithm, f"must be one of {ALGORITHMS}")
        require(self.inner_solver in INNER_SOLVERS, "inner_solver", self.inner_solver,
                f"must be one of {tuple(INNER_SOLVERS)}")
        require(self.algorithm != "maml" or self.inner_solver == "gd", "inner_solver",
                self.inner_solver, "MAML differentiates through gradient descent: use gd")
        require(self.hf_cg_steps >= 1, "hf_cg_steps", self.hf_cg_steps, "must be >= 1")
        require(self.inner_tol >= 0, "inner_tol", self.inner_tol, "must be >= 0")
        require(self.curvature in CURVATURES, "curvature", self.curvature,
                f"must be one of {CURVATURES}")

    @property
    def proximal_strength(self) -> float:
        """lambda of the inner objective: iMAML's; the baselines minimize the plain loss."""
        return self.lam if self.algorithm == "imaml" else 0.0


class MetaGradient(NamedTuple):
    grads: Params  # meta-gradient averaged over the meta-batch, same keys as the parameters
    diagnostics: dict  # per-task tensors with a leading task dimension


def loss_and_output(model: nn.Module, loss_fn: LossFn) -> TaskLoss:
    """(params, x, y) -> (loss, model output): the model as a pure function of its parameters."""
    return TaskLoss(model, loss_fn)


def adapt(fn: TaskLoss, theta: Params, task: Task, config: IMAMLConfig,
          inner_steps: Optional[int] = None):
    """Approximate the inner minimizer phi for one task; returns phi and support diagnostics."""
    objective = ProximalObjective(lambda phi: fn(phi, task.support_x, task.support_y), theta,
                                  config.proximal_strength,
                                  fn.curvature(config.curvature, task.support_x, task.support_y))
    solver = INNER_SOLVERS[config.inner_solver]
    steps = config.inner_steps if inner_steps is None else inner_steps
    inner = solver(objective, theta, steps, config.inner_lr, tol=config.inner_tol,
                   hf_cg_steps=config.hf_cg_steps)
    return inner.phi, inner_diagnostics(inner)


def inner_diagnostics(inner) -> dict:
    return {"inner_objective_trace": inner.objective_trace,
            "inner_objective_before": inner.objective_trace[0],
            "inner_objective_after": inner.objective_trace[-1],
            "inner_grad_norm": inner.gradient_norm,
            "support_loss_after": inner.support_loss,
            "inner_rejected_steps": inner.rejected_steps}


def imaml_task_gradient(fn: TaskLoss, theta: Params, task: Task, config: IMAMLConfig):
    """g = (I + C/lam)^{-1} grad L(phi; Q) by CG (C the support loss's curvature at phi), and
    the task's diagnostics."""
    phi, diagnostics = adapt(fn, theta, task, config)
    # Under mixed precision only the inner loop runs in reduced precision: CG's recurrences lose
    # conjugacy quickly in 16-bit, so the right-hand side and the curvature products stay float32.
    with torch.autocast(task.query_x.device.type, enabled=False):
        query_grad, (query_loss, query_output) = grad_and_value(fn, has_aux=True)(
            phi, task.query_x, task.query_y)
        curvature = fn.curvature(config.curvature, task.support_x, task.support_y)(phi)
        cg = solve_implicit_system(curvature, query_grad, config)
        gradient = tree.where(cg.returned_start, stalled_solve_fallback(query_grad), cg.x)
    diagnostics.update(query_loss_after=query_loss, query_output_after=query_output,
                       cg_residual_norms=cg.residual_norms, cg_iterations=cg.iterations,
                       cg_negative_curvature=cg.negative_curvature,
                       cg_returned_start=cg.returned_start)
    return gradient, diagnostics


def solve_implicit_system(curvature, b: Params, config: IMAMLConfig) -> CGResult:
    """(I + C/lam) x = b by config.cg_steps CG steps, C given as its product v -> C v.

    I + H/lam may be indefinite, where a step along tiny curvature can be huge: the Hessian's
    solve keeps the smallest-residual iterate. I + G/lam >= I is positive definite: the
    Gauss-Newton solves keep plain CG's last iterate."""
    return conjugate_gradient(lambda v: tree.add(v, curvature(v), 1.0 / config.lam), b,
                              config.cg_steps, config.cg_tol,
                              smallest_residual=config.curvature == "hessian")


def stalled_solve_fallback(query_grad: Params) -> Params:
    """What a task contributes when CG returned x0 = 0 (its first step met negative curvature,
    or no iterate had a smaller residual than the start): the first-order term grad L(phi; Q),
    the solution where the curvature is dropped, instead of silently nothing. Measured
    (benchmarks/implicit_gradient_quality.py, 20-way): a step against it lowered all 19 stalled
    tasks' query loss, nearly as much as CG's last iterate, whose norm reached 5.5x its own."""
    return query_grad


def maml_task_gradient(fn, theta: Params, task: Task, config: IMAMLConfig):
    """d L(phi_K(theta); Q) / d theta through the unrolled inner gradient descent (second order)."""

    def query_loss_after_inner_loop(start: Params):
        objective = ProximalObjective(lambda p: fn(p, task.support_x, task.support_y), start, 0.0)
        inner = gradient_descent(objective, start, config.inner_steps, config.inner_lr, config.inner_tol)
        loss, output = fn(inner.phi, task.query_x, task.query_y)
        return loss, (output, inner)

    g, (query_loss, (output, inner)) = grad_and_value(
        query_loss_after_inner_loop, has_aux=True)(theta)
    diagnostics = inner_diagnostics(inner)  # MAML's inner objective is the plain support loss
    diagnostics.update(query_loss_after=query_loss, query_output_after=output)
    return g, diagnostics


def fomaml_task_gradient(fn, theta: Params, task: Task, config: IMAMLConfig):
    """grad L(phi; Q): MAML without the second-order terms."""
    phi, diagnostics = adapt(fn, theta, task, config)
    g, (query_loss, output) = grad_and_value(fn, has_aux=True)(phi, task.query_x, task.query_y)
    diagnostics.update(query_loss_after=query_loss, query_output_after=output)
    return g, diagnostics


def reptile_task_gradient(fn, theta: Params, task: Task, config: IMAMLConfig):
    """theta - phi: Reptile's update direction, handed to the outer optimizer as a gradient."""
    phi, diagnostics = adapt(fn, theta, task, config)
    query_loss, output = fn(phi, task.query_x, task.query_y)
    diagnostics.update(query_loss_after=query_loss, query_output_after=output)
    return tree.add(theta, phi, -1.0), diagnostics


TASK_GRADIENTS = {"imaml": imaml_task_gradient, "maml": maml_task_gradient,
                  "fomaml": fomaml_task_gradient, "reptile": reptile_task_gradient}


def task_meta_gradient(fn, theta: Params, task: Task, config: IMAMLConfig):
    """The meta-gradient of one task under config.algorithm, and its diagnostics."""
    return TASK_GRADIENTS[config.algorithm](fn, theta, task, config)


def meta_gradient(
    model: nn.Module,
    params: Params,
    tasks: Task,
    loss_fn: LossFn,
    config: IMAMLConfig,
    chunk_size: Optional[int] = None,
    diagnose_before: bool = True,
) -> MetaGradient:
    """Average meta-gradient of a meta-batch (tasks with a leading task dimension), all tasks
    computed together by torch.func.vmap (`chunk_size` tasks at a time).

    diagnose_before adds the query loss and outputs before adaptation to the diagnostics: one
    more forward pass of the query sets, which callers that log only now and then can skip."""
    fn = loss_and_output(model, loss_fn)
    theta = tree.detach(params)
    per_task = vmap(lambda theta, task: task_meta_gradient(fn, theta, task, config),
                    in_dims=(None, 0), chunk_size=chunk_size, randomness="different")
    grads, diagnostics = per_task(theta, tasks)
    if diagnose_before:
        loss, output = query_loss_before_adaptation(fn, theta, tasks, chunk_size)
        diagnostics.update(query_loss_before=loss, query_output_before=output)
    return MetaGradient({k: g.mean(0) for k, g in grads.items()}, diagnostics)


@torch.no_grad()
def query_loss_before_adaptation(fn, theta: Params, tasks: Task, chunk_size: Optional[int] = None):
    """L(theta; Q) and the outputs at theta of each task's query set (a diagnostic)."""
    return vmap(lambda task: fn(theta, task.query_x, task.query_y), chunk_size=chunk_size,
                randomness="different")(tasks)


def meta_gradient_loop(model, params, tasks, loss_fn, config) -> MetaGradient:
    """Reference implementation, one task at a time (for tests and benchmarks)."""
    fn = loss_and_output(model, loss_fn)
    theta = tree.detach(params)
    results = []
    for i in range(len(tasks.support_x)):
        task = Task(*(t[i] for t in tasks))
        g, diagnostics = task_meta_gradient(fn, theta, task, config)
        with torch.no_grad():
            loss, output = fn(theta, task.query_x, task.query_y)
        results.append((g, dict(diagnostics, query_loss_before=loss, query_output_before=output)))
    grads = {k: torch.stack([g[k] for g, _ in results]).mean(0) for k in theta}
    diagnostics = {k: torch.stack([d[k] for _, d in results]) for k in results[0][1]}
    return MetaGradient(grads, diagnostics)


def adapt_and_predict(
    model: nn.Module,
    params: Params,
    tasks: Task,
    loss_fn: LossFn,
    config: IMAMLConfig,
    inner_steps: Optional[int] = None,
    chunk_size: Optional[int] = None,
) -> torch.Tensor:
    """Model outputs on each task's query set after adapting to its support set (evaluation)."""
    fn = loss_and_output(model, loss_fn)

    def predict(theta: Params, task: Task) -> torch.Tensor:
        phi, _ = adapt(fn, theta, task, config, inner_steps)
        return functional_call(model, phi, (task.query_x,))

    return vmap(predict, in_dims=(None, 0), chunk_size=chunk_size, randomness="different")(
        tree.detach(params), tasks)


def surrogate_loss(params: Params, meta_grads: Params) -> torch.Tensor:
    """sum_k <theta_k, stop_grad(g_k)>: its backward writes g into .grad through autograd, so
    distributed strategies all-reduce the meta-gradient like any other gradient."""
    return sum((params[k] * meta_grads[k].detach()).sum() for k in meta_grads)
