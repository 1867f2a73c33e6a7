"""Inner solvers and baselines: each checked against an independent computation."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from imaml_lightning.models import ConvNet
from imaml_lightning.solver import INNER_SOLVERS, SolverConfig, Task, meta_gradient, mse_loss
from imaml_lightning.solver.inner import classes_in_turn
from imaml_lightning.solver.objective import ProximalObjective, TaskLoss
from imaml_lightning.solver.reference import meta_gradient_loop
from tests.helpers import closed_form_meta_gradient, half_mse, omniglot_like_tasks, ridge_tasks


def linear_model(device="cpu"):
    torch.manual_seed(0)
    return nn.Linear(6, 1, bias=False).double().to(device)


@pytest.mark.parametrize("inner_solver, steps, lr", [("gd", 3000, 0.3), ("adam", 4000, 0.003),
                                                     ("hf", 20, 1.0)])
def test_every_inner_solver_reaches_the_closed_form_meta_gradient(inner_solver, steps, lr, device):
    model = linear_model(device)
    params = dict(model.named_parameters())
    tasks = ridge_tasks(device=device)
    config = SolverConfig(lam=0.7, inner_steps=steps, inner_lr=lr, cg_steps=20,
                         inner_solver=inner_solver, hf_cg_steps=10)
    result = meta_gradient(model, params, tasks, half_mse, config)
    expected = torch.stack([
        closed_form_meta_gradient(params["weight"].detach(), Task(*(t[i] for t in tasks)), 0.7)
        for i in range(3)]).mean(0)
    error = torch.linalg.norm(result.grads["weight"] - expected) / torch.linalg.norm(expected)
    assert error <= 1e-6, inner_solver


def test_hf_lowers_the_objective_more_than_gd_for_the_same_gradient_evaluations(device):
    """On a convex (ridge) problem: 2 HF steps with 4 CG steps cost 2 gradients + 8 HVPs + line
    searches; GD gets 2 * (1 + 2 * 4) = 18 gradient evaluations (an HVP costs about two)."""
    model = linear_model(device)
    theta = {k: v.detach() for k, v in model.named_parameters()}
    tasks = ridge_tasks(tasks=1, d=6, seed=5, device=device)
    task = Task(*(t[0] for t in tasks))
    fn = TaskLoss(model, half_mse)
    objective = ProximalObjective(lambda p: fn(p, task.support_x, task.support_y), theta, 0.1)
    hf = INNER_SOLVERS["hf"](objective, theta, steps=2, lr=1.0, hf_cg_steps=4)
    gd = INNER_SOLVERS["gd"](objective, theta, steps=18, lr=0.5)
    assert objective(hf.phi)[0] < objective(gd.phi)[0]


@pytest.mark.parametrize("inner_solver, lr", [("gd", 0.3), ("adam", 0.05), ("hf", 1.0)])
def test_inner_trace_records_the_objective_at_every_iterate(inner_solver, lr, device):
    model = linear_model(device)
    theta = {k: v.detach() for k, v in model.named_parameters()}
    task = Task(*(t[0] for t in ridge_tasks(tasks=1, device=device)))
    fn = TaskLoss(model, half_mse)
    objective = ProximalObjective(lambda p: fn(p, task.support_x, task.support_y), theta, 1.0)
    result = INNER_SOLVERS[inner_solver](objective, theta, steps=7, lr=lr)
    assert result.objective_trace.shape == (8,)
    assert torch.allclose(result.objective_trace[0], objective(theta)[0])
    assert torch.allclose(result.objective_trace[-1], objective(result.phi)[0])
    assert torch.allclose(result.support_loss, objective(result.phi)[1])
    assert result.objective_trace[-1] < result.objective_trace[0]
    if inner_solver != "adam":  # the safeguard and the line search never let G rise
        assert never_rises(result.objective_trace)


def never_rises(trace: torch.Tensor) -> bool:
    """G non-increasing along the trace, up to the rounding the GD safeguard tolerates."""
    return bool((trace.diff() <= 8 * torch.finfo(trace.dtype).eps * trace[:-1].abs()).all())


def test_hf_converges_on_a_smooth_nonconvex_network(device):
    """Newton directions of a tanh MLP can be far too long where I + H/lam is nearly singular;
    the line search must reach small enough steps for HF to keep descending (it stalled at
    ||grad G| = 1.96, G = 3.84 on this task when its shortest trial step was 1/16)."""
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(1, 40), nn.Tanh(), nn.Linear(40, 40), nn.Tanh(),
                        nn.Linear(40, 1)).double().to(device)
    theta = {k: v.detach() for k, v in net.named_parameters()}
    x = (torch.rand(10, 1) * 10 - 5).double().to(device)
    fn = TaskLoss(net, mse_loss)
    objective = ProximalObjective(lambda p: fn(p, x, 3 * torch.sin(x + 1)), theta, 0.5)
    hf = INNER_SOLVERS["hf"](objective, theta, steps=40, lr=1.0, hf_cg_steps=5)
    gd = INNER_SOLVERS["gd"](objective, theta, steps=400, lr=0.005)
    assert hf.gradient_norm < 1e-4
    assert hf.objective_trace[-1] < gd.objective_trace[-1]


def test_hf_takes_the_full_newton_step_whatever_the_gd_step_size(device):
    """On a convex (ridge) problem with the shipped Omniglot settings (lam 0.5, inner_lr 0.3,
    hf_cg_steps 5 on 5 parameters): one Newton step is the minimizer."""
    torch.manual_seed(0)
    model = nn.Linear(5, 1, bias=False).double().to(device)
    theta = {k: v.detach() for k, v in model.named_parameters()}
    task = Task(*(t[0] for t in ridge_tasks(tasks=1, d=5, device=device)))
    fn = TaskLoss(model, half_mse)
    objective = ProximalObjective(lambda p: fn(p, task.support_x, task.support_y), theta, 0.5)
    hf = INNER_SOLVERS["hf"](objective, theta, steps=1, lr=0.3, hf_cg_steps=5)
    X, y = task.support_x, task.support_y
    minimizer = torch.linalg.solve(X.T @ X / len(X) + 0.5 * torch.eye(5, dtype=X.dtype, device=device),
                                   X.T @ y / len(X) + 0.5 * theta["weight"].T)
    torch.testing.assert_close(hf.phi["weight"], minimizer.T, rtol=1e-8, atol=1e-10)


def test_inner_tolerance_stops_converged_tasks(device):
    model = linear_model(device)
    theta = {k: v.detach() for k, v in model.named_parameters()}
    task = Task(*(t[0] for t in ridge_tasks(tasks=1, device=device)))
    fn = TaskLoss(model, half_mse)
    objective = ProximalObjective(lambda p: fn(p, task.support_x, task.support_y), theta, 1.0)
    loose = INNER_SOLVERS["gd"](objective, theta, steps=500, lr=0.3, tol=1e-2)
    tight = INNER_SOLVERS["gd"](objective, theta, steps=500, lr=0.3)
    assert 1e-3 < loose.gradient_norm <= 1e-2 * 1.5
    assert tight.gradient_norm < 1e-6


def unrolled_maml_gradient(model, params, task, steps, lr):
    """MAML by plain autograd: an explicit unrolled loop with create_graph=True."""
    theta = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
    phi = dict(theta)
    for _ in range(steps):
        loss = F.cross_entropy(functional_call(model, phi, (task.support_x,)), task.support_y)
        grads = torch.autograd.grad(loss, list(phi.values()), create_graph=True)
        phi = {k: p - lr * g for (k, p), g in zip(phi.items(), grads)}
    query = F.cross_entropy(functional_call(model, phi, (task.query_x,)), task.query_y)
    return dict(zip(theta, torch.autograd.grad(query, list(theta.values()))))


def test_maml_meta_gradient_equals_autograd_through_the_unrolled_loop(device):
    torch.manual_seed(0)
    model = ConvNet(5, hidden=8).double().to(device)
    params = dict(model.named_parameters())
    tasks = Task(*(t.double() if t.is_floating_point() else t
                   for t in omniglot_like_tasks(tasks=2, device=device)))
    config = SolverConfig(algorithm="maml", inner_steps=3, inner_lr=0.4)
    result = meta_gradient(model, params, tasks, F.cross_entropy, config)
    expected = [unrolled_maml_gradient(model, params, Task(*(t[i] for t in tasks)), 3, 0.4)
                for i in range(2)]
    for name, grad in result.grads.items():
        torch.testing.assert_close(grad, (expected[0][name] + expected[1][name]) / 2)
    # ... and is not the first-order one (the second-order terms matter here).
    first_order = meta_gradient(model, params, tasks, F.cross_entropy,
                                SolverConfig(algorithm="fomaml", inner_steps=3, inner_lr=0.4))
    gap = sum((result.grads[k] - first_order.grads[k]).norm() for k in params)
    assert gap > 1e-4 * sum(g.norm() for g in result.grads.values())


def test_fomaml_and_reptile_directions(device):
    torch.manual_seed(0)
    model = nn.Linear(6, 1, bias=False).double().to(device)
    params = dict(model.named_parameters())
    tasks = ridge_tasks(tasks=1, device=device)
    X, y, Xq, yq = (t[0] for t in tasks)
    w0 = params["weight"].detach().T
    phi = w0 - 0.1 * X.T @ (X @ w0 - y) / len(X)  # one plain gradient step on the support loss
    fomaml = meta_gradient(model, params, tasks, half_mse, SolverConfig(algorithm="fomaml", inner_steps=1))
    torch.testing.assert_close(fomaml.grads["weight"], (Xq.T @ (Xq @ phi - yq) / len(Xq)).T)
    # Reptile's inner steps fit the task's support and query examples together, in minibatches
    # taken in turn (wrapping round), or all of them at every step.
    X_all, y_all = torch.cat([X, Xq]), torch.cat([y, yq])
    for batch_size, steps in [(None, 3), (4, 5), (7, 4)]:
        phi_all = w0
        for k in range(steps):
            rows = torch.arange(k * (batch_size or len(X_all)), (k + 1) * (batch_size or len(X_all)),
                                device=device)
            Xb, yb = X_all[rows % len(X_all)], y_all[rows % len(X_all)]
            phi_all = phi_all - 0.1 * Xb.T @ (Xb @ phi_all - yb) / len(Xb)
        config = SolverConfig(algorithm="reptile", inner_steps=steps, reptile_batch_size=batch_size)
        reptile = meta_gradient(model, params, tasks, half_mse, config)
        torch.testing.assert_close(reptile.grads["weight"], (w0 - phi_all).T)


def test_reptile_minibatches_hold_every_class_in_turn():
    y = torch.tensor([2, 0, 1, 2, 2, 0, 0, 1, 1, 0])  # support then queries, as episodes come
    order = classes_in_turn(y)
    assert order.tolist() == [0, 1, 2, 3, 5, 7, 4, 6, 8, 9]
    # Omniglot-shaped 5-way tasks, 1 support + 5 queries per class: minibatches of 10 hold 2 per class.
    task = omniglot_like_tasks(queries=5)
    labels = torch.cat([task.support_y[0], task.query_y[0]])
    batches = labels[classes_in_turn(labels)][:len(labels) // 10 * 10].view(-1, 10)
    assert all(torch.bincount(b, minlength=5).tolist() == [2] * 5 for b in batches)


@pytest.mark.parametrize("algorithm", ["imaml", "maml", "fomaml", "reptile"])
def test_vmap_equals_the_per_task_loop(algorithm, device):
    """In float64: in float32 the two orders of summation round differently, and Reptile's
    minibatches of 10 under BatchNorm amplify that to 2e-3 (float64: 1e-14)."""
    torch.manual_seed(0)
    model = ConvNet(5, hidden=16).double().to(device)
    params = dict(model.named_parameters())
    tasks = omniglot_like_tasks(device=device)
    tasks = Task(tasks.support_x.double(), tasks.support_y, tasks.query_x.double(), tasks.query_y)
    config = SolverConfig(algorithm=algorithm, inner_steps=3, cg_steps=3)
    batched = meta_gradient(model, params, tasks, F.cross_entropy, config)
    loop = meta_gradient_loop(model, params, tasks, F.cross_entropy, config)
    for name, grad in batched.grads.items():
        torch.testing.assert_close(grad, loop.grads[name], rtol=1e-9, atol=1e-12)
    for name in ("query_loss_after", "query_loss_before", "query_output_before"):
        torch.testing.assert_close(batched.diagnostics[name], loop.diagnostics[name])
    assert not torch.allclose(batched.diagnostics["query_loss_before"],
                              batched.diagnostics["query_loss_after"])
    chunked = meta_gradient(model, params, tasks, F.cross_entropy, config, chunk_size=2)
    for name, grad in batched.grads.items():
        torch.testing.assert_close(grad, chunked.grads[name], rtol=1e-9, atol=1e-12)


def test_regression_loss_runs_under_every_algorithm(device):
    model = nn.Sequential(nn.Linear(1, 8), nn.ReLU(), nn.Linear(8, 1)).to(device)
    g = torch.Generator().manual_seed(0)
    tasks = Task(*(torch.randn(2, 5, 1, generator=g).to(device) for _ in range(4)))
    for algorithm in ("imaml", "maml", "fomaml", "reptile"):
        for inner_solver in ("gd", "adam", "hf") if algorithm in ("imaml", "fomaml") else ("gd",):
            config = SolverConfig(algorithm=algorithm, inner_solver=inner_solver, inner_steps=2,
                                 inner_lr=0.01)
            result = meta_gradient(model, dict(model.named_parameters()), tasks, mse_loss, config)
            assert all(torch.isfinite(v).all() for v in result.grads.values())


@pytest.mark.parametrize("kwargs, setting", [({"algorithm": "anil"}, "algorithm"),
                                             ({"inner_solver": "lbfgs"}, "inner_solver"),
                                             ({"algorithm": "maml", "inner_solver": "hf"}, "inner_solver"),
                                             ({"algorithm": "reptile", "inner_solver": "adam"}, "inner_solver"),
                                             ({"reptile_batch_size": 0}, "reptile_batch_size"),
                                             ({"hf_cg_steps": 0}, "hf_cg_steps")])
def test_invalid_algorithm_settings(kwargs, setting):
    from imaml_lightning.errors import SettingError
    with pytest.raises(SettingError, match=setting):
        SolverConfig(**kwargs)


def test_gradient_descent_safeguard_stops_divergence(device):
    """A step size far above 2 / curvature: plain GD would blow up; the safeguard halves it
    until G falls, and never lets G rise above its starting value."""
    model = linear_model(device)
    theta = {k: v.detach() for k, v in model.named_parameters()}
    task = Task(*(t[0] for t in ridge_tasks(tasks=1, device=device)))
    fn = TaskLoss(model, half_mse)
    objective = ProximalObjective(lambda p: fn(p, task.support_x, task.support_y), theta, 1.0)
    start = objective(theta)[0]
    result = INNER_SOLVERS["gd"](objective, theta, steps=60, lr=50.0)
    stable = INNER_SOLVERS["gd"](objective, theta, steps=60, lr=0.3)
    assert torch.isfinite(objective(result.phi)[0])
    assert never_rises(result.objective_trace) and result.rejected_steps > 0
    assert stable.rejected_steps == 0  # a healthy step size never triggers it
    # Half of what a well-chosen step size achieves, despite starting ~100x too large.
    assert start - objective(result.phi)[0] >= 0.5 * (start - objective(stable.phi)[0])


def test_the_query_pass_before_adaptation_can_be_skipped(device):
    torch.manual_seed(0)
    model = ConvNet(5, hidden=16).to(device)
    params, tasks = dict(model.named_parameters()), omniglot_like_tasks(device=device)
    config = SolverConfig(inner_steps=2, cg_steps=2)
    full = meta_gradient(model, params, tasks, F.cross_entropy, config)
    lean = meta_gradient(model, params, tasks, F.cross_entropy, config, diagnose_before=False)
    assert "query_loss_before" in full.diagnostics and "query_loss_before" not in lean.diagnostics
    for name, grad in full.grads.items():
        assert torch.equal(grad, lean.grads[name])
