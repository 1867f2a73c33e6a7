import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from imaml_lightning.errors import SettingError
from imaml_lightning.models import MLP, ConvNet
from imaml_lightning.solver import (
    SolverConfig, Task, adapt_and_predict, hessian_vector_product, meta_gradient, mse_loss,
    surrogate_loss, task_meta_gradient,
)
from imaml_lightning.solver.objective import TaskLoss
from tests.helpers import (
    closed_form_meta_gradient, flat_functions, half_mse, omniglot_like_tasks, ridge_tasks)


def on(device, tensor: torch.Tensor) -> bool:
    """Whether `tensor` lives on the test's device (the computation really ran there)."""
    return tensor.device.type == torch.device(device).type


@pytest.mark.parametrize("lam", [0.3, 2.0])
def test_meta_gradient_matches_ridge_regression_closed_form(lam, device):
    torch.manual_seed(0)
    model = nn.Linear(6, 1, bias=False).double().to(device)
    params = dict(model.named_parameters())
    tasks = ridge_tasks(device=device)
    config = SolverConfig(lam=lam, inner_steps=3000, inner_lr=0.3, cg_steps=20)
    result = meta_gradient(model, params, tasks, half_mse, config)
    expected = torch.stack([
        closed_form_meta_gradient(params["weight"].detach(), Task(*(t[i] for t in tasks)), lam)
        for i in range(3)
    ]).mean(0)
    error = torch.linalg.norm(result.grads["weight"] - expected) / torch.linalg.norm(expected)
    assert error <= 1e-6 and on(device, result.grads["weight"])
    # The implicit system was solved: the CG residual fell by many orders of magnitude.
    norms = result.diagnostics["cg_residual_norms"]
    assert (norms[:, -1] < 1e-8 * norms[:, 0]).all()


def test_too_few_cg_steps_do_not_reach_the_closed_form(device):
    """Guards the test above: it can fail when the implicit system is not solved."""
    model = nn.Linear(6, 1, bias=False).double().to(device)
    params = dict(model.named_parameters())
    tasks = ridge_tasks(seed=3, device=device)
    exact = meta_gradient(model, params, tasks, half_mse, SolverConfig(lam=0.1, inner_steps=3000, inner_lr=0.3, cg_steps=30))
    rough = meta_gradient(model, params, tasks, half_mse, SolverConfig(lam=0.1, inner_steps=3000, inner_lr=0.3, cg_steps=1))
    gap = torch.linalg.norm(rough.grads["weight"] - exact.grads["weight"])
    assert gap / torch.linalg.norm(exact.grads["weight"]) > 1e-3


def test_inner_loop_minimizes_the_ProximalObjective(device):
    model = nn.Linear(6, 1, bias=False).double().to(device)
    theta = {k: v.detach() for k, v in model.named_parameters()}
    tasks = ridge_tasks(tasks=1, device=device)
    lam = 0.5
    fn = TaskLoss(model, half_mse)
    X, y = tasks.support_x[0], tasks.support_y[0]
    config = SolverConfig(lam=lam, inner_steps=2000, inner_lr=0.3, cg_steps=1)
    _, diagnostics = task_meta_gradient(fn, theta, Task(*(t[0] for t in tasks)), config)
    H = X.T @ X / len(X)
    phi = torch.linalg.solve(H + lam * torch.eye(6, dtype=X.dtype, device=device), X.T @ y / len(X) + lam * theta["weight"].T)
    optimum = half_mse(X @ phi, y) + 0.5 * lam * (phi.T - theta["weight"]).pow(2).sum()
    assert diagnostics["inner_objective_after"] == pytest.approx(optimum.item(), rel=1e-10)
    assert diagnostics["inner_objective_before"] > diagnostics["inner_objective_after"]


def test_hessian_vector_product_matches_autograd_hessian(device):
    torch.manual_seed(0)
    model = MLP(2, in_features=3, hidden=(4,)).double().to(device)
    x, y = (torch.randn(7, n, dtype=torch.float64).to(device) for n in (3, 2))
    params, flat, unflatten, outputs, output_loss = flat_functions(model, x, y, mse_loss)
    loss_of_flat = lambda f: output_loss(outputs(f))  # noqa: E731
    v = torch.randn(flat.shape, dtype=flat.dtype).to(device)
    expected = torch.autograd.functional.hessian(loss_of_flat, flat) @ v
    hv = hessian_vector_product(lambda p: mse_loss(functional_call(model, p, (x,)), y), params, unflatten(v))
    torch.testing.assert_close(torch.cat([t.flatten() for t in hv.values()]), expected)


def test_surrogate_loss_backward_writes_the_meta_gradient(device):
    model = ConvNet(5, hidden=8).to(device)
    params = dict(model.named_parameters())
    grads = {k: torch.randn_like(v) for k, v in params.items()}
    surrogate_loss(params, grads).backward()
    for name, p in params.items():
        torch.testing.assert_close(p.grad, grads[name])


