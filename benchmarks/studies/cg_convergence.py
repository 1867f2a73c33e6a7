"""Relative error of the implicit meta-gradient against the number of CG steps (the paper's Figure 2a).

After 1..20 CG steps, against an exact solve of (I + H/lambda) x = grad L(phi; Q) with the full
Hessian, on a small network (the sinusoid MLP's 1-40-40-1 shape, 1,761 parameters, float64) on a
sinusoid task.

The inner problem is solved to high accuracy first (Hessian-free Newton), so (I + H/lambda) is
positive definite and the error should fall geometrically, at a rate set by its condition number.
The MLP uses tanh here: with ReLU the loss is only piecewise smooth, the inner gradient does not
vanish at the kinks, and no iterate is a true minimizer to compare against. The results:
docs/studies/cg_convergence.md.

Usage: python -m benchmarks.studies.cg_convergence [--plot benchmarks/results/cg_convergence.png]
"""
import argparse

import torch
from torch.func import hessian

from benchmarks.common import machine, markdown_table, save_line_plot
from imaml_lightning.data.episodes import task_generator
from imaml_lightning.data.sinusoid import SinusoidTasks
from imaml_lightning.solver import SolverConfig, Task, conjugate_gradient, hessian_vector_product, mse_loss
from imaml_lightning.solver.algorithms import adapt
from imaml_lightning.solver.objective import TaskLoss

LAMBDAS, MAX_CG = (0.5, 2.0, 8.0), 20


def flat(params):
    return torch.cat([p.flatten() for p in params.values()])


def cg_errors(fn, theta, task, lam):
    """Relative error of CG's meta-gradient after 1..MAX_CG steps, the condition number of
    I + H/lam at the inner minimizer, and the final inner gradient norm."""
    # Hessian-free Newton to a true minimizer of G, where H + lam I is positive semi-definite.
    inner = SolverConfig(lam=lam, inner_solver="hf", inner_steps=100, inner_lr=1.0, hf_cg_steps=50)
    phi, info = adapt(fn, theta, task, inner)
    support = lambda p: fn(p, task.support_x, task.support_y)[0]  # noqa: E731
    query_grad = torch.func.grad(lambda p: fn(p, task.query_x, task.query_y)[0])(phi)

    names, shapes = list(phi), [p.shape for p in phi.values()]
    sizes = [p.numel() for p in phi.values()]
    unflatten = lambda v: {n: c.reshape(s) for n, c, s in zip(names, v.split(sizes), shapes)}  # noqa: E731
    H = hessian(lambda v: support(unflatten(v)))(flat(phi))
    A = torch.eye(len(H), dtype=H.dtype) + H / lam
    exact = torch.linalg.solve(A, flat(query_grad))
    eigenvalues = torch.linalg.eigvalsh(A)

    def system(v):
        return {k: v[k] + hvp[k] / lam for hvp in [hessian_vector_product(support, phi, v)] for k in v}

    errors = []
    for steps in range(1, MAX_CG + 1):
        x = flat(conjugate_gradient(system, query_grad, steps).x)
        errors.append((torch.linalg.norm(x - exact) / torch.linalg.norm(exact)).item())
    return errors, (eigenvalues.max() / eigenvalues.min()).item(), info["inner_grad_norm"].item()


def main(plot):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(1, 40), torch.nn.Tanh(), torch.nn.Linear(40, 40),
                              torch.nn.Tanh(), torch.nn.Linear(40, 1)).double()
    theta = {k: v.detach() for k, v in net.named_parameters()}
    sampler = SinusoidTasks(10, 10, (0.1, 5.0), (0.0, 3.1416), (-5.0, 5.0))
    task = Task(*(t.double() for t in sampler("train", task_generator(0, "train", 0))))
    fn = TaskLoss(net, mse_loss)
    results = {lam: cg_errors(fn, theta, task, lam) for lam in LAMBDAS}

    print(machine())
    print(f"tanh MLP 1-40-40-1 ({sum(p.numel() for p in theta.values())} parameters), one "
          f"10-shot sinusoid task, float64\n")
    print(markdown_table(["lambda", "inner grad norm", "condition number of I + H/lambda"],
                         [[lam, f"{g:.1e}", f"{k:.0f}"] for lam, (_, k, g) in results.items()]))
    print()
    print(markdown_table(["CG steps", *(f"error, lambda={lam}" for lam in LAMBDAS)],
                         [[s, *(f"{results[lam][0][s - 1]:.2e}" for lam in LAMBDAS)]
                          for s in range(1, MAX_CG + 1)]))
    if plot:
        save_line_plot(plot, range(1, MAX_CG + 1),
                       {f"lambda={lam}": results[lam][0] for lam in LAMBDAS}, "CG steps",
                       "relative error vs exact solve", "implicit meta-gradient (tanh MLP)",
                       log_y=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--plot", default="benchmarks/results/cg_convergence.png")
    main(parser.parse_args().plot)
