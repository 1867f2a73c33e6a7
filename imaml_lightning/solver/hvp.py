from torch.func import grad, jvp

from imaml_lightning.solver.tree import Params


def hessian_vector_product(scalar_fn, params: Params, v: Params) -> Params:
    """H v for H = hess scalar_fn(params): the forward-mode derivative of the gradient
    (forward-over-reverse), one forward and one backward pass with dual numbers."""
    return jvp(grad(scalar_fn), (params,), (v,))[1]
