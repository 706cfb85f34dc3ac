"""Contract: every backend's gradients are the derivatives they promise (docs/design.md §3),
checked against central finite differences of the backend's *own* value (float64), with a
random upstream gradient ``w`` (``∂/∂x Σ_k w_k L_k``) on ragged, masked, weighted batches:

* ``implicit`` (linear objective): exact at the fixed point, balanced and unbalanced;
* ``envelope`` (entropic, divergence): exact at the fixed point (Danskin); for the linear
  objective it is *not* the derivative (checked to differ);
* ``unrolled``: the exact derivative of the iterations run, away from convergence, with early
  stopping and ε-scaling;
* at convergence the three modes agree;
* the weights are constants (no gradient flows to them).

The oracle's own gradients are gradchecked in tests/test_gradients.py; the contract suite
compares every backend's gradients with the oracle's in test_contract_values.py.
"""

from __future__ import annotations

import pytest
import torch

import optical_kernels as ok
from tests.backends.contract import (
    INTERPRETER_WARNINGS,
    SCALE,
    Backend,
    Problem,
    close,
    make_problem,
    solve,
    thin,
)

pytestmark = INTERPRETER_WARNINGS
F64 = torch.float64
#: converged enough for a finite difference with step H: value error ~1e-12, i.e. ~1e-6 relative
#: in the quotient; H small so that no step crosses a kink of the L1 "matrix" cost
CONVERGED = dict(tol=1e-12, max_iter=2000, check_every=5)
H = 1e-6


def _directional(bk: Backend, P: Problem, cost: str, objective: str, grad: str,
                 rho: float | None, seed: int, **kw: object) -> tuple[float, float]:
    """``(⟨∂/∂x Σ w L, D⟩, central difference of Σ w L along D)`` for a random direction D on
    the valid points of x."""
    D = torch.randn(P.x.shape, generator=torch.Generator().manual_seed(seed), dtype=F64)
    D = torch.where(P.x_mask[..., None], D, 0.0)
    r = solve(bk, P, cost, objective, grad, rho, need="x", **kw)
    shifted = []
    for sign in (1.0, -1.0):
        Q = Problem(P.x + sign * H * D, P.y, P.x_mask, P.y_mask, P.a, P.b, P.w)
        shifted.append(solve(bk, Q, cost, objective, grad, rho, need="", **kw)["value"])
    fd = float((P.w * (shifted[0] - shifted[1])).sum()) / (2 * H)
    return float((r["dx"] * D).sum()), fd


def _check(an: float, fd: float, what: str) -> None:
    close(torch.tensor(an), torch.tensor(fd), F64, "fd", what)


_EXACT = [
    ("matrix", "linear", "implicit", None),
    ("matrix", "linear", "implicit", 0.7),
    ("cosine", "linear", "implicit", None),
    ("sqeuclidean", "linear", "implicit", 1.0),
    ("matrix", "entropic", "envelope", None),
    ("sqeuclidean", "entropic", "envelope", 1.0),
    ("dot", "divergence", "envelope", None),
    ("cosine", "divergence", "envelope", 0.5),
]


@pytest.mark.parametrize(("cost", "objective", "grad", "rho"), _EXACT)
def test_fixed_point_gradients_match_finite_differences(
    backend: Backend, cost: str, objective: str, grad: str, rho: float | None
) -> None:
    """implicit (linear) and envelope (entropic, divergence) at convergence are the true
    derivatives, balanced and unbalanced, for every cost."""
    i = _EXACT.index((cost, objective, grad, rho))
    thin(backend, "reduced-grid", i % 2 == 0)
    P = make_problem(B=2, n=6, m=5, d=3, seed=301 + i, scale=SCALE[cost])
    eps = 0.5 if objective == "divergence" else 0.3
    an, fd = _directional(backend, P, cost, objective, grad, rho, seed=311 + i, eps=eps,
                          **CONVERGED)  # fmt: skip
    _check(an, fd, f"{backend.name} {cost} {objective} {grad} rho={rho}")


_UNROLLED = [
    ("matrix", "linear", None, None),
    ("sqeuclidean", "entropic", 1.0, (2.0, 0.5)),
    ("cosine", "linear", 0.5, (1.0, 0.5)),
    ("dot", "divergence", None, None),
]


