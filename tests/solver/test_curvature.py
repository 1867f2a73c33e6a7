"""The curvature of the implicit system: the exact Hessian and the Gauss-Newton matrix."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.functional import hessian, jacobian
from torch.func import functional_call, vmap

from imaml_lightning.models import ConvNet
from imaml_lightning.solver import SolverConfig, Task, meta_gradient, mse_loss, task_meta_gradient
from imaml_lightning.solver.curvature import gauss_newton, hessian_vector_product
from imaml_lightning.solver.algorithms import adapt
from imaml_lightning.solver.objective import TaskLoss
from tests.helpers import (
    closed_form_meta_gradient, flat_functions, half_mse, omniglot_like_tasks, ridge_tasks,
)


def dense_gauss_newton(outputs, output_loss, flat):
    """J^T H_out J formed as matrices."""
    z = outputs(flat)
    J = jacobian(outputs, flat).reshape(z.numel(), flat.numel())
    H_out = hessian(lambda zz: output_loss(zz.reshape(z.shape)), z.flatten())
    return J.T @ H_out @ J


@pytest.mark.parametrize("loss_fn, out", [(F.cross_entropy, 3), (mse_loss, 2)])
def test_gauss_newton_product_equals_the_dense_matrix(loss_fn, out, device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, out)).double().to(device)
    x = torch.randn(9, 4, dtype=torch.float64).to(device)
    y = (torch.randint(out, (9,)) if loss_fn is F.cross_entropy
         else torch.randn(9, out, dtype=torch.float64)).to(device)
    params, flat, unflatten, outputs, output_loss = flat_functions(model, x, y, loss_fn)
    v = torch.randn(flat.shape, dtype=flat.dtype).to(device)
    expected = dense_gauss_newton(outputs, output_loss, flat) @ v
    product = gauss_newton(lambda p: functional_call(model, p, (x,)), output_loss, params)
    got = torch.cat([t.flatten() for t in product(unflatten(v)).values()])
    assert torch.linalg.norm(got - expected) <= 1e-10 * torch.linalg.norm(expected)
    # ... and it is not the Hessian of this nonlinear network (the test can tell them apart).
    exact = torch.cat([t.flatten() for t in hessian_vector_product(
        lambda p: output_loss(functional_call(model, p, (x,))), params, unflatten(v)).values()])
    assert torch.linalg.norm(exact - expected) > 1e-3 * torch.linalg.norm(expected)


def test_gauss_newton_product_with_batch_norm_couples_the_batch(device):
    """BatchNorm with batch statistics makes every output depend on every image: J is the
    Jacobian of the whole batch's outputs, and the product must still equal J^T H_out J."""
    torch.manual_seed(1)
    model = ConvNet(3, hidden=3, depth=2, image_size=6).double().to(device)
    x = torch.randn(6, 1, 6, 6, dtype=torch.float64).to(device)
    y = torch.arange(3).repeat(2).to(device)
    params, flat, unflatten, outputs, output_loss = flat_functions(model, x, y, F.cross_entropy)
    v = torch.randn(flat.shape, dtype=flat.dtype).to(device)
    expected = dense_gauss_newton(outputs, output_loss, flat) @ v
    product = gauss_newton(lambda p: functional_call(model, p, (x,)), output_loss, params)
    got = torch.cat([t.flatten() for t in product(unflatten(v)).values()])
    assert torch.linalg.norm(got - expected) <= 1e-10 * torch.linalg.norm(expected)


def test_forward_difference_gauss_newton_is_close_to_the_exact_product(device):
    """J v as a forward difference of the logits: within a few percent on a ReLU conv net with
    BatchNorm in float32, and not identical (it is an approximation)."""
    torch.manual_seed(0)
    model = ConvNet(5, hidden=16).to(device)
    tasks = omniglot_like_tasks(tasks=4, device=device)
    fn = TaskLoss(model, F.cross_entropy)
    theta = {k: v.detach() for k, v in model.named_parameters()}
    v = {k: torch.randn(p.shape).to(device) for k, p in theta.items()}
    flat = lambda d: torch.cat([t.flatten() for t in d.values()])  # noqa: E731
    for i in range(4):
        x, y = tasks.support_x[i], tasks.support_y[i]
        exact = flat(fn.curvature("gauss_newton", x, y)(theta)(v))
        difference = flat(fn.curvature("gauss_newton_fd", x, y)(theta)(v))
        error = torch.linalg.norm(difference - exact) / torch.linalg.norm(exact)
        assert 0 < error < 0.05


