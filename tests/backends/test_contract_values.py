"""Contract: values, potentials, iteration counts and all three gradient modes of every backend
equal the oracle's (``backend="torch"``), for every cost (cosine, sqeuclidean, dot, a given
matrix) × objective (linear, entropic, divergence) × grad (envelope, implicit, unrolled) ×
balanced / unbalanced, in float64, float32, bfloat16 and float16 (same-dtype rule, see
:data:`tests.backends.contract.TOL`), with a random upstream gradient ``w``
(``∂/∂x Σ_k w_k L_k``), ragged masks with interleaved padding, random weights, ε-scaling and
early stopping.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from tests.backends.contract import (
    COSTS,
    GRADS,
    INTERPRETER_WARNINGS,
    MAX_ITER,
    OBJECTIVES,
    ORACLE,
    RHOS,
    SCALE,
    Backend,
    case_id,
    compare,
    covering,
    grid,
    make_problem,
    require,
    solve,
    thin,
)

pytestmark = INTERPRETER_WARNINGS


def _seed(*parts: object) -> int:
    return sum(map(ord, "-".join(map(str, parts))))


# --------------------------------------------------------------------------- float64
@pytest.mark.parametrize("case", grid(), ids=case_id)
def test_matches_oracle_float64(backend: Backend, case: tuple) -> None:
    """Values, potentials, n_iters, err and gradients (random upstream) equal the oracle's on a
    ragged, masked, weighted batch, for every cost × objective × grad × rho, on every backend
    (the Triton interpreter included: ~65 s of the suite)."""
    require(backend, "vs-oracle")
    cost, objective, grad, rho = case
    P = make_problem(seed=_seed(case_id(case)), scale=SCALE[cost])
    got = solve(backend, P, cost, objective, grad, rho)
    want = solve(ORACLE, P, cost, objective, grad, rho)
    assert (want["n_iters"] < MAX_ITER).all(), "oracle did not converge: the case is too hard"
    compare(got, want, P, torch.float64, rho, f"{backend.name} {case_id(case)}")


_SCHEDULE_CASES = [
    ("cosine", "linear", "unrolled", None),
    ("sqeuclidean", "entropic", "implicit", 1.0),
    ("dot", "divergence", "envelope", None),
    ("matrix", "linear", "implicit", 0.5),
    ("matrix", "entropic", "unrolled", 1.0),
]


@pytest.mark.parametrize("case", _SCHEDULE_CASES, ids=case_id)
def test_eps_schedule_and_check_every(backend: Backend, case: tuple) -> None:
    """ε-scaling (``eps_schedule=(start, factor)``) and a ``check_every`` that does not divide
    the iteration count: every output equals the oracle's, including where each problem
    stopped."""
    require(backend, "vs-oracle")
    thin(backend, "reduced-grid", _SCHEDULE_CASES.index(case) % 2 == 0)
    cost, objective, grad, rho = case
    P = make_problem(B=3, n=9, m=6, seed=_seed("sched", case_id(case)), scale=SCALE[cost])
    kw = dict(eps_schedule=(2.0, 0.5), check_every=3, tol=1e-7)
    got = solve(backend, P, cost, objective, grad, rho, **kw)
    want = solve(ORACLE, P, cost, objective, grad, rho, **kw)
    assert (want["n_iters"] % 3 == 0).all() and (want["n_iters"] < MAX_ITER).all()
    compare(got, want, P, torch.float64, rho, f"{backend.name} schedule {case_id(case)}")


def test_converged_stopping(backend: Backend) -> None:
    """With a loose ``tol`` the problems of a batch stop at different checks: ``n_iters`` (a
    multiple of ``check_every``) and ``err`` equal the oracle's, balanced and unbalanced."""
    require(backend, "vs-oracle")
    for rho in RHOS:
        P = make_problem(B=3, n=9, m=6, seed=5, scale=0.5)
        got = solve(backend, P, "sqeuclidean", "entropic", "envelope", rho, tol=1e-4)
        want = solve(ORACLE, P, "sqeuclidean", "entropic", "envelope", rho, tol=1e-4)
        assert (want["n_iters"] % 10 == 0).all()
        compare(got, want, P, torch.float64, rho, f"{backend.name} tol=1e-4 rho={rho}")


def test_fixed_iterations_unconverged(backend: Backend) -> None:
    """``tol=0`` and few iterations (far from convergence): every gradient mode is still the
    oracle's function of the iterations run (unrolled differentiates them exactly; implicit and
    envelope use the last potentials), so they are compared too."""
    require(backend, "vs-oracle")
    P = make_problem(B=2, n=6, m=5, seed=81, scale=0.5)
    for grad, rho in zip(GRADS, (None, 1.0, None)):
        got = solve(backend, P, "sqeuclidean", "linear", grad, rho, eps=0.05, tol=0.0, max_iter=7)
        want = solve(ORACLE, P, "sqeuclidean", "linear", grad, rho, eps=0.05, tol=0.0, max_iter=7)
        assert (want["n_iters"] == 7).all() and (want["err"] > 1e-3).any()
        compare(got, want, P, torch.float64, rho, f"{backend.name} 7 iterations {grad}")


