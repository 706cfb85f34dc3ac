"""Gradient modes of the reference: gradcheck (fp64) and finite differences (docs/design.md §3).

Every other backend's gradients are checked against finite differences of its own value in
tests/backends/test_contract_grads.py and against these (the oracle's) in
tests/backends/test_contract_values.py.
"""

from __future__ import annotations

import pytest
import torch

import optical_kernels as ok
from optical_kernels.backends import torch as reference
from optical_kernels.config import SolverConfig

COSTS = ["cosine", "sqeuclidean", "dot"]


def points(seed: int, B: int = 2, n: int = 5, m: int = 4, d: int = 3, masked: bool = True):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, n, d, generator=gen, dtype=torch.float64)
    y = torch.randn(B, m, d, generator=gen, dtype=torch.float64)
    xm = torch.ones(B, n, dtype=torch.bool)
    ym = torch.ones(B, m, dtype=torch.bool)
    if masked:
        xm[-1, n - 2 :] = False
        ym[-1, m - 1 :] = False
    return x, y, xm, ym


def upstream(B: int, seed: int = 0) -> torch.Tensor:
    """A random upstream gradient (not ones)."""
    return torch.rand(B, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + 0.5


@pytest.mark.parametrize("cost", COSTS)
@pytest.mark.parametrize("objective", ["linear", "entropic"])
def test_gradcheck_unrolled_is_exact(cost, objective):
    """Unrolled = exact derivative of the iterations run, including early stopping."""
    x, y, xm, ym = points(1)
    w = upstream(x.shape[0])
    eps = 0.5 if cost == "cosine" else 2.0

    def fn(x, y):
        out = ok.sinkhorn_loss(
            x,
            y,
            x_mask=xm, y_mask=ym,
            cost=cost,
            eps=eps,
            objective=objective,
            grad="unrolled",
            max_iter=7,
            tol=0,
            reduction="none",
            backend="torch",
        )
        return (out * w).sum()

    x.requires_grad_(True)
    y.requires_grad_(True)
    assert torch.autograd.gradcheck(fn, (x, y), atol=1e-8, rtol=1e-6)


def test_gradcheck_unrolled_schedule_unbalanced_early_stop():
    x, y, xm, ym = points(2)
    w = upstream(x.shape[0], 1)

    def fn(x):
        out = ok.sinkhorn_loss(
            x,
            y,
            x_mask=xm, y_mask=ym,
            cost="sqeuclidean",
            eps=1.0,
            rho=3.0,
            eps_schedule=(8.0, 0.5),
            grad="unrolled",
            max_iter=40,
            tol=1e-3,
            check_every=3,
            reduction="none",
            backend="torch",
        )
        return (out * w).sum()

    x.requires_grad_(True)
    assert torch.autograd.gradcheck(fn, (x,), atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("cost", COSTS)
def test_gradcheck_implicit_linear(cost):
    """Implicit is exact at the fixed point: converge fully, then gradcheck."""
    x, y, xm, ym = points(3)
    w = upstream(x.shape[0], 2)
    eps = 0.3 if cost == "cosine" else 1.5

    def fn(x, y):
        out = ok.sinkhorn_loss(
            x,
            y,
            x_mask=xm, y_mask=ym,
            cost=cost,
            eps=eps,
            grad="implicit",
            max_iter=3000,
            tol=1e-14,
            check_every=5,
            reduction="none",
            backend="torch",
        )
        return (out * w).sum()

    x.requires_grad_(True)
    y.requires_grad_(True)
    assert torch.autograd.gradcheck(fn, (x, y), atol=1e-7, rtol=1e-5, fast_mode=True)


@pytest.mark.parametrize("cost", COSTS)
@pytest.mark.parametrize("objective", ["entropic", "divergence"])
def test_gradcheck_envelope_exact_for_entropic(cost, objective):
    x, y, xm, ym = points(4)
    w = upstream(x.shape[0], 3)
    eps = 0.3 if cost == "cosine" else 1.5

    def fn(x, y):
        out = ok.sinkhorn_loss(
            x,
            y,
            x_mask=xm, y_mask=ym,
            cost=cost,
            eps=eps,
            objective=objective,
            grad="envelope",
            max_iter=3000,
            tol=1e-14,
            check_every=5,
            reduction="none",
            backend="torch",
        )
        return (out * w).sum()

    x.requires_grad_(True)
    y.requires_grad_(True)
    assert torch.autograd.gradcheck(fn, (x, y), atol=1e-7, rtol=1e-5, fast_mode=True)


def _fd_check(objective: str, grad: str, rel: float, seed: int = 0, rho: float | None = None):
    """Central finite differences of the value in C along a random direction."""
    gen = torch.Generator().manual_seed(seed)
    B, n, m = 3, 7, 5
    C = torch.rand(B, n, m, generator=gen, dtype=torch.float64)
    D = torch.randn(B, n, m, generator=gen, dtype=torch.float64)
    xm = torch.ones(B, n, dtype=torch.bool)
    xm[1, 5:] = False
    kw = dict(
        rho=rho,
        eps=0.1,
        objective=objective,
        grad=grad,
        max_iter=5000,
        tol=1e-15,
        check_every=5,
        backend="torch",
    )
    C1 = C.clone().requires_grad_(True)
    val = ok.solve(C1, x_mask=xm, **kw).value
    w = upstream(B, 5)
    (G,) = torch.autograd.grad((val * w).sum(), C1)
    h = 1e-6
    with torch.no_grad():
        plus = ok.solve(C + h * D, x_mask=xm, **kw).value
        minus = ok.solve(C - h * D, x_mask=xm, **kw).value
    fd = ((plus - minus) / (2 * h) * w).sum()
    an = (G * D).sum()
    assert abs(float(an - fd)) <= rel * abs(float(fd)), (float(an), float(fd))
    assert float(G[1, 5:].abs().sum()) == 0.0  # padded rows get no gradient


def test_implicit_matches_finite_differences():
    _fd_check("linear", "implicit", rel=1e-6)


def test_unbalanced_implicit_matches_finite_differences():
    _fd_check("linear", "implicit", rel=1e-6, rho=0.7, seed=1)


def test_envelope_is_exact_for_entropic():
    _fd_check("entropic", "envelope", rel=1e-6)


def test_envelope_is_only_approximate_for_linear():
    """docs/design.md §3: the envelope gradient of <P, C> is not the true gradient."""
    with pytest.raises(AssertionError):
        _fd_check("linear", "envelope", rel=1e-3)


def test_backward_modes_agree_at_convergence():
    """Unrolled over many iterations tends to implicit; envelope = implicit for entropic."""
    gen = torch.Generator().manual_seed(9)
    C = torch.rand(2, 6, 6, generator=gen, dtype=torch.float64)
    a = torch.full((2, 6), 1 / 6, dtype=torch.float64)
    cfg_u = SolverConfig(eps=0.2, max_iter=600, tol=0, grad="unrolled")
    cfg_i = SolverConfig(eps=0.2, max_iter=600, tol=0, grad="implicit")
    out_u = reference.forward(C, a, a, cfg_u)
    out_i = reference.forward(C, a, a, cfg_i)
    gv, gvl = torch.zeros(2, dtype=torch.float64), upstream(2)
    G_u = reference.backward(C, a, a, out_u, gv, gvl, cfg_u)
    G_i = reference.backward(C, a, a, out_i, gv, gvl, cfg_i)
    torch.testing.assert_close(G_u, G_i, rtol=1e-7, atol=1e-10)