@pytest.mark.parametrize(("cost", "objective", "rho", "schedule"), _UNROLLED)
def test_unrolled_is_the_derivative_of_the_iterations_run(
    backend: Backend, cost: str, objective: str, rho: float | None, schedule: tuple | None
) -> None:
    """unrolled, far from convergence (7 iterations, ε small), with ε-scaling, and with early
    stopping (``tol`` loose): exactly the derivative of the iterates (the stopping point is
    locally constant)."""
    i = _UNROLLED.index((cost, objective, rho, schedule))
    thin(backend, "reduced-grid", i < 2)
    P = make_problem(B=3, n=6, m=5, d=3, seed=321 + i, scale=SCALE[cost])
    kw = dict(eps=0.1, max_iter=7, tol=0.0, eps_schedule=schedule)
    an, fd = _directional(backend, P, cost, objective, "unrolled", rho, seed=331 + i, **kw)
    _check(an, fd, f"{backend.name} unrolled {cost} {objective} rho={rho}")
    kw = dict(eps=0.3, max_iter=60, tol=1e-3, check_every=2, eps_schedule=schedule)
    r = solve(backend, P, cost, objective, "unrolled", rho, **kw)
    assert (r["n_iters"] < 60).all(), "the solves should stop early"
    an, fd = _directional(backend, P, cost, objective, "unrolled", rho, seed=341 + i, **kw)
    _check(an, fd, f"{backend.name} unrolled, early stop {cost} {objective} rho={rho}")


def test_envelope_is_not_the_derivative_of_the_linear_objective(backend: Backend) -> None:
    """docs/design.md §3: the envelope gradient of ``<P, C>`` ignores ∂P/∂C; it differs from
    the finite difference (and the implicit one does not)."""
    P = make_problem(B=2, n=6, m=5, d=3, seed=351, scale=0.5)
    an, fd = _directional(backend, P, "sqeuclidean", "linear", "envelope", None, seed=352,
                          eps=0.3, **CONVERGED)  # fmt: skip
    assert abs(an - fd) > 1e-3 * abs(fd), (an, fd)
    an, fd = _directional(backend, P, "sqeuclidean", "linear", "implicit", None, seed=352,
                          eps=0.3, **CONVERGED)  # fmt: skip
    _check(an, fd, f"{backend.name} implicit")


@pytest.mark.parametrize("objective", ["linear", "entropic"])
def test_gradient_modes_agree_at_convergence(backend: Backend, objective: str) -> None:
    """Unrolled over many iterations tends to the fixed-point gradient (implicit for linear,
    envelope for entropic)."""
    thin(backend, "reduced-grid", objective == "entropic")
    P = make_problem(B=2, n=5, m=4, d=3, seed=361, scale=0.5)
    fixed = "implicit" if objective == "linear" else "envelope"
    u = solve(backend, P, "sqeuclidean", objective, "unrolled", None, eps=0.5, tol=0.0,
              max_iter=100)  # fmt: skip
    f = solve(backend, P, "sqeuclidean", objective, fixed, None, eps=0.5, tol=0.0, max_iter=100)
    assert (f["err"] < 1e-12).all(), "not at the fixed point"
    close(u["value"], f["value"], F64, "value", "value")
    close(u["dx"], f["dx"], F64, "grad", "dx unrolled vs fixed point")
    close(u["dy"], f["dy"], F64, "grad", "dy unrolled vs fixed point")


def test_weights_get_no_gradient(backend: Backend) -> None:
    """Weights are constants (documented): no gradient flows to a or b, it does to x."""
    P = make_problem(B=2, n=5, m=4, d=3, seed=371).to(backend.device)
    x = P.x.clone().requires_grad_(True)
    a = P.a.clone().requires_grad_(True)
    res = ok.solve_sample(x, P.y, a, P.b, x_mask=P.x_mask, y_mask=P.y_mask, max_iter=20,
                          tol=0.0, backend=backend.name)  # fmt: skip
    res.value.sum().backward()
    assert a.grad is None and x.grad is not None and torch.isfinite(x.grad).all()
