"""The per-task loop the vectorized meta_gradient must agree with (for tests and benchmarks)."""
import torch

from imaml_lightning.solver import tree
from imaml_lightning.solver.algorithms import task_meta_gradient
from imaml_lightning.solver.config import MetaGradient, Task
from imaml_lightning.solver.objective import TaskLoss


def meta_gradient_loop(model, params, tasks, loss_fn, config) -> MetaGradient:
    """meta_gradient computed one task at a time, without vmap."""
    fn = TaskLoss(model, loss_fn)
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
