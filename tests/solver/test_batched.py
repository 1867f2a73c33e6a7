"""The compiled solver: the same meta-gradient as eager vmap, compiled once per shape, deterministic."""
import pytest
import torch
import torch.nn.functional as F

from imaml_lightning.models import ConvNet
from imaml_lightning.solver import SolverConfig, Task, VectorizedMetaGradient
from tests.helpers import omniglot_like_tasks


def double_tasks(seed):
    tasks = omniglot_like_tasks(seed=seed)
    return Task(tasks.support_x.double(), tasks.support_y, tasks.query_x.double(), tasks.query_y)


@pytest.mark.slow  # compiles for minutes on a CPU
def test_compiled_meta_gradient_equals_eager_and_compiles_once():
    """float64, so that Inductor's fused (reordered) sums agree with eager's to rounding; a conv
    network with BatchNorm, the GD safeguard and Gauss-Newton CG, all inside the one graph."""
    torch.manual_seed(0)
    model = ConvNet(5, hidden=4, depth=2).double()
    params = dict(model.named_parameters())
    config = SolverConfig(inner_steps=2, cg_steps=2, inner_lr=0.5)
    eager = VectorizedMetaGradient(model, F.cross_entropy, config)
    compiled = VectorizedMetaGradient(model, F.cross_entropy, config, compile=True)
    for seed in (0, 1):  # the second meta-batch: new values, same shapes
        with torch._dynamo.config.patch(error_on_recompile=seed > 0):
            result = compiled(params, double_tasks(seed))
        expected = eager(params, double_tasks(seed))
        for name, grad in expected.grads.items():
            torch.testing.assert_close(result.grads[name], grad, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(result.diagnostics["cg_residual_norms"],
                                   expected.diagnostics["cg_residual_norms"])
    again = compiled(params, double_tasks(1))  # runs on CPU are reproducible bit for bit
    assert all(torch.equal(again.grads[k], result.grads[k]) for k in result.grads)
