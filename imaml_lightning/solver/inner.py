"""Inner solvers: each approximately minimizes the proximal objective
G(phi) = L(phi; S) + lam/2 ||phi - theta||^2 from phi_0 = theta.

The meta-gradient depends only on the minimizer, not on the path, so any of them serves iMAML.
All are written without data-dependent Python branches, so they run under torch.func.vmap; a
task whose gradient norm falls under `tol` stops moving (its later steps are masked out).
"""
from typing import Callable, NamedTuple

import torch
from torch.func import grad_and_value

from imaml_lightning.solver import tree
from imaml_lightning.solver.cg import conjugate_gradient
from imaml_lightning.solver.hvp import hessian_vector_product
from imaml_lightning.solver.tree import Params

# objective(phi) -> (G(phi), L(phi; S))
Objective = Callable[[Params], tuple]

# Step sizes tried by the HF line search along the Newton direction; the best one that lowers G is
# taken. A fixed list (rather than a backtracking loop) keeps the search vectorizable over tasks.
# It reaches down to 2^-10 because where I + H/lam is nearly singular the truncated-CG direction
# can be orders of magnitude too long (HF stalled on a tanh MLP with 1/16 as the shortest step).
LINE_SEARCH_STEPS = tuple(2.0**-i for i in range(11))


class InnerResult(NamedTuple):
    phi: Params
    objective_trace: torch.Tensor  # G(phi_0 = theta), ..., G(phi_K): [steps + 1]
    support_loss: torch.Tensor  # L(phi_K; S)
    gradient_norm: torch.Tensor  # ||grad G|| at the last iterate where it was evaluated


def _step_mask(norm: torch.Tensor, done: torch.Tensor, tol: float):
    """Update the per-task 'converged' flag; returns (done, 0/1 factor for this step)."""
    if tol > 0:
        done = done | (norm <= tol)
    return done, (~done).to(norm.dtype)


def gradient_descent(objective: Objective, theta: Params, steps: int, lr: float,
                     tol: float = 0.0, **_) -> InnerResult:
    """phi_{k+1} = phi_k - lr_k grad G(phi_k), with lr_k = lr until a step raises G.

    Safeguard: a step that raises G is undone (the value comes free with the next gradient) and
    that task's step size halved. A healthy inner loop never triggers it, so the iterates are
    plain gradient descent; it stops the inner loop from diverging where meta-training has made
    the loss sharper than 2 / lr, which otherwise ends in a non-finite meta-gradient.
    """
    phi, done, norm, trace = theta, torch.zeros((), dtype=torch.bool), None, []
    step_size = None  # per task, from the first value on
    previous = None  # (phi, gradient, value, loss) before the last step
    for _ in range(steps):
        gradient, (value, loss) = grad_and_value(objective, has_aux=True)(phi)
        if previous is None:
            step_size = torch.full_like(value, lr)
        else:
            worse = ~(value <= previous[2])  # NaN counts as worse
            phi, gradient, value, loss = _keep_better(worse, previous, (phi, gradient, value, loss))
            step_size = torch.where(worse, step_size / 2, step_size)
        norm = tree.norm(gradient)
        done, move = _step_mask(norm, done, tol)
        trace.append(value)
        previous = (phi, gradient, value, loss)
        phi = tree.add(phi, gradient, -step_size * move)
    if previous is None:
        return _finish(objective, theta, trace, None)
    value, loss = objective(phi)  # the last step is checked too
    worse = ~(value <= previous[2])
    phi, _, value, loss = _keep_better(worse, previous, (phi, previous[1], value, loss))
    return InnerResult(phi, torch.stack(trace + [value]), loss, norm)


def _keep_better(worse: torch.Tensor, previous: tuple, current: tuple) -> tuple:
    """(phi, gradient, value, loss): the previous iterate's where the step made G worse."""
    return tuple(tree.where(worse, a, b) if isinstance(a, dict) else torch.where(worse, a, b)
                 for a, b in zip(previous, current))


def adam(objective: Objective, theta: Params, steps: int, lr: float, tol: float = 0.0,
         betas=(0.9, 0.999), eps: float = 1e-8, **_) -> InnerResult:
    """Adam (Kingma & Ba) on G, with bias correction; fresh moments for every task."""
    phi, done, norm, trace = theta, torch.zeros((), dtype=torch.bool), None, []
    m, v = tree.zeros_like(theta), tree.zeros_like(theta)
    for t in range(1, steps + 1):
        gradient, (value, _) = grad_and_value(objective, has_aux=True)(phi)
        trace.append(value)
        norm = tree.norm(gradient)
        done, move = _step_mask(norm, done, tol)
        m = {k: betas[0] * m[k] + (1 - betas[0]) * g for k, g in gradient.items()}
        v = {k: betas[1] * v[k] + (1 - betas[1]) * g * g for k, g in gradient.items()}
        step = {k: (m[k] / (1 - betas[0] ** t)) / ((v[k] / (1 - betas[1] ** t)).sqrt() + eps)
                for k in m}
        phi = tree.add(phi, step, -lr * move)
    return _finish(objective, phi, trace, norm)


def hessian_free(objective: Objective, theta: Params, steps: int, lr: float = 1.0,
                 tol: float = 0.0, hf_cg_steps: int = 5, **_) -> InnerResult:
    """Hessian-free Newton (iMAML-HF): solve (H + lam I) d = -grad G with `hf_cg_steps` CG steps,
    then take the step size from LINE_SEARCH_STEPS (scaled by lr) that lowers G the most."""
    phi, done, norm, trace = theta, torch.zeros((), dtype=torch.bool), None, []
    value_only = lambda p: objective(p)[0]  # noqa: E731
    for _ in range(steps):
        gradient, (value, _) = grad_and_value(objective, has_aux=True)(phi)
        trace.append(value)
        norm = tree.norm(gradient)
        done, move = _step_mask(norm, done, tol)
        newton = conjugate_gradient(lambda v: hessian_vector_product(value_only, phi, v),
                                    tree.scale(gradient, -1.0), hf_cg_steps,
                                    smallest_residual=False)  # the line search sets the length
        # Negative curvature on the very first CG step leaves no Newton direction: descend instead.
        fallback = (newton.iterations == 0).to(value.dtype)
        direction = tree.add(tree.scale(newton.x, 1 - fallback), gradient, -fallback)
        candidates = torch.stack([value_only(tree.add(phi, direction, lr * a)) for a in LINE_SEARCH_STEPS])
        sizes = torch.tensor(LINE_SEARCH_STEPS, dtype=value.dtype) * lr
        best = candidates.argmin()
        size = torch.where(candidates[best] < value, sizes[best], 0.0)
        phi = tree.add(phi, direction, size * move)
    return _finish(objective, phi, trace, norm)


def _finish(objective: Objective, phi: Params, trace: list, norm) -> InnerResult:
    """Evaluate G and L at the final iterate, which the loop has not seen."""
    value, loss = objective(phi)
    norm = torch.zeros_like(value) if norm is None else norm  # zero steps: phi = theta
    return InnerResult(phi, torch.stack(trace + [value]), loss, norm)


INNER_SOLVERS = {"gd": gradient_descent, "adam": adam, "hf": hessian_free}
