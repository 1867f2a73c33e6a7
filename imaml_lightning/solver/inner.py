"""Inner solvers: each approximately minimizes the proximal objective
G(phi) = L(phi; S) + lam/2 ||phi - theta||^2 from phi_0 = theta (a ProximalObjective).

The meta-gradient depends only on the minimizer, not on the path, so any of them serves iMAML.
All are written without data-dependent Python branches, so they run under torch.func.vmap; a
task whose gradient norm falls under `tol` stops moving (its later steps are masked out).
"""
from typing import NamedTuple

import torch

from torch.func import grad_and_value

from imaml_lightning.solver import tree
from imaml_lightning.solver.cg import conjugate_gradient
from imaml_lightning.solver.objective import ProximalObjective
from imaml_lightning.solver.tree import Params

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
    rejected_steps: torch.Tensor  # steps that did not lower G: GD's undone steps, HF's failed searches


class Iterate(NamedTuple):
    phi: Params
    gradient: Params  # grad G(phi)
    value: torch.Tensor  # G(phi)
    loss: torch.Tensor  # L(phi; S)


def evaluate(objective: ProximalObjective, phi: Params) -> Iterate:
    gradient, (value, loss) = objective.gradient_and_value(phi)
    return Iterate(phi, gradient, value, loss)


def _step_mask(norm: torch.Tensor, done: torch.Tensor, tol: float):
    """Update the per-task 'converged' flag; returns (done, 0/1 factor for this step)."""
    if tol > 0:
        done = done | (norm <= tol)
    return done, (~done).to(norm.dtype)


def observe(objective: ProximalObjective, phi: Params, trace: list, done: torch.Tensor, tol: float):
    """What adam and hf do first at every step: grad G and G at phi, G into the trace, and the
    task's stop flag; returns (gradient, value, gradient norm, done, 0/1 factor for this step)."""
    gradient, (value, _) = objective.gradient_and_value(phi)
    trace.append(value)
    norm = tree.norm(gradient)
    return (gradient, value, norm, *_step_mask(norm, done, tol))


def rounding(value: torch.Tensor) -> torch.Tensor:
    """A few units in the last place of G: near the minimizer a step changes G by less than its
    rounding error, and rejecting such a step (halving the step size each time) would stall GD
    at ||grad G|| ~ sqrt(eps) instead of letting it converge."""
    return 8 * torch.finfo(value.dtype).eps * value.abs()


def gradient_descent(objective: ProximalObjective, theta: Params, steps: int, lr: float,
                     tol: float = 0.0, **_) -> InnerResult:
    """phi_{k+1} = phi_k - lr_k grad G(phi_k), with lr_k = lr until a step raises G.

    Safeguard: a step that raises G (by more than rounding) is undone (the value comes free with
    the next gradient) and that task's step size halved; rejected_steps counts them. Where it
    never acts the iterates are plain gradient descent; it stops the inner loop from diverging
    where the loss is sharper than 2 / lr (meta-training sharpens it, and the shipped Omniglot
    step of 0.3 relies on it from the start), which otherwise ends in a non-finite meta-gradient.
    """
    if steps == 0:
        return _finish(objective, theta, [], None, None)
    current = evaluate(objective, theta)
    step_size = torch.full_like(current.value, lr)
    done = torch.zeros((), dtype=torch.bool)
    rejected = torch.zeros_like(current.value)
    move = torch.ones_like(current.value)
    trace = [current.value]
    for step in range(steps):
        if tol > 0 or step == steps - 1:  # the norm is only needed to stop, and to report
            norm = tree.norm(current.gradient)
            done, move = _step_mask(norm, done, tol)
        phi = tree.add(current.phi, current.gradient, -step_size * move)
        if step < steps - 1:
            candidate = evaluate(objective, phi)
        else:  # the last step is checked too, but its gradient is never used
            candidate = Iterate(phi, current.gradient, *objective(phi))
        worse = ~(candidate.value <= current.value + rounding(current.value))  # NaN counts as worse
        current = Iterate(*(tree.where(worse, a, b) if isinstance(a, dict) else torch.where(worse, a, b)
                            for a, b in zip(current, candidate)))
        step_size = torch.where(worse, step_size / 2, step_size)
        rejected = rejected + worse.to(rejected.dtype)
        trace.append(current.value)
    return InnerResult(current.phi, torch.stack(trace), current.loss, norm, rejected)


def adam(objective: ProximalObjective, theta: Params, steps: int, lr: float, tol: float = 0.0,
         betas=(0.9, 0.999), eps: float = 1e-8, **_) -> InnerResult:
    """Adam (Kingma & Ba) on G, with bias correction; fresh moments for every task."""
    phi, done, norm, trace = theta, torch.zeros((), dtype=torch.bool), None, []
    m, v = tree.zeros_like(theta), tree.zeros_like(theta)
    for t in range(1, steps + 1):
        gradient, value, norm, done, move = observe(objective, phi, trace, done, tol)
        m = {k: betas[0] * m[k] + (1 - betas[0]) * g for k, g in gradient.items()}
        v = {k: betas[1] * v[k] + (1 - betas[1]) * g * g for k, g in gradient.items()}
        step = {k: (m[k] / (1 - betas[0] ** t)) / ((v[k] / (1 - betas[1] ** t)).sqrt() + eps)
                for k in m}
        phi = tree.add(phi, step, -lr * move)
    return _finish(objective, phi, trace, norm, None)


