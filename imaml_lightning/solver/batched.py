"""A meta-batch at once: the per-task algorithms vectorized over tasks with torch.func.vmap."""
from typing import Optional

import torch
from torch import nn
from torch.func import functional_call, vmap

from imaml_lightning.solver import tree
from imaml_lightning.solver.algorithms import adapt, task_meta_gradient
from imaml_lightning.solver.batch_norm import output_with_support_statistics
from imaml_lightning.solver.config import MetaGradient, SolverConfig, Task
from imaml_lightning.solver.objective import LossFn, TaskLoss
from imaml_lightning.solver.tree import Params


def meta_gradient(
    model: nn.Module,
    params: Params,
    tasks: Task,
    loss_fn: LossFn,
    config: SolverConfig,
    chunk_size: Optional[int] = None,
    diagnose_before: bool = True,
) -> MetaGradient:
    """Average meta-gradient of a meta-batch (tasks with a leading task dimension), all tasks
    computed together by torch.func.vmap (`chunk_size` tasks at a time).

    diagnose_before adds the query loss and outputs before adaptation to the diagnostics: one
    more forward pass of the query sets, which callers that log only now and then can skip."""
    fn = TaskLoss(model, loss_fn)
    theta = tree.detach(params)
    per_task = vmap(lambda theta, task: task_meta_gradient(fn, theta, task, config),
                    in_dims=(None, 0), chunk_size=chunk_size, randomness="different")
    grads, diagnostics = per_task(theta, tasks)
    if diagnose_before:
        loss, output = query_loss_before_adaptation(fn, theta, tasks, chunk_size)
        diagnostics.update(query_loss_before=loss, query_output_before=output)
    return MetaGradient({k: g.mean(0) for k, g in grads.items()}, diagnostics)


@torch.no_grad()
def query_loss_before_adaptation(fn: TaskLoss, theta: Params, tasks: Task,
                                 chunk_size: Optional[int] = None):
    """L(theta; Q) and the outputs at theta of each task's query set (a diagnostic)."""
    return vmap(lambda task: fn(theta, task.query_x, task.query_y), chunk_size=chunk_size,
                randomness="different")(tasks)


def predict(model: nn.Module, phi: Params, support_x: torch.Tensor, query_x: torch.Tensor,
            batch_norm: str = "transductive") -> torch.Tensor:
    """The adapted network's outputs on one task's queries. batch_norm="transductive": BatchNorm
    normalizes the queries by their own statistics (the paper's protocol); "support": by the
    support set's (solver.batch_norm), so each query's output depends on it alone."""
    if batch_norm == "support":
        return output_with_support_statistics(model, phi, support_x, query_x)
    return functional_call(model, phi, (query_x,))


def adapt_tasks(model: nn.Module, params: Params, tasks: Task, loss_fn: LossFn,
                config: SolverConfig, inner_steps: Optional[int] = None,
                chunk_size: Optional[int] = None) -> Params:
    """Each task's adapted parameters phi (a leading task dimension on every tensor)."""
    fn = TaskLoss(model, loss_fn)
    return vmap(lambda theta, task: adapt(fn, theta, task, config, inner_steps)[0],
                in_dims=(None, 0), chunk_size=chunk_size, randomness="different")(
        tree.detach(params), tasks)


def adapt_and_predict(
    model: nn.Module,
    params: Params,
    tasks: Task,
    loss_fn: LossFn,
    config: SolverConfig,
    inner_steps: Optional[int] = None,
    chunk_size: Optional[int] = None,
    batch_norm: str = "transductive",
) -> torch.Tensor:
    """Model outputs on each task's query set after adapting to its support set (evaluation)."""
    fn = TaskLoss(model, loss_fn)

    def adapt_then_predict(theta: Params, task: Task) -> torch.Tensor:
        phi, _ = adapt(fn, theta, task, config, inner_steps)
        return predict(model, phi, task.support_x, task.query_x, batch_norm)

    return vmap(adapt_then_predict, in_dims=(None, 0), chunk_size=chunk_size,
                randomness="different")(tree.detach(params), tasks)


def surrogate_loss(params: Params, meta_grads: Params) -> torch.Tensor:
    """sum_k <theta_k, stop_grad(g_k)>: its backward writes g into .grad through autograd, so
    distributed strategies all-reduce the meta-gradient like any other gradient."""
    return sum((params[k] * meta_grads[k].detach()).sum() for k in meta_grads)
