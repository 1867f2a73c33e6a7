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


class VectorizedMetaGradient:
    """(params, tasks) -> MetaGradient for one network, loss and SolverConfig: the meta-batch's
    per-task meta-gradients, all tasks computed together by torch.func.vmap (`chunk_size` tasks
    at a time), averaged.

    compile: build the vmapped solver once with torch.compile (Inductor). It fuses what eager
    vmap runs as one pass over memory per operation: the solver's arithmetic on the parameter
    dicts (every task's copy of the network, 3.6 M numbers in the reference meta-batch) and
    BatchNorm's decomposition under vmap; the convolutions stay oneDNN's. So a meta-step is
    shorter, after a first call that compiles for minutes (the inner loop and CG are unrolled
    into one graph; less where Inductor's cache holds the kernels): worth it for long runs. The
    measurements (benchmarks.compiled_training, benchmarks.peer_speed):
    docs/benchmarks.md#compiled_training. Shapes are
    specialized (dynamic=False): a batch of another shape compiles again. Not every network
    traces: torch 2.14's Dynamo fails on the Gauss-Newton jvp through an MLP's first layer
    under vmap (the conv-4 compiles)."""

    def __init__(self, model: nn.Module, loss_fn: LossFn, config: SolverConfig,
                 chunk_size: Optional[int] = None, compile: bool = False):
        self.fn = TaskLoss(model, loss_fn)
        per_task = vmap(lambda theta, task: task_meta_gradient(self.fn, theta, task, config),
                        in_dims=(None, 0), chunk_size=chunk_size, randomness="different")
        self.per_task = torch.compile(per_task, dynamic=False) if compile else per_task
        self.chunk_size = chunk_size

    def __call__(self, params: Params, tasks: Task, diagnose_before: bool = True) -> MetaGradient:
        """diagnose_before adds the query loss and outputs before adaptation to the diagnostics:
        one more forward pass of the query sets, which callers that log only now and then skip."""
        theta = tree.detach(params)
        grads, diagnostics = self.per_task(theta, tasks)
        if diagnose_before:
            loss, output = query_loss_before_adaptation(self.fn, theta, tasks, self.chunk_size)
            diagnostics.update(query_loss_before=loss, query_output_before=output)
        return MetaGradient({k: g.mean(0) for k, g in grads.items()}, diagnostics)


def meta_gradient(
    model: nn.Module,
    params: Params,
    tasks: Task,
    loss_fn: LossFn,
    config: SolverConfig,
    chunk_size: Optional[int] = None,
    diagnose_before: bool = True,
) -> MetaGradient:
    """Average meta-gradient of a meta-batch (tasks with a leading task dimension), eager
    (VectorizedMetaGradient says what each argument does)."""
    return VectorizedMetaGradient(model, loss_fn, config, chunk_size)(params, tasks, diagnose_before)


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
