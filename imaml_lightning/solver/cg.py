"""Conjugate gradient for A x = b with A symmetric, given only the product v -> A v.

Written without data-dependent Python branches (finished or failed systems are frozen with
torch.where) so that the same code runs on one task or under torch.func.vmap over many.
"""
from typing import Callable, NamedTuple

import torch

from imaml_lightning.solver import tree
from imaml_lightning.solver.tree import Params


class CGResult(NamedTuple):
    x: Params  # the iterate with the smallest residual (or the last)
    last: Params  # the last iterate
    residual_norms: torch.Tensor  # ||b - A x_k|| for k = 0..steps
    iterations: torch.Tensor  # CG steps actually taken
    negative_curvature: torch.Tensor  # stopped because p^T A p <= 0 (A not positive definite)
    returned_start: torch.Tensor  # b != 0 but x = x0 = 0 came back: the solve contributed nothing


def conjugate_gradient(
    matvec: Callable[[Params], Params], b: Params, steps: int, tol: float = 0.0,
    smallest_residual: bool = True,
) -> CGResult:
    """Run at most `steps` CG iterations from x0 = 0; stop once ||r|| <= tol * ||b||.

    Where p^T A p <= 0 the current iterate is kept, as truncated CG does: A = I + H/lambda is
    only positive definite near a minimizer of the inner problem. Of the iterates, the one with
    the smallest residual is returned (the last one if not `smallest_residual`, for callers
    that search the step length themselves): where A is nearly singular along p, a step with tiny
    positive curvature can be huge (a meta-gradient many times its usual norm, a jolt to Adam);
    its residual shows it. Where A is positive definite the residual
    usually falls, and this is the last iterate.
    """
    x = best = tree.zeros_like(b)
    r, p = b, b
    rs = tree.dot(r, r)
    start_rs = best_rs = rs
    threshold = tol**2 * rs
    active = rs > threshold
    norms = [rs.sqrt()]
    iterations = torch.zeros_like(rs)
    negative = torch.zeros_like(rs, dtype=torch.bool)
    for _ in range(steps):
        ap = matvec(p)
        curvature = tree.dot(p, ap)
        negative = negative | (active & (curvature <= 0))
        active = active & (curvature > 0)
        alpha = torch.where(active, rs / torch.where(active, curvature, 1.0), 0.0)
        x = tree.add(x, p, alpha)
        r = tree.add(r, ap, -alpha)
        rs_next = tree.dot(r, r)
        beta = torch.where(active, rs_next / torch.where(active, rs, 1.0), 0.0)
        p = tree.add(r, p, beta)
        iterations = iterations + active.to(rs.dtype)
        rs = torch.where(active, rs_next, rs)
        if smallest_residual:  # bookkeeping only callers that use it pay for
            better = rs < best_rs
            best, best_rs = tree.where(better, x, best), torch.where(better, rs, best_rs)
        active = active & (rs > threshold)
        norms.append(rs.sqrt())
    moved = best_rs < start_rs if smallest_residual else iterations > 0
    returned_start = (start_rs > 0) & ~moved
    return CGResult(best if smallest_residual else x, x, torch.stack(norms), iterations, negative,
                    returned_start)

