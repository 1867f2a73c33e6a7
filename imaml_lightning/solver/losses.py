import torch


def mse_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error, written out: torch.nn.functional.mse_loss's backward has no working
    forward-mode derivative in torch 2.14 (jvp of its grad fails with "ZeroTensors are
    immutable"), and the solver's Hessian-vector products need one."""
    return (output - target).pow(2).mean()