def hessian_free(objective: ProximalObjective, theta: Params, steps: int, lr: float = 1.0,
                 tol: float = 0.0, hf_cg_steps: int = 5, **_) -> InnerResult:
    """Hessian-free Newton (iMAML-HF): solve (C + lam I) d = -grad G with `hf_cg_steps` CG steps
    (C the support loss's curvature: its Hessian or Gauss-Newton matrix), then take the step
    size from LINE_SEARCH_STEPS that lowers G the most: the full Newton step first, whatever
    `lr` is (GD's step size says nothing about the length of a Newton step; scaling the trials by
    it kept HF from ever taking the step that makes it Newton's method). `lr` is not used: it is
    the other solvers' step size, in the signature they share."""
    phi, done, norm, trace, rejected = theta, torch.zeros((), dtype=torch.bool), None, [], None
    value_only = lambda p: objective(p)[0]  # noqa: E731
    for _ in range(steps):
        gradient, value, norm, done, move = observe(objective, phi, trace, done, tol)
        newton = conjugate_gradient(objective.newton_matrix(phi), tree.scale(gradient, -1.0),
                                    hf_cg_steps, smallest_residual=False)  # the search sets the length
        # Negative curvature on the very first CG step leaves no Newton direction: descend instead.
        fallback = (newton.iterations == 0).to(value.dtype)
        direction = tree.add(tree.scale(newton.x, 1 - fallback), gradient, -fallback)
        candidates = torch.stack([value_only(tree.add(phi, direction, a)) for a in LINE_SEARCH_STEPS])
        sizes = torch.tensor(LINE_SEARCH_STEPS, dtype=value.dtype, device=value.device)
        best = candidates.argmin()
        lowered = candidates[best] < value
        size = torch.where(lowered, sizes[best], 0.0)
        phi = tree.add(phi, direction, size * move)
        failed = (~lowered).to(value.dtype) * move
        rejected = failed if rejected is None else rejected + failed
    return _finish(objective, phi, trace, norm, rejected)


def minibatch_gradient_descent(loss, theta: Params, x: torch.Tensor, y: torch.Tensor,
                               steps: int, lr: float, batch_size) -> InnerResult:
    """Reptile's inner loop: phi_{k+1} = phi_k - lr grad L(phi_k; B_k), B_k the k-th minibatch of
    `batch_size` examples, taken in turn from the task's examples with its classes taking turns
    (wrapping round; batch_size None: every example at every step). Reptile's update owes its
    learning signal to the inner products of gradients on *different* minibatches of a task
    (Nichol et al. 2018, section 5); with the whole task at every step that term is missing, and
    Reptile learns far less (docs/results.md#reptile).
    loss: (phi, x, y) -> (L, output). No safeguard: each step's loss is on another minibatch, so
    a rise says nothing about the step; the objective trace holds each step's minibatch loss, then
    the whole task's at phi_K."""
    order = classes_in_turn(y)
    n = len(order)
    size = n if batch_size is None else min(batch_size, n)
    phi, trace, gradient = theta, [], None
    for k in range(steps):
        batch = order[torch.arange(k * size, (k + 1) * size) % n]
        gradient, (value, _) = grad_and_value(loss, has_aux=True)(phi, x[batch], y[batch])
        trace.append(value)
        phi = tree.add(phi, gradient, -lr)
    value, _ = loss(phi, x, y)
    norm = tree.norm(gradient) if gradient is not None else torch.zeros_like(value)
    return InnerResult(phi, torch.stack(trace + [value]), value, norm, torch.zeros_like(value))


def classes_in_turn(y: torch.Tensor) -> torch.Tensor:
    """Positions of a task's examples with its classes taking turns: each class's first example,
    then each one's second, ... (regression targets: as given). Minibatches cut from this order
    hold every class about equally, without randomness (so a resumed run stays bit-exact)."""
    if y.is_floating_point():
        return torch.arange(len(y), device=y.device)
    earlier = torch.ones(len(y), len(y), dtype=torch.bool, device=y.device).tril(-1)
    rank = ((y[:, None] == y[None, :]) & earlier).sum(1)  # earlier examples of the same class
    return torch.argsort(rank, stable=True)


def _finish(objective: ProximalObjective, phi: Params, trace: list, norm, rejected) -> InnerResult:
    """Evaluate G and L at the final iterate, which the loop has not seen."""
    value, loss = objective(phi)
    norm = torch.zeros_like(value) if norm is None else norm  # zero steps: phi = theta
    rejected = torch.zeros_like(value) if rejected is None else rejected
    return InnerResult(phi, torch.stack(trace + [value]), loss, norm, rejected)


INNER_SOLVERS = {"gd": gradient_descent, "adam": adam, "hf": hessian_free}
