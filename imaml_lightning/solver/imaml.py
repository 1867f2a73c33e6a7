"""iMAML-GD meta-gradient (Rajeswaran et al., 2019), on parameter dicts with torch.func.

For a task with support set S and query set Q, from meta-parameters theta:

    phi*  = argmin_phi  G(phi) = L(phi; S) + lam/2 ||phi - theta||^2      (inner problem)
    g     = (I + H/lam)^{-1} grad L(phi*; Q),   H = hess L(phi*; S)       (implicit gradient)

phi* is approximated by gradient descent on G itself (the proximal term acts at every step),
and g by conjugate gradient with Hessian-vector products of the support loss at phi. Nothing is
differentiated through the inner loop, so memory does not grow with the number of inner steps.
"""
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import torch
from torch import nn
from torch.func import functional_call, grad, grad_and_value, jvp, vmap

from imaml_lightning.errors import require
from imaml_lightning.solver import tree
from imaml_lightning.solver.cg import conjugate_gradient
from imaml_lightning.solver.tree import Params

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Task(NamedTuple):
    """Support and query sets; the solver's batched functions take a leading task dimension."""

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor


@dataclass(frozen=True)
class IMAMLConfig:
    lam: float = 0.5  # proximal regularization strength lambda
    inner_steps: int = 10  # gradient steps on G
    inner_lr: float = 0.1
    cg_steps: int = 5
    cg_tol: float = 0.0  # stop CG once ||r|| <= cg_tol * ||grad L(phi; Q)||

    def __post_init__(self):
        require(self.lam > 0, "lam", self.lam, "must be > 0 (the proximal strength lambda)")
        require(self.inner_steps >= 0, "inner_steps", self.inner_steps, "must be >= 0")
        require(self.inner_lr > 0, "inner_lr", self.inner_lr, "must be > 0")
        require(self.cg_steps >= 1, "cg_steps", self.cg_steps, "must be >= 1")
        require(self.cg_tol >= 0, "cg_tol", self.cg_tol, "must be >= 0")


class MetaGradient(NamedTuple):
    grads: Params  # meta-gradient averaged over the meta-batch, same keys as the parameters
    diagnostics: dict  # per-task tensors with a leading task dimension


def loss_and_output(model: nn.Module, loss_fn: LossFn):
    """(params, x, y) -> (loss, model output): the model as a pure function of its parameters."""

    def fn(params: Params, x: torch.Tensor, y: torch.Tensor):
        output = functional_call(model, params, (x,))
        return loss_fn(output, y), output

    return fn


def proximal_objective(support_loss, theta: Params, lam: float):
    """G(phi) = L(phi; S) + lam/2 ||phi - theta||^2, with L's output kept as auxiliary."""

    def objective(phi: Params):
        loss, output = support_loss(phi)
        distance = tree.add(phi, theta, -1.0)
        return loss + 0.5 * lam * tree.dot(distance, distance), loss

    return objective


def inner_gradient_descent(objective, theta: Params, steps: int, lr: float):
    """phi_{k+1} = phi_k - lr * grad G(phi_k), phi_0 = theta. Returns phi_K and G(phi_0)."""
    phi, first_value = theta, None
    for _ in range(steps):
        step, (value, _) = grad_and_value(objective, has_aux=True)(phi)
        first_value = value if first_value is None else first_value
        phi = tree.add(phi, step, -lr)
    return phi, first_value


def hessian_vector_product(scalar_fn, params: Params, v: Params) -> Params:
    """H v for H = hess scalar_fn(params): forward-mode derivative of the gradient."""
    return jvp(grad(scalar_fn), (params,), (v,))[1]


def adapt(fn, theta: Params, task: Task, config: IMAMLConfig, inner_steps: Optional[int] = None):
    """Approximate phi* for one task; returns phi and the support-set diagnostics."""
    support_loss = lambda phi: fn(phi, task.support_x, task.support_y)  # noqa: E731
    objective = proximal_objective(support_loss, theta, config.lam)
    steps = config.inner_steps if inner_steps is None else inner_steps
    phi, objective_before = inner_gradient_descent(objective, theta, steps, config.inner_lr)
    objective_after, loss_after = objective(phi)
    if objective_before is None:  # zero inner steps
        objective_before = objective_after
    return phi, {
        "inner_objective_before": objective_before,
        "inner_objective_after": objective_after,
        "support_loss_after": loss_after,
    }


def task_meta_gradient(fn, theta: Params, task: Task, config: IMAMLConfig):
    """The implicit meta-gradient of one task and its diagnostics."""
    phi, diagnostics = adapt(fn, theta, task, config)
    query_loss_before, query_output_before = fn(theta, task.query_x, task.query_y)
    query_grad, (query_loss, query_output) = grad_and_value(fn, has_aux=True)(
        phi, task.query_x, task.query_y
    )
    support_loss = lambda p: fn(p, task.support_x, task.support_y)[0]  # noqa: E731

    def implicit_system(v: Params) -> Params:  # v -> (I + H/lam) v
        return tree.add(v, hessian_vector_product(support_loss, phi, v), 1.0 / config.lam)

    cg = conjugate_gradient(implicit_system, query_grad, config.cg_steps, config.cg_tol)
    diagnostics.update(
        query_loss_before=query_loss_before,
        query_output_before=query_output_before,
        query_loss_after=query_loss,
        query_output_after=query_output,
        cg_residual_norms=cg.residual_norms,
        cg_iterations=cg.iterations,
        cg_negative_curvature=cg.negative_curvature,
    )
    return cg.x, diagnostics


def meta_gradient(
    model: nn.Module,
    params: Params,
    tasks: Task,
    loss_fn: LossFn,
    config: IMAMLConfig,
    chunk_size: Optional[int] = None,
) -> MetaGradient:
    """Average implicit meta-gradient of a meta-batch (tasks with a leading task dimension),
    all tasks computed together by torch.func.vmap (`chunk_size` tasks at a time)."""
    per_task = vmap(
        lambda theta, task: task_meta_gradient(loss_and_output(model, loss_fn), theta, task, config),
        in_dims=(None, 0),
        chunk_size=chunk_size,
        randomness="different",
    )
    grads, diagnostics = per_task(tree.detach(params), tasks)
    return MetaGradient({k: g.mean(0) for k, g in grads.items()}, diagnostics)


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
        tree.detach(params), tasks
    )


def surrogate_loss(params: Params, meta_grads: Params) -> torch.Tensor:
    """sum_k <theta_k, stop_grad(g_k)>: its backward writes g into .grad through autograd, so
    distributed strategies all-reduce the meta-gradient like any other gradient."""
    return sum((params[k] * meta_grads[k].detach()).sum() for k in meta_grads)