def test_gauss_newton_equals_the_hessian_on_a_linear_model(device):
    model = nn.Linear(6, 1, bias=False).double().to(device)
    task = Task(*(t[0] for t in ridge_tasks(tasks=1, device=device)))
    params = {k: v.detach() for k, v in model.named_parameters()}
    v = {"weight": torch.randn(1, 6, dtype=torch.float64).to(device)}
    fn = TaskLoss(model, half_mse)
    ggn = fn.curvature("gauss_newton", task.support_x, task.support_y)(params)(v)
    exact = fn.curvature("hessian", task.support_x, task.support_y)(params)(v)
    torch.testing.assert_close(ggn["weight"], exact["weight"], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("curvature", ["gauss_newton", "gauss_newton_fd"])
@pytest.mark.parametrize("inner_solver, steps, lr", [("gd", 3000, 0.3), ("hf", 20, 1.0)])
def test_ridge_closed_form_holds_with_gauss_newton(inner_solver, steps, lr, curvature, device):
    torch.manual_seed(0)
    model = nn.Linear(6, 1, bias=False).double().to(device)
    params = dict(model.named_parameters())
    tasks = ridge_tasks(device=device)
    config = SolverConfig(lam=0.7, inner_steps=steps, inner_lr=lr, cg_steps=20, hf_cg_steps=10,
                         inner_solver=inner_solver, curvature=curvature)
    result = meta_gradient(model, params, tasks, half_mse, config)
    expected = torch.stack([
        closed_form_meta_gradient(params["weight"].detach(), Task(*(t[i] for t in tasks)), 0.7)
        for i in range(3)]).mean(0)
    error = torch.linalg.norm(result.grads["weight"] - expected) / torch.linalg.norm(expected)
    assert error <= 1e-6


def test_cg_on_the_gauss_newton_system_never_meets_negative_curvature(device):
    """A ReLU conv net a few inner steps from theta, small lambda: the exact system I + H/lam is
    indefinite for some tasks; I + G/lam >= I never is, and CG runs every step."""
    torch.manual_seed(0)
    model = ConvNet(5, hidden=16).to(device)
    params = dict(model.named_parameters())
    tasks = omniglot_like_tasks(tasks=8, queries=2, device=device)
    settings = dict(lam=0.05, inner_steps=3, inner_lr=0.3, cg_steps=8)
    exact = meta_gradient(model, params, tasks, F.cross_entropy,
                          SolverConfig(**settings, curvature="hessian"))
    assert exact.diagnostics["cg_negative_curvature"].any()  # the contrast the test relies on
    ggn = meta_gradient(model, params, tasks, F.cross_entropy,
                        SolverConfig(**settings, curvature="gauss_newton"))
    assert not ggn.diagnostics["cg_negative_curvature"].any()
    assert not ggn.diagnostics["cg_returned_start"].any()
    assert (ggn.diagnostics["cg_iterations"] == 8).all()


def signed_square_loss(output, y):
    """mean(y * output^2) / 2: convex where the task's y is +1, concave where it is -1."""
    return 0.5 * (y * output.pow(2)).mean()


def test_a_task_whose_cg_returns_x0_contributes_its_first_order_term(device):
    """A concave support loss makes I + H/lam negative definite: CG stops at its first step
    with x = x0 = 0. The task is flagged and contributes grad L(phi; Q), not zero; a convex task
    beside it keeps its CG solution."""
    model = nn.Linear(3, 1, bias=False).double().to(device)
    theta = {k: v.detach() for k, v in model.named_parameters()}
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20, 3, generator=g, dtype=torch.float64).to(device)
    fn = TaskLoss(model, signed_square_loss)
    config = SolverConfig(lam=0.1, inner_steps=0, cg_steps=10, curvature="hessian")
    for sign, stalled in ((-1.0, True), (1.0, False)):
        y = torch.full((20, 1), sign, dtype=torch.float64, device=device)
        task = Task(x, y, x + 1, torch.ones_like(y))
        gradient, diagnostics = task_meta_gradient(fn, theta, task, config)
        assert bool(diagnostics["cg_returned_start"]) is stalled
        query_grad = torch.func.grad(lambda p: fn(p, task.query_x, task.query_y)[0])(theta)
        if stalled:
            assert diagnostics["cg_negative_curvature"]
            torch.testing.assert_close(gradient["weight"], query_grad["weight"])
        else:  # the exact solve of (I + X^T X / (n lam)) g = grad L(theta; Q)
            A = torch.eye(3, dtype=torch.float64, device=device) + x.T @ x / (20 * 0.1)
            expected = torch.linalg.solve(A, query_grad["weight"].T).T
            torch.testing.assert_close(gradient["weight"], expected)


