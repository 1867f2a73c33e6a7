"""Each algorithm's meta-gradient for one task, on parameter dicts with torch.func.

iMAML (Rajeswaran et al., 2019), for a task with support set S and query set Q:

    phi*  = argmin_phi  G(phi) = L(phi; S) + lam/2 ||phi - theta||^2      (inner problem)
    g     = (I + C/lam)^{-1} grad L(phi*; Q),   C = hess L(phi*; S) or its Gauss-Newton part

phi* is approximated by an inner solver on G itself (the proximal term acts at every step), and
g by conjugate gradient with curvature-vector products of the support loss at phi. Nothing is
differentiated through the inner loop, so memory does not grow with the number of inner steps.

Baselines with the same interface, on the plain support loss: MAML (differentiates through the
unrolled inner gradient descent), first-order MAML (grad L(phi; Q)) and Reptile (theta - phi).
"""
from typing import Optional

import torch
from torch.func import grad_and_value

from imaml_lightning.solver import tree
from imaml_lightning.solver.cg import CGResult, conjugate_gradient
from imaml_lightning.solver.config import SolverConfig, Task
from imaml_lightning.solver.inner import INNER_SOLVERS, gradient_descent, minibatch_gradient_descent
from imaml_lightning.solver.objective import ProximalObjective, TaskLoss
from imaml_lightning.solver.tree import Params


def support_objective(fn: TaskLoss, theta: Params, task: Task, lam: float,
                      curvature: Optional[str] = None) -> ProximalObjective:
    """G(phi) = L(phi; S) + lam/2 ||phi - theta||^2 of one task (lam = 0: the plain loss)."""
    return ProximalObjective(lambda phi: fn(phi, task.support_x, task.support_y), theta, lam,
                             curvature and fn.curvature(curvature, task.support_x, task.support_y))


def adapt(fn: TaskLoss, theta: Params, task: Task, config: SolverConfig,
          inner_steps: Optional[int] = None):
    """Approximate the inner minimizer phi for one task; returns phi and support diagnostics."""
    objective = support_objective(fn, theta, task, config.proximal_strength, config.curvature)
    steps = config.inner_steps if inner_steps is None else inner_steps
    inner = INNER_SOLVERS[config.inner_solver](objective, theta, steps, config.inner_lr,
                                               tol=config.inner_tol, hf_cg_steps=config.hf_cg_steps)
    return inner.phi, inner_diagnostics(inner)


def inner_diagnostics(inner) -> dict:
    return {"inner_objective_trace": inner.objective_trace,
            "inner_objective_before": inner.objective_trace[0],
            "inner_objective_after": inner.objective_trace[-1],
            "inner_grad_norm": inner.gradient_norm,
            "support_loss_after": inner.support_loss,
            "inner_rejected_steps": inner.rejected_steps}


def imaml_task_gradient(fn: TaskLoss, theta: Params, task: Task, config: SolverConfig):
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


def solve_implicit_system(curvature, b: Params, config: SolverConfig) -> CGResult:
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
    the solution where the curvature is dropped, instead of silently nothing. A step against it
    lowers a stalled task's query loss nearly as much as CG's last iterate, without that
    iterate's occasional huge norm (benchmarks.studies.implicit_gradient_quality:
    docs/studies/implicit_gradient_quality.md)."""
    return query_grad


def maml_task_gradient(fn: TaskLoss, theta: Params, task: Task, config: SolverConfig):
    """d L(phi_K(theta); Q) / d theta through the unrolled inner gradient descent (second order)."""

    def query_loss_after_inner_loop(start: Params):
        objective = support_objective(fn, start, task, 0.0)
        inner = gradient_descent(objective, start, config.inner_steps, config.inner_lr, config.inner_tol)
        loss, output = fn(inner.phi, task.query_x, task.query_y)
        return loss, (output, inner)

    g, (query_loss, (output, inner)) = grad_and_value(
        query_loss_after_inner_loop, has_aux=True)(theta)
    diagnostics = inner_diagnostics(inner)  # MAML's inner objective is the plain support loss
    diagnostics.update(query_loss_after=query_loss, query_output_after=output)
    return g, diagnostics


def fomaml_task_gradient(fn: TaskLoss, theta: Params, task: Task, config: SolverConfig):
    """grad L(phi; Q): MAML without the second-order terms."""
    phi, diagnostics = adapt(fn, theta, task, config)
    g, (query_loss, output) = grad_and_value(fn, has_aux=True)(phi, task.query_x, task.query_y)
    diagnostics.update(query_loss_after=query_loss, query_output_after=output)
    return g, diagnostics


def reptile_task_gradient(fn: TaskLoss, theta: Params, task: Task, config: SolverConfig):
    """theta - phi: Reptile's update direction, handed to the outer optimizer as a gradient.

    Reptile has no query set in training: its inner loop fits all of a task's examples (Nichol et
    al. 2018 train their 1-shot models on 10 shots per class), in minibatches of
    config.reptile_batch_size (minibatch_gradient_descent says why). Evaluation adapts on the
    support set as for every algorithm."""
    x, y = torch.cat([task.support_x, task.query_x]), torch.cat([task.support_y, task.query_y])
    inner = minibatch_gradient_descent(fn, theta, x, y, config.inner_steps, config.inner_lr,
                                       config.reptile_batch_size)
    diagnostics = inner_diagnostics(inner)
    query_loss, output = fn(inner.phi, task.query_x, task.query_y)
    diagnostics.update(query_loss_after=query_loss, query_output_after=output)
    return tree.add(theta, inner.phi, -1.0), diagnostics


TASK_GRADIENTS = {"imaml": imaml_task_gradient, "maml": maml_task_gradient,
                  "fomaml": fomaml_task_gradient, "reptile": reptile_task_gradient}


def task_meta_gradient(fn: TaskLoss, theta: Params, task: Task, config: SolverConfig):
    """The meta-gradient of one task under config.algorithm, and its diagnostics."""
    return TASK_GRADIENTS[config.algorithm](fn, theta, task, config)
