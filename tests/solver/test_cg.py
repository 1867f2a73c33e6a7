import torch
from torch.func import vmap

from imaml_lightning.solver import conjugate_gradient


def as_params(x):
    return {"a": x[:3], "b": x[3:].reshape(2, -1)}


def matvec_of(matrix):
    def matvec(v):
        flat = torch.cat([v["a"], v["b"].flatten()])
        return as_params(matrix @ flat)
    return matvec


def random_spd(n, generator, eigenvalues=None):
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    if eigenvalues is None:
        eigenvalues = torch.logspace(0, 1.7, n, dtype=torch.float64)
    return q @ torch.diag(eigenvalues) @ q.T


def test_solves_random_spd_system_to_machine_precision(device):
    g = torch.Generator().manual_seed(0)
    matrix = random_spd(9, g).to(device)
    b = torch.randn(9, generator=g, dtype=torch.float64).to(device)
    result = conjugate_gradient(matvec_of(matrix), as_params(b), steps=30)
    x = torch.cat([result.x["a"], result.x["b"].flatten()])
    exact = torch.linalg.solve(matrix, b)
    assert torch.linalg.norm(x - exact) / torch.linalg.norm(exact) < 1e-10
    assert result.residual_norms.shape == (31,)
    assert result.residual_norms[-1] < 1e-10 * result.residual_norms[0]
    assert not result.negative_curvature
    assert x.device.type == torch.device(device).type


def test_tolerance_stops_early_and_counts_iterations(device):
    g = torch.Generator().manual_seed(1)
    # Three distinct eigenvalues: CG converges in three steps, then must stop.
    eigenvalues = torch.tensor([1.0] * 7 + [10.0, 100.0], dtype=torch.float64)
    matrix = random_spd(9, g, eigenvalues).to(device)
    b = as_params(torch.randn(9, generator=g, dtype=torch.float64).to(device))
    loose = conjugate_gradient(matvec_of(matrix), b, steps=30, tol=1e-8)
    assert loose.iterations == 3
    final = loose.residual_norms[3]
    assert final <= 1e-8 * loose.residual_norms[0] < loose.residual_norms[2]
    assert torch.all(loose.residual_norms[int(loose.iterations):] == final)  # frozen afterwards


def test_negative_curvature_keeps_last_iterate_and_is_flagged(device):
    matrix = torch.diag(torch.tensor([1.0, 2.0, 3.0, -1.0, -2.0], dtype=torch.float64)).to(device)
    b = as_params(torch.ones(5, dtype=torch.float64).to(device))
    result = conjugate_gradient(matvec_of(matrix), b, steps=10)
    assert result.negative_curvature
    assert torch.isfinite(result.x["a"]).all() and torch.isfinite(result.x["b"]).all()
    assert result.iterations < 10


def test_vmap_over_systems_matches_one_at_a_time(device):
    g = torch.Generator().manual_seed(2)
    matrices = torch.stack([random_spd(5, g) for _ in range(4)]).to(device)
    bs = torch.randn(4, 5, generator=g, dtype=torch.float64).to(device)

    def solve(matrix, b):
        result = conjugate_gradient(matvec_of(matrix), as_params(b), steps=3)
        return torch.cat([result.x["a"], result.x["b"].flatten()]), result.residual_norms

    batched, norms = vmap(solve)(matrices, bs)
    for i in range(4):
        single, single_norms = solve(matrices[i], bs[i])
        torch.testing.assert_close(batched[i], single)
        torch.testing.assert_close(norms[i], single_norms)


def test_a_huge_step_along_nearly_zero_curvature_is_not_returned(device):
    """Indefinite A with p^T A p = 3e-6 > 0 on the first step: alpha ~ 2e6 sends x far off and
    the residual up; the iterate with the smallest residual (here x0 = 0) is returned."""
    matrix = torch.diag(torch.tensor([1.0] * 4 + [-4 / 3 + 1e-6] * 3, dtype=torch.float64)).to(device)
    b = as_params(torch.ones(7, dtype=torch.float64).to(device))
    result = conjugate_gradient(matvec_of(matrix), b, steps=1)
    assert result.residual_norms[1] > 1e5 * result.residual_norms[0]
    assert all(v.abs().max() == 0 for v in result.x.values())