def test_adaptation_fits_the_support_set(device):
    torch.manual_seed(0)
    model = ConvNet(5, hidden=16).to(device)
    params = dict(model.named_parameters())
    tasks = omniglot_like_tasks(queries=1, device=device)
    # Query = support: after adapting, the support images must be classified better than before.
    tasks = Task(tasks.support_x, tasks.support_y, tasks.support_x, tasks.support_y)
    config = SolverConfig(lam=0.01, inner_steps=30, inner_lr=0.5, cg_steps=1)
    before = adapt_and_predict(model, params, tasks, F.cross_entropy, config, inner_steps=0)
    after = adapt_and_predict(model, params, tasks, F.cross_entropy, config)
    loss = lambda out: F.cross_entropy(out.flatten(0, 1), tasks.query_y.flatten())  # noqa: E731
    assert loss(after) < 0.5 * loss(before) and on(device, after)


@pytest.mark.parametrize("setting, value", [("lam", 0.0), ("inner_steps", -1), ("inner_lr", 0.0),
                                            ("cg_steps", 0), ("cg_tol", -1.0)])
def test_invalid_settings_name_the_setting(setting, value):
    with pytest.raises(SettingError, match=setting):
        SolverConfig(**{setting: value})


def test_under_autocast_only_the_inner_loop_runs_in_reduced_precision(device):
    """bf16 autocast (mixed precision): the inner loop's forward passes are bfloat16, while the
    query gradient and every Hessian-vector product of the CG solve are float32."""
    torch.manual_seed(0)
    model = MLP(1).to(device)
    device_type = torch.device(device).type
    seen = []

    def recording_loss(output, target):
        seen.append((torch.is_autocast_enabled(device_type), output.dtype))
        return mse_loss(output.float(), target)

    tasks = Task(*(torch.randn(2, 10, 1).to(device) for _ in range(4)))
    config = SolverConfig(lam=1.0, inner_steps=3, inner_lr=0.01, cg_steps=4)
    with torch.autocast(device_type, dtype=torch.bfloat16):
        result = meta_gradient(model, dict(model.named_parameters()), tasks, recording_loss, config)
    # 3 inner gradients, the gd safeguard's final check, then the query gradient and 4 HVPs
    assert seen[:3] == [(True, torch.bfloat16)] * 3
    assert seen[4:9] == [(False, torch.float32)] * 5
    assert all(torch.isfinite(g).all() for g in result.grads.values())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_under_autocast_batch_norm_normalizes_in_float32(device, dtype):
    """The conv-4 under autocast, as `--trainer.precision bf16-mixed` runs it: in the inner
    loop (autocast on) convolutions and the classifier run in reduced precision, while every
    BatchNorm layer normalizes in float32 (solver.batch_norm.batch_norm_in_float32 casts its
    input up); the query gradient and the CG solve (autocast off) are float32 throughout.
    With BatchNorm fed the convolutions' reduced-precision output instead, vmap over its
    gradient fails ("expected scalar type BFloat16 but found Float" on CPU, torch 2.14.1; the
    same with Half under CUDA autocast, pytorch/pytorch#184890)."""
    torch.manual_seed(0)
    model = ConvNet(5, hidden=8).to(device)
    device_type = torch.device(device).type
    seen = []

    def record(layer, inputs, output):
        seen.append((type(layer).__name__, torch.is_autocast_enabled(device_type),
                     inputs[0].dtype, output.dtype))

    for layer in model.modules():
        if isinstance(layer, (nn.Conv2d, nn.BatchNorm2d, nn.Linear)):
            layer.register_forward_hook(record)
    config = SolverConfig(inner_steps=2, inner_lr=0.3, cg_steps=2)
    with torch.autocast(device_type, dtype=dtype):
        result = meta_gradient(model, dict(model.named_parameters()),
                               omniglot_like_tasks(device=device), F.cross_entropy, config)
    inner = {(name, tuple(dtypes)) for name, autocast, *dtypes in seen if autocast}
    outer = {(name, tuple(dtypes)) for name, autocast, *dtypes in seen if not autocast}
    f32 = torch.float32
    # Reduced precision where autocast reaches: the inner loop's gradient passes. (Its
    # gradient-free passes under vmap, such as the safeguard's last objective value, stay float32
    # with CPU autocast, torch 2.14.1; either is fine here.)
    assert {("Conv2d", (f32, dtype)), ("Linear", (f32, dtype))} <= inner <= {
        ("Conv2d", (f32, dtype)), ("Linear", (f32, dtype)), ("BatchNorm2d", (f32, f32)),
        ("Conv2d", (f32, f32)), ("Linear", (f32, f32))}
    assert ("BatchNorm2d", (f32, f32)) in inner
    assert outer == {("Conv2d", (f32, f32)), ("BatchNorm2d", (f32, f32)), ("Linear", (f32, f32))}
    assert all(g.dtype == f32 and torch.isfinite(g).all() and on(device, g)
               for g in result.grads.values())