def tanh_regression(seed=0, device="cpu"):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(1, 6), nn.Tanh(), nn.Linear(6, 1)).double().to(device)
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(2, 10, 1, generator=g, dtype=torch.float64) * 4 - 2).to(device)
    task = Task(x[0], torch.sin(2 * x[0]), x[1], torch.sin(2 * x[1]) + 0.3)
    return model, task


@pytest.mark.parametrize("inner_solver, steps, lr", [("gd", 1000, 0.3), ("hf", 12, 1.0)])
def test_meta_gradient_matches_finite_differences_on_a_nonlinear_network(inner_solver, steps, lr,
                                                                        device):
    """On a tanh network H depends on phi: a Hessian taken anywhere but at phi* (at theta, say)
    passes the ridge tests but not this one. Inner problem solved to ||grad G|| <= 1e-10, then the
    meta-gradient against central differences of theta -> L(phi*(theta); Q)."""
    model, task = tanh_regression(device=device)
    fn = TaskLoss(model, mse_loss)
    theta = {k: v.detach() for k, v in model.named_parameters()}
    size = sum(v.numel() for v in theta.values())
    config = SolverConfig(lam=1.0, inner_steps=steps, inner_lr=lr, inner_solver=inner_solver,
                         hf_cg_steps=size, cg_steps=size, curvature="hessian")
    gradient, diagnostics = task_meta_gradient(fn, theta, task, config)
    assert diagnostics["inner_grad_norm"] <= 1e-10
    solve = SolverConfig(lam=1.0, inner_steps=12, inner_lr=1.0, inner_solver="hf", hf_cg_steps=size,
                        curvature="hessian")

    def query_loss_at_minimizer(params):
        phi, inner = adapt(fn, params, task, solve)
        return fn(phi, task.query_x, task.query_y)[0], inner["inner_grad_norm"]

    eps = 1e-4
    flat_theta = torch.cat([v.flatten() for v in theta.values()])
    shifts = torch.cat([torch.eye(size), -torch.eye(size)]).double().to(device) * eps
    shifted = {k: v for k, v in zip(theta, (flat_theta + shifts).split([v.numel() for v in theta.values()], -1))}
    shifted = {k: v.reshape(-1, *theta[k].shape) for k, v in shifted.items()}
    losses, norms = vmap(query_loss_at_minimizer)(shifted)
    assert norms.max() <= 1e-10
    central = (losses[:size] - losses[size:]) / (2 * eps)
    errors = torch.cat([g.flatten() for g in gradient.values()]) - central
    flat = torch.cat([g.flatten() for g in gradient.values()])
    assert torch.linalg.norm(errors) <= 1e-5 * torch.linalg.norm(flat)
    # The Gauss-Newton meta-gradient is another quantity here: the test tells them apart.
    ggn, _ = task_meta_gradient(fn, theta, task, SolverConfig(**{**config.__dict__, "curvature": "gauss_newton"}))
    gap = torch.linalg.norm(torch.cat([(ggn[k] - gradient[k]).flatten() for k in theta]))
    assert gap > 1e-3 * torch.linalg.norm(flat)
