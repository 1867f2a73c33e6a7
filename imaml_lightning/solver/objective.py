"""A task's losses as pure functions of the parameters, and the inner problem built from them."""
from typing import Callable, Optional

import torch
from torch import nn
from torch.func import functional_call, grad_and_value

from imaml_lightning.solver import curvature, tree
from imaml_lightning.solver.batch_norm import batch_norm_in_float32
from imaml_lightning.solver.tree import Params

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class TaskLoss:
    """(params, x, y) -> (loss, model output), with its two halves kept apart: the network's
    output as a function of its parameters, and the loss as a function of the output (the
    Gauss-Newton product needs each on its own)."""

    def __init__(self, model: nn.Module, loss_fn: LossFn):
        self.model, self.loss_fn = batch_norm_in_float32(model), loss_fn

    def output(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.model, params, (x,))

    def __call__(self, params: Params, x: torch.Tensor, y: torch.Tensor):
        output = self.output(params, x)
        return self.loss_fn(output, y), output

    def curvature(self, name: str, x: torch.Tensor, y: torch.Tensor):
        """phi -> (v -> C(phi) v) for the loss on (x, y); C named as in curvature.CURVATURES."""
        if name.startswith("gauss_newton"):
            return lambda phi: curvature.gauss_newton(
                lambda p: self.output(p, x), lambda z: self.loss_fn(z, y), phi,
                forward_difference=name == "gauss_newton_fd")
        return lambda phi: curvature.hessian(lambda p: self(p, x, y)[0], phi)


class ProximalObjective:
    """G(phi) = L(phi; S) + lam/2 ||phi - theta||^2, what every inner solver minimizes.

    support_loss: phi -> (L(phi; S), output). support_curvature: phi -> (v -> C v) for the
    support loss (default: its exact Hessian)."""

    def __init__(self, support_loss: Callable, theta: Params, lam: float,
                 support_curvature: Optional[Callable] = None):
        self.support_loss, self.theta, self.lam = support_loss, theta, lam
        self.support_curvature = support_curvature or (
            lambda phi: curvature.hessian(lambda p: support_loss(p)[0], phi))

    def __call__(self, phi: Params):
        """(G(phi), L(phi; S))."""
        loss, _ = self.support_loss(phi)
        return loss + self.proximal_term(phi), loss

    def proximal_term(self, phi: Params, distance: Optional[Params] = None) -> torch.Tensor:
        distance = tree.add(phi, self.theta, -1.0) if distance is None else distance
        return 0.5 * self.lam * tree.dot(distance, distance)

    def gradient_and_value(self, phi: Params):
        """(grad G, (G, L)): autograd differentiates only L; the proximal term's gradient
        lam (phi - theta) is added in closed form (no backward through it at every step)."""
        gradient, (loss, _) = grad_and_value(self.support_loss, has_aux=True)(phi)
        distance = tree.add(phi, self.theta, -1.0)
        gradient = tree.add(gradient, distance, self.lam)
        return gradient, (loss + self.proximal_term(phi, distance), loss)

    def newton_matrix(self, phi: Params):
        """v -> (C + lam I) v, the curvature of G at phi (C: the support loss's)."""
        product = self.support_curvature(phi)
        return lambda v: tree.add(product(v), v, self.lam)
