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


def half_mse(output, target):  # L = (1/2n) ||Xw - y||^2, the loss of the closed form
    return 0.5 * mse_loss(output, target)


def ridge_tasks(tasks=3, n=20, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = lambda *s: torch.randn(tasks, *s, generator=g, dtype=torch.float64)  # noqa: E731
    return Task(shape(n, d), shape(n, 1), shape(n, d), shape(n, 1))


def closed_form_meta_gradient(theta, task, lam):
    """IMAML_NOTES.md: phi* = (H + lam I)^-1 (X^T y/n + lam theta), dphi*/dtheta = lam (H + lam I)^-1."""
    X, y, Xq, yq = task
    n, d = X.shape
    H = X.T @ X / n
    regularized = H + lam * torch.eye(d, dtype=X.dtype)
    phi = torch.linalg.solve(regularized, X.T @ y / n + lam * theta.T)
    query_grad = Xq.T @ (Xq @ phi - yq) / len(Xq)
    return (lam * torch.linalg.solve(regularized, query_grad)).T


@pytest.mark.parametrize("lam", [0.3, 2.0])
def test_meta_gradient_matches_ridge_regression_closed_form(lam):
    torch.manual_seed(0)
    model = nn.Linear(6, 1, bias=False).double()
    params = dict(model.named_parameters())
    tasks = ridge_tasks()
    config = SolverConfig(lam=lam, inner_steps=3000, inner_lr=0.3, cg_steps=20)
    result = meta_gradient(model, params, tasks, half_mse, config)
    expected = torch.stack([
        closed_form_meta_gradient(params["weight"].detach(), Task(*(t[i] for t in tasks)), lam)
        for i in range(3)
    ]).mean(0)
    error = torch.linalg.norm(result.grads["weight"] - expected) / torch.linalg.norm(expected)
    assert error <= 1e-6
    # The implicit system was solved: the CG residual fell by many orders of magnitude.
    norms = result.diagnostics["cg_residual_norms"]
    assert (norms[:, -1] < 1e-8 * norms[:, 0]).all()


def test_too_few_cg_steps_do_not_reach_the_closed_form():
    """Guards the test above: it can fail when the implicit system is not solved."""
    model = nn.Linear(6, 1, bias=False).double()
    params = dict(model.named_parameters())
    tasks = ridge_tasks(seed=3)
    exact = meta_gradient(model, params, tasks, half_mse, SolverConfig(lam=0.1, inner_steps=3000, inner_lr=0.3, cg_steps=30))
    rough = meta_gradient(model, params, tasks, half_mse, SolverConfig(lam=0.1, inner_steps=3000, inner_lr=0.3, cg_steps=1))
    gap = torch.linalg.norm(rough.grads["weight"] - exact.grads["weight"])
    assert gap / torch.linalg.norm(exact.grads["weight"]) > 1e-3


def test_inner_loop_minimizes_the_ProximalObjective():
    model = nn.Linear(6, 1, bias=False).double()
    theta = {k: v.detach() for k, v in model.named_parameters()}
    tasks = ridge_tasks(tasks=1)
    lam = 0.5
    fn = TaskLoss(model, half_mse)
    X, y = tasks.support_x[0], tasks.support_y[0]
    config = SolverConfig(lam=lam, inner_steps=2000, inner_lr=0.3, cg_steps=1)
    _, diagnostics = task_meta_gradient(fn, theta, Task(*(t[0] for t in tasks)), config)
    H = X.T @ X / len(X)
    phi = torch.linalg.solve(H + lam * torch.eye(6, dtype=X.dtype), X.T @ y / len(X) + lam * theta["weight"].T)
    optimum = half_mse(X @ phi, y) + 0.5 * lam * (phi.T - theta["weight"]).pow(2).sum()
    assert diagnostics["inner_objective_after"] == pytest.approx(optimum.item(), rel=1e-10)
    assert diagnostics["inner_objective_before"] > diagnostics["inner_objective_after"]


def flat_functions(model, x, y, loss_fn):
    """(params, flat params, unflatten, flat -> network outputs, outputs -> loss)."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    names, shapes = list(params), [p.shape for p in params.values()]
    sizes = [p.numel() for p in params.values()]

    def unflatten(flat):
        return {n: c.reshape(s) for n, c, s in zip(names, flat.split(sizes), shapes)}

    def outputs(flat):
        return functional_call(model, unflatten(flat), (x,))

    flat = torch.cat([p.flatten() for p in params.values()])
    return params, flat, unflatten, outputs, lambda z: loss_fn(z, y)


def test_hessian_vector_product_matches_autograd_hessian():
    torch.manual_seed(0)
    model = MLP(2, in_features=3, hidden=(4,)).double()
    x, y = torch.randn(7, 3, dtype=torch.float64), torch.randn(7, 2, dtype=torch.float64)
    params, flat, unflatten, outputs, output_loss = flat_functions(model, x, y, mse_loss)
    loss_of_flat = lambda f: output_loss(outputs(f))  # noqa: E731
    v = torch.randn_like(flat)
    expected = torch.autograd.functional.hessian(loss_of_flat, flat) @ v
    hv = hessian_vector_product(lambda p: mse_loss(functional_call(model, p, (x,)), y), params, unflatten(v))
    torch.testing.assert_close(torch.cat([t.flatten() for t in hv.values()]), expected)


def omniglot_like_tasks(tasks=3, ways=5, shots=1, queries=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = lambda n: torch.rand(tasks, n, 1, 28, 28, generator=g)  # noqa: E731
    labels = lambda k: torch.arange(ways).repeat_interleave(k).expand(tasks, -1)  # noqa: E731
    return Task(images(ways * shots), labels(shots), images(ways * queries), labels(queries))


def test_surrogate_loss_backward_writes_the_meta_gradient():
    model = ConvNet(5, hidden=8)
    params = dict(model.named_parameters())
    grads = {k: torch.randn_like(v) for k, v in params.items()}
    surrogate_loss(params, grads).backward()
    for name, p in params.items():
        torch.testing.assert_close(p.grad, grads[name])


def test_adaptation_fits_the_support_set():
    torch.manual_seed(0)
    model = ConvNet(5, hidden=16)
    params = dict(model.named_parameters())
    tasks = omniglot_like_tasks(queries=1)
    # Query = support: after adapting, the support images must be classified better than before.
    tasks = Task(tasks.support_x, tasks.support_y, tasks.support_x, tasks.support_y)
    config = SolverConfig(lam=0.01, inner_steps=30, inner_lr=0.5, cg_steps=1)
    before = adapt_and_predict(model, params, tasks, F.cross_entropy, config, inner_steps=0)
    after = adapt_and_predict(model, params, tasks, F.cross_entropy, config)
    loss = lambda out: F.cross_entropy(out.flatten(0, 1), tasks.query_y.flatten())  # noqa: E731
    assert loss(after) < 0.5 * loss(before)


@pytest.mark.parametrize("setting, value", [("lam", 0.0), ("inner_steps", -1), ("inner_lr", 0.0),
                                            ("cg_steps", 0), ("cg_tol", -1.0)])
def test_invalid_settings_name_the_setting(setting, value):
    with pytest.raises(SettingError, match=setting):
        SolverConfig(**{setting: value})


def test_under_autocast_only_the_inner_loop_runs_in_reduced_precision():
    """bf16 autocast (mixed precision): the inner loop's forward passes are bfloat16, while the
    query gradient and every Hessian-vector product of the CG solve are float32."""
    torch.manual_seed(0)
    model = MLP(1)
    seen = []

    def recording_loss(output, target):
        seen.append((torch.is_autocast_enabled("cpu"), output.dtype))
        return mse_loss(output.float(), target)

    tasks = Task(*(torch.randn(2, 10, 1) for _ in range(4)))
    config = SolverConfig(lam=1.0, inner_steps=3, inner_lr=0.01, cg_steps=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        result = meta_gradient(model, dict(model.named_parameters()), tasks, recording_loss, config)
    # 3 inner gradients, the gd safeguard's final check, then the query gradient and 4 HVPs
    assert seen[:3] == [(True, torch.bfloat16)] * 3
    assert seen[4:9] == [(False, torch.float32)] * 5
    assert all(torch.isfinite(g).all() for g in result.grads.values())