# --------------------------------------------------------------------------- float32
def _fp32_cases() -> list[tuple]:
    """Every cost × objective × rho; the grad mode rotates so that each occurs with each cost
    and each objective."""
    return [
        (c, o, GRADS[(i + j + k) % 3], r)
        for (i, c), (j, o), (k, r) in itertools.product(
            enumerate(COSTS), enumerate(OBJECTIVES), enumerate(RHOS))
        if not (c == "matrix" and o == "divergence")
    ]


@pytest.mark.parametrize("case", _fp32_cases(), ids=case_id)
def test_matches_oracle_float32(backend: Backend, case: tuple) -> None:
    """float32 points: every output (potentials included) equals the float32 oracle's on the
    same inputs, :data:`TOL` for float32. A fixed iteration count (``tol=0``): in float32 the
    marginal error of a converged solve is at rounding level, so where a ``tol`` check stops
    may legitimately differ by one check between two implementations (early stopping is
    compared exactly in float64)."""
    require(backend, "vs-oracle")
    thin(backend, "thirds-grid", _fp32_cases().index(case) % 3 == 0)
    cost, objective, grad, rho = case
    P = make_problem(seed=_seed("f32", case_id(case)), scale=SCALE[cost])
    kw = dict(dtype=torch.float32, tol=0.0, max_iter=40)
    got = solve(backend, P, cost, objective, grad, rho, **kw)
    want = solve(ORACLE, P, cost, objective, grad, rho, **kw)
    assert got["dx"].dtype == torch.float32 and got["value"].dtype == torch.float32
    compare(got, want, P, torch.float32, rho, f"{backend.name} {case_id(case)} float32")


# --------------------------------------------------------------------------- half precision
_LOW = [
    (dtype, case)
    for dtype in (torch.bfloat16, torch.float16)
    for case in covering()
    if dtype == torch.bfloat16 or covering().index(case) % 3 == 0
]


@pytest.mark.parametrize(("dtype", "case"), _LOW,
                         ids=[f"{str(d)[6:]}-{case_id(c)}" for d, c in _LOW])
def test_matches_oracle_half_precision(backend: Backend, dtype: torch.dtype,
                                       case: tuple) -> None:
    """bfloat16 (a covering subset of the grid) and float16 points (a third of it), through
    ``sinkhorn_loss(reduction="none")``: the oracle runs on the same rounded inputs; gradients
    come back in the input dtype; :data:`TOL` for that dtype."""
    require(backend, "vs-oracle")
    thin(backend, "thirds-grid", _LOW.index((dtype, case)) % 3 == 0)
    cost, objective, grad, rho = case
    P = make_problem(seed=_seed("low", dtype, case_id(case)), scale=SCALE[cost])
    got = solve(backend, P, cost, objective, grad, rho, dtype=dtype, api="loss")
    want = solve(ORACLE, P, cost, objective, grad, rho, dtype=dtype, api="loss")
    assert got["dx"].dtype == dtype and got["dy"].dtype == dtype
    compare(got, want, P, dtype, rho, f"{backend.name} {case_id(case)} {dtype}")


# --------------------------------------------------------------------------- one side
@pytest.mark.parametrize("need", ["x", "y"])
@pytest.mark.parametrize("grad", GRADS)
def test_gradient_of_one_side(backend: Backend, grad: str, need: str) -> None:
    """Only x (or only y) requires grad: the fused backward skips the other side, and the
    gradient it returns equals the oracle's."""
    require(backend, "vs-oracle")
    thin(backend, "reduced-grid", (GRADS.index(grad) + (need == "y")) % 2 == 0)
    P = make_problem(B=3, n=7, m=6, seed=_seed("side", grad, need))
    got = solve(backend, P, "cosine", "entropic", grad, None, need=need)
    want = solve(ORACLE, P, "cosine", "entropic", grad, None, need=need)
    assert set(got) >= {f"d{need}"} and f"d{'y' if need == 'x' else 'x'}" not in got
    compare(got, want, P, torch.float64, None, f"{backend.name} d{need} only, {grad}")


@pytest.mark.parametrize("cost", ["cosine", "matrix"])
def test_default_uniform_weights(backend: Backend, cost: str) -> None:
    """No weights passed: the uniform default over the valid points, as the oracle's."""
    require(backend, "vs-oracle")
    P = make_problem(B=3, n=8, m=5, seed=_seed("uniform", cost), scale=SCALE[cost])
    got = solve(backend, P, cost, "linear", "implicit", None, uniform=True)
    want = solve(ORACLE, P, cost, "linear", "implicit", None, uniform=True)
    compare(got, want, P, torch.float64, None, f"{backend.name} uniform weights {cost}")
