"""Curvature of the support loss L(phi; S) at phi, as a product v -> C v.

The implicit system (I + C/lam) x = grad L(phi; Q) and iMAML-HF's Newton system (C + lam I) d =
-grad G use one of:

- "hessian": C = H = hess L(phi; S), the paper's. Away from a minimizer of the inner problem (the
  usual case: a few inner steps on a ReLU network) I + H/lam can be indefinite, and CG meets
  negative curvature or returns a residual larger than it started with.
- "gauss_newton": C = J^T H_out J, the generalized Gauss-Newton matrix (Schraudolph 2002; what
  Hessian-free optimization uses, Martens 2010), J the Jacobian of the network's outputs in phi
  and H_out the Hessian of the loss in the outputs. H_out is positive semi-definite for
  cross-entropy and squared error, so I + C/lam >= I: CG is always well posed. C = H where the
  network is linear in phi (so the ridge closed form holds for both), and C drops the term of H
  that the network's own second derivatives contribute.
- "gauss_newton_fd": the same matrix with J v as a forward difference of the outputs,
  (z(phi + h v) - z(phi)) / h: one plain forward instead of a forward with tangents. The outputs
  are continuous in phi, so the error is small (a few percent in float32, tested below 5%:
  rounding and the ReLU kinks the difference straddles); a difference of the *gradient* would not be (its kinks
  make the error O(1) at any h), which is why only J v is differenced.

What a product costs: "hessian" is forward-over-reverse through the whole network (a forward and
a backward, each carrying tangents); "gauss_newton" one forward with tangents for J v and one
backward for J^T u through a pullback built once per point and shared by every product there;
"gauss_newton_fd" a plain forward and that backward. Their measured cost in passes
(benchmarks.solver_speed): docs/benchmarks.md#solver_speed.
"""
from typing import Callable

import torch
from torch.func import grad, jvp, vjp

from imaml_lightning.solver import tree
from imaml_lightning.solver.tree import Params

CURVATURES = ("hessian", "gauss_newton", "gauss_newton_fd")
MatVec = Callable[[Params], Params]


def hessian_vector_product(scalar_fn, params: Params, v: Params) -> Params:
    """H v for H = hess scalar_fn(params): the forward-mode derivative of the gradient
    (forward-over-reverse), one forward and one backward pass with dual numbers."""
    return jvp(grad(scalar_fn), (params,), (v,))[1]


def hessian(loss: Callable[[Params], torch.Tensor], phi: Params) -> MatVec:
    """v -> hess loss(phi) v."""
    return lambda v: hessian_vector_product(loss, phi, v)


def gauss_newton(output: Callable[[Params], torch.Tensor],
                 output_loss: Callable[[torch.Tensor], torch.Tensor], phi: Params,
                 forward_difference: bool = False) -> MatVec:
    """v -> J^T H_out J v, with z = output(phi), J = dz/dphi, H_out = hess output_loss(z).

    The pullback v -> J^T v is built once here (one forward pass, its activations kept) and
    reused by every product; J v is a forward-mode derivative (jvp), or a forward difference,
    H_out u a Hessian-vector product of the loss in the outputs (a few operations on the logits)."""
    z, pullback = vjp(output, phi)

    def product(v: Params) -> Params:
        jv = jvp(output, (phi,), (v,))[1] if not forward_difference else difference(v)
        return pullback(hessian_vector_product(output_loss, z, jv))[0]

    def difference(v: Params) -> torch.Tensor:
        # A parameter step of norm 3 sqrt(eps) (1e-3 in float32) balances truncation and the
        # kinks it straddles (larger steps) against rounding (smaller ones); on the Omniglot
        # conv-4 it came out best of the steps 1e-1 ... 1e-4 we tried (a one-off comparison, not
        # a repository script; tests/solver/test_curvature.py bounds the error by 5%).
        h = 3 * torch.finfo(z.dtype).eps ** 0.5 / tree.norm(v).clamp_min(1e-30)
        return (output(tree.add(phi, v, h)) - z) / h

    return product
