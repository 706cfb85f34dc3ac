"""Contract: the solver's invariances, symmetries and limits hold on every backend (float64).

Each backend is checked against *itself* (a property cannot depend on the oracle being right)
and, where a closed form exists, against that:

* permutation equivariance of the points; padding invariance (garbage rows, front or back);
* transpose symmetry ``solve(C, a, b) ↔ solve(Cᵀ, b, a)``; swapping the point sets;
  ``D(x, y) = D(y, x)``, ``D(x, x) = 0``;
* cost shift ``C + t`` (balanced): values shift by ``t``, plan, iterations and ``∂/∂C`` stay;
* batch independence, also when the problems of a batch stop at different iterations;
* a zero weight is a mask; strong duality at convergence; ``ρ → ∞`` tends to the balanced
  problem; the plan has the prescribed marginals;
* limits: ε → 0 (the assignment), ε → ∞ (``Σ a_i b_j C_ij``).

The same properties are checked on the oracle alone, with hypothesis, in tests/test_properties.py.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from optical_kernels.costs import cost_matrix
from tests.backends.contract import (
    INTERPRETER_WARNINGS,
    SCALE,
    Backend,
    Problem,
    close,
    make_problem,
    solve,
    solve_dense,
    thin,
)
from tests.helpers import pad_cost, pad_points, pad_weights, random_cost, random_problem
from tests.helpers import random_weights as weights

pytestmark = INTERPRETER_WARNINGS
F64 = torch.float64
#: converged solves (the symmetric properties hold at the fixed point only)
CONVERGED = dict(tol=1e-11, max_iter=2000, check_every=5)
#: (objective, grad) pairs that exercise the three distinct backward passes
MODES = [("entropic", "envelope"), ("linear", "implicit"), ("linear", "unrolled")]


def grad_of(mode: tuple[str, str]) -> str:
    return mode[1]


def _mode_id(mode: tuple[str, str]) -> str:
    return "-".join(mode)


def _dense(B: int, n: int, m: int, seed: int) -> tuple[torch.Tensor, ...]:
    """A random cost, ragged masks and random weights (garbage at masked positions)."""
    C = random_cost(B, n, m, seed=seed)
    _, _, xm, ym = random_problem(B, n, m, 1, seed=seed + 1)
    return C, weights(xm, seed + 2), weights(ym, seed + 3), xm, ym


def gauge_free(u: torch.Tensor, v: torch.Tensor, valid: torch.Tensor, what: str) -> None:
    """``u − v`` is one constant over the valid entries of each problem (potentials of a
    balanced problem are defined up to ``f + t, g − t``)."""
    diff = torch.where(valid, u - v, 0.0)
    for k in range(u.shape[0]):
        if valid[k].any():
            dk = diff[k][valid[k]]
            close(dk, torch.full_like(dk, dk[0].item()), F64, "property", f"{what} [{k}]")


def _permuted(P: Problem, seed: int) -> tuple[Problem, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    pi = torch.randperm(P.x.shape[1], generator=gen)
    sigma = torch.randperm(P.y.shape[1], generator=gen)
    Q = Problem(P.x[:, pi], P.y[:, sigma], P.x_mask[:, pi], P.y_mask[:, sigma], P.a[:, pi],
                P.b[:, sigma], P.w)  # fmt: skip
    return Q, pi, sigma


@pytest.mark.parametrize(
    "cost, objective, grad, rho",
    [("cosine", "linear", "implicit", None), ("sqeuclidean", "divergence", "unrolled", 1.0)],
)
def test_permutation_invariance(backend: Backend, cost: str, objective: str, grad: str,
                                rho: float | None) -> None:
    """Permuting the points of x and of y (with their masks and weights) permutes the
    potentials and gradients and leaves the values unchanged."""
    P = make_problem(B=2, n=8, m=6, seed=11, scale=SCALE[cost])
    Q, pi, sigma = _permuted(P, seed=12)
    r = solve(backend, P, cost, objective, grad, rho)
    s = solve(backend, Q, cost, objective, grad, rho)
    dt = torch.float64
    close(s["value"], r["value"], dt, "value", "value")
    close(s["value_linear"], r["value_linear"], dt, "value", "value_linear")
    close(s["dx"], r["dx"][:, pi], dt, "grad", "dx")
    close(s["dy"], r["dy"][:, sigma], dt, "grad", "dy")
    close(s["f"], r["f"][:, pi], dt, "potential", "f")
    close(s["g"], r["g"][:, sigma], dt, "potential", "g")


def test_divergence_symmetry(backend: Backend) -> None:
    """``D(x, y) = D(y, x)`` and ``D(x, x) = 0`` (balanced)."""
    P = make_problem(B=2, n=7, m=5, seed=21, scale=0.5)
    swapped = Problem(P.y, P.x, P.y_mask, P.x_mask, P.b, P.a, P.w)
    same = Problem(P.x, P.x, P.x_mask, P.x_mask, P.a, P.a, P.w)
    r = solve(backend, P, "sqeuclidean", "divergence", "envelope", None)
    s = solve(backend, swapped, "sqeuclidean", "divergence", "envelope", None)
    z = solve(backend, same, "sqeuclidean", "divergence", "envelope", None)
    dt = torch.float64
    close(s["value"], r["value"], dt, "value", "D(y, x) vs D(x, y)")
    close(s["dx"], r["dy"], dt, "grad", "dD(y, x)/dy vs dD(x, y)/dx")
    assert (r["value"].abs() > 1e-3).all(), "the problems are degenerate"
    close(z["value"], torch.zeros_like(z["value"]), dt, "value", "D(x, x)")


def _assignment(C: torch.Tensor) -> float:
    """Exact OT between uniform measures of equal size n: min over permutations (n ≤ 6)."""
    n = C.shape[0]
    return min(sum(C[i, p[i]].item() for i in range(n)) for p in
               itertools.permutations(range(n))) / n  # fmt: skip


def test_small_eps_limit(backend: Backend) -> None:
    """ε → 0: ``<P, C>`` tends to the exact (assignment) OT cost; reached through ε-scaling."""
    P = make_problem(B=2, n=5, m=5, d=3, seed=31, ragged=False)
    P.a.fill_(1.0)
    P.b.fill_(1.0)
    eps = 1e-3
    r = solve(backend, P, "cosine", "linear", "envelope", None, eps=eps, tol=1e-6,
              eps_schedule=(1.0, 0.7))  # fmt: skip
    C = cost_matrix(P.x, P.y, "cosine", P.x_mask, P.y_mask)
    exact = torch.tensor([_assignment(C[k]) for k in range(C.shape[0])], dtype=torch.float64)
    close(r["value_linear"], exact, torch.float64, "limit", "<P, C> vs assignment")
    assert (r["value_linear"] >= exact - 1e-9).all(), "below the exact OT cost"


def test_large_eps_limit(backend: Backend) -> None:
    """ε → ∞: ``P → a⊗b``, so ``<P, C> → Σ a_i b_j C_ij`` (error O(1/ε))."""
    P = make_problem(B=2, n=6, m=4, seed=41)
    r = solve(backend, P, "cosine", "linear", "envelope", None, eps=1e3, max_iter=20)
    va, vb = P.x_mask, P.y_mask
    a = torch.where(va, P.a, 0.0)
    b = torch.where(vb, P.b, 0.0)
    a, b = a / a.sum(1, keepdim=True), b / b.sum(1, keepdim=True)
    C = cost_matrix(P.x, P.y, "cosine", va, vb)
    C = torch.where(va[:, :, None] & vb[:, None, :], C, 0.0)
    indep = torch.einsum("bi,bj,bij->b", a, b, C)
    close(r["value_linear"], indep, torch.float64, "limit", "<P, C> vs <a⊗b, C>")


# --------------------------------------------------------------------------- edge cases


# --------------------------------------------------------------------------- symmetry
@pytest.mark.parametrize("mode", MODES, ids=_mode_id)
def test_transpose_symmetry(backend: Backend, mode: tuple[str, str]) -> None:
    """``solve(C, a, b)`` and ``solve(Cᵀ, b, a)``: the same values and plan (transposed), the
    potentials swapped up to the gauge, ``∂/∂C`` transposed."""
    thin(backend, "reduced-grid", grad_of(mode) != "unrolled")
    objective, grad = mode
    C, a, b, xm, ym = _dense(3, 6, 4, seed=201 + MODES.index(mode))
    kw = dict(eps=0.2, objective=objective, grad=grad, **CONVERGED)
    if grad == "unrolled":
        kw.update(tol=0.0, max_iter=150)  # long enough to be at the fixed point
    r1 = solve_dense(backend, C, a, b, xm, ym, **kw)
    r2 = solve_dense(backend, C.transpose(1, 2), b, a, ym, xm, **kw)
    assert r1["converged"].all() or grad == "unrolled"
    close(r2["value"], r1["value"], F64, "property", "value")
    close(r2["value_linear"], r1["value_linear"], F64, "property", "value_linear")
    close(r2["P"].transpose(1, 2), r1["P"], F64, "property", "plan")
    gauge_free(r1["f"], r2["g"], xm, "f vs g of the transpose")
    gauge_free(r1["g"], r2["f"], ym, "g vs f of the transpose")
    close(r2["dC"].transpose(1, 2), r1["dC"], F64, "property", "dC")


@pytest.mark.parametrize("cost", ["cosine", "sqeuclidean", "dot"])
def test_swap_point_sets(backend: Backend, cost: str) -> None:
    """Every built-in cost is symmetric: swapping x and y transposes the problem."""
    P = make_problem(B=2, n=6, m=4, seed=211, scale=SCALE[cost])
    Q = Problem(P.y, P.x, P.y_mask, P.x_mask, P.b, P.a, P.w)
    kw = dict(eps=0.3, tol=1e-11, max_iter=2000, check_every=5)
    r = solve(backend, P, cost, "entropic", "envelope", None, **kw)
    s = solve(backend, Q, cost, "entropic", "envelope", None, **kw)
    close(s["value"], r["value"], F64, "property", "value")
    close(s["dx"], r["dy"], F64, "grad", "d/dy of the swap vs d/dx")
    close(s["dy"], r["dx"], F64, "grad", "d/dx of the swap vs d/dy")


# --------------------------------------------------------------------------- padding
_PAD_CASES = [
    ("cosine", "linear", "implicit", False, 0.0),
    ("sqeuclidean", "entropic", "unrolled", True, 1e-6),
    ("dot", "divergence", "envelope", False, 1e-6),
    ("sqeuclidean", "linear", "unrolled", False, 0.0),
]


@pytest.mark.parametrize(("cost", "objective", "grad", "front", "tol"), _PAD_CASES)
def test_padding_invariance_sample(backend: Backend, cost: str, objective: str, grad: str,
                                   front: bool, tol: float) -> None:
    """Extra masked rows of garbage (appended or prepended) change no result: values,
    potentials, n_iters, err and gradients are those of the unpadded batch; padded rows get
    0 potentials and 0 gradient."""
    thin(backend, "reduced-grid", _PAD_CASES.index((cost, objective, grad, front, tol)) < 2)
    P = make_problem(B=3, n=5, m=4, seed=221, scale=SCALE[cost], empty_rows=(2,))
    xp, xmp = pad_points(P.x, P.x_mask, 3, 222, front)
    yp, ymp = pad_points(P.y, P.y_mask, 2, 223, front)
    Q = Problem(xp, yp, xmp, ymp, pad_weights(P.a, 3, front), pad_weights(P.b, 2, front), P.w)
    kw = dict(eps=0.2, tol=tol, max_iter=40, check_every=4)
    r = solve(backend, P, cost, objective, grad, None, **kw)
    s = solve(backend, Q, cost, objective, grad, None, **kw)
    vx = slice(3, None) if front else slice(0, 5)
    vy = slice(2, None) if front else slice(0, 4)
    close(s["value"], r["value"], F64, "property", "value")
    close(s["value_linear"], r["value_linear"], F64, "property", "value_linear")
    close(s["err"], r["err"], F64, "err", "err")
    close(s["f"][:, vx], r["f"], F64, "property", "f")
    close(s["g"][:, vy], r["g"], F64, "property", "g")
    assert torch.equal(s["n_iters"], r["n_iters"]) and torch.equal(s["empty"], r["empty"])
    close(s["dx"][:, vx], r["dx"], F64, "grad", "dx")
    close(s["dy"][:, vy], r["dy"], F64, "grad", "dy")
    assert (s["dx"][~xmp] == 0).all() and (s["dy"][~ymp] == 0).all()
    assert (s["f"][~xmp] == 0).all() and (s["g"][~ymp] == 0).all()


@pytest.mark.parametrize("mode", MODES, ids=_mode_id)
def test_padding_invariance_dense(backend: Backend, mode: tuple[str, str]) -> None:
    """Garbage rows/columns of a given C behind the masks change nothing; they get 0 in ∂/∂C."""
    thin(backend, "reduced-grid", MODES.index(mode) != 0)
    objective, grad = mode
    C, a, b, xm, ym = _dense(3, 5, 4, seed=231)
    Cp = pad_cost(C, 2, 3, 232)
    xmp = torch.cat([xm, torch.zeros(3, 2, dtype=torch.bool)], 1)
    ymp = torch.cat([ym, torch.zeros(3, 3, dtype=torch.bool)], 1)
    kw = dict(eps=0.1, objective=objective, grad=grad, tol=1e-7, max_iter=60, check_every=3)
    r = solve_dense(backend, C, a, b, xm, ym, **kw)
    s = solve_dense(backend, Cp, pad_weights(a, 2), pad_weights(b, 3), xmp, ymp, **kw)
    close(s["value"], r["value"], F64, "property", "value")
    close(s["f"][:, :5], r["f"], F64, "property", "f")
    close(s["g"][:, :4], r["g"], F64, "property", "g")
    assert torch.equal(s["n_iters"], r["n_iters"])
    close(s["dC"][:, :5, :4], r["dC"], F64, "grad", "dC")
    assert (s["dC"][:, 5:] == 0).all() and (s["dC"][:, :, 4:] == 0).all()


def test_zero_weight_equals_masked(backend: Backend) -> None:
    """A zero weight is a mask: the point is excluded everywhere (0 potential, 0 gradient)."""
    P = make_problem(B=2, n=6, m=5, seed=241, ragged=False)
    P.a[:, 2] = 0.0
    keep = torch.tensor([0, 1, 3, 4, 5])
    Q = Problem(P.x[:, keep], P.y, P.x_mask[:, keep], P.y_mask, P.a[:, keep], P.b, P.w)
    kw = dict(tol=0.0, max_iter=20)
    r = solve(backend, P, "cosine", "linear", "implicit", None, **kw)
    s = solve(backend, Q, "cosine", "linear", "implicit", None, **kw)
    close(r["value"], s["value"], F64, "property", "value")
    close(r["f"][:, keep], s["f"], F64, "property", "f")
    close(r["dx"][:, keep], s["dx"], F64, "grad", "dx")
    assert (r["f"][:, 2] == 0).all() and (r["dx"][:, 2] == 0).all()


# --------------------------------------------------------------------------- cost shift
@pytest.mark.parametrize("mode", MODES, ids=_mode_id)
def test_cost_shift(backend: Backend, mode: tuple[str, str]) -> None:
    """Balanced: ``C + t`` shifts ``OT_ε`` and ``<P, C>`` by ``t`` and leaves the plan, the
    iteration count and ``∂/∂C`` unchanged (early stopping included)."""
    thin(backend, "reduced-grid", MODES.index(mode) != 1)
    objective, grad = mode
    C, a, b, xm, ym = _dense(3, 5, 6, seed=251)
    shift = 7.5
    kw = dict(eps=0.3, objective=objective, grad=grad, tol=1e-6, max_iter=60, check_every=3)
    r = solve_dense(backend, C, a, b, xm, ym, **kw)
    s = solve_dense(backend, C + shift, a, b, xm, ym, **kw)
    close(s["value"], r["value"] + shift, F64, "property", "value")
    close(s["value_linear"], r["value_linear"] + shift, F64, "property", "value_linear")
    close(s["P"], r["P"], F64, "property", "plan")
    assert torch.equal(s["n_iters"], r["n_iters"])
    close(s["dC"], r["dC"], F64, "grad", "dC")


# --------------------------------------------------------------------------- batch
@pytest.mark.parametrize(("cost", "objective", "grad"),
                         [("cosine", "divergence", "unrolled"), ("dot", "linear", "implicit")])
def test_batch_independence(backend: Backend, cost: str, objective: str, grad: str) -> None:
    """A problem's results do not depend on the other problems of its batch (early stopping
    included: each problem stops on its own)."""
    thin(backend, "reduced-grid", grad != "unrolled")
    P = make_problem(B=3, n=6, m=5, seed=261, scale=SCALE[cost], empty_rows=(2,))
    kw = dict(eps=0.2, tol=1e-6, max_iter=60, check_every=3)
    rb = solve(backend, P, cost, objective, grad, None, **kw)
    for k in range(3):
        sl = slice(k, k + 1)
        Pk = Problem(P.x[sl], P.y[sl], P.x_mask[sl], P.y_mask[sl], P.a[sl], P.b[sl], P.w[sl])
        rk = solve(backend, Pk, cost, objective, grad, None, **kw)
        assert rk["n_iters"].item() == rb["n_iters"][k].item()
        for key in ("value", "f", "g"):
            close(rk[key][0], rb[key][k], F64, "property", f"{key}[{k}]")
        for key in ("dx", "dy"):
            close(rk[key][0], rb[key][k], F64, "grad", f"{key}[{k}]")


def test_batch_independence_different_stopping_times(backend: Backend) -> None:
    """Problems that stop at very different iterations in one batch (unrolled: the reverse pass
    must replay each problem's own iterations only)."""
    C = random_cost(3, 5, 4, seed=271)
    C = C / torch.tensor([1.0, 0.3, 5.0], dtype=F64)[:, None, None]  # 22, 108, 8 iterations
    w = torch.tensor([0.7, -1.3, 2.0], dtype=F64)
    kw = dict(eps=0.1, tol=1e-8, max_iter=200, check_every=2, grad="unrolled")
    rb = solve_dense(backend, C, None, None, w=w, **kw)
    assert len(set(rb["n_iters"].tolist())) > 1, rb["n_iters"]
    for k in range(3):
        rk = solve_dense(backend, C[k : k + 1], None, None, w=w[k : k + 1], **kw)
        assert rk["n_iters"].item() == rb["n_iters"][k].item()
        close(rk["value"][0], rb["value"][k], F64, "property", f"value[{k}]")
        close(rk["dC"][0], rb["dC"][k], F64, "grad", f"dC[{k}]")


# --------------------------------------------------------------------------- duality, rho
@pytest.mark.parametrize("rho", [None, 1.0])
def test_duality_and_marginals_at_convergence(backend: Backend, rho: float | None) -> None:
    """Balanced: ``OT_ε = <a, f> + <b, g>`` at the fixed point and the plan has the marginals
    (a, b), ``err = ‖P1 − a‖₁``; balanced or not, the plan is ≥ 0 and 0 at padding."""
    C, a, b, xm, ym = _dense(3, 6, 5, seed=281)
    r = solve_dense(backend, C, a, b, xm, ym, eps=0.2, rho=rho, objective="entropic",
                    **CONVERGED)  # fmt: skip
    assert r["converged"].all()
    an, bn = torch.where(xm, a, 0.0), torch.where(ym, b, 0.0)
    P = r["P"]
    assert (P >= 0).all() and (P[~xm] == 0).all() and (P.transpose(1, 2)[~ym] == 0).all()
    if rho is None:
        an, bn = an / an.sum(1, keepdim=True), bn / bn.sum(1, keepdim=True)
        dual = (an * r["f"]).sum(1) + (bn * r["g"]).sum(1)
        close(r["value"], dual, F64, "property", "primal vs dual")
        close(P.sum(1), bn, F64, "property", "column marginal")
        close(P.sum(2), an, F64, "property", "row marginal")
        close((P.sum(2) - an).abs().sum(1), r["err"], F64, "property", "err = |P1 - a|_1")


def test_large_rho_approaches_balanced(backend: Backend) -> None:
    """``ρ → ∞``: the unbalanced value tends to the balanced one (error O(ε/ρ)). The same
    iteration count on both sides (at ``ρ = 10³`` the unbalanced map contracts too slowly to
    reach a tight ``tol``)."""
    C, _, _, xm, ym = _dense(2, 5, 4, seed=291)
    kw = dict(eps=0.3, tol=0.0, max_iter=100, objective="entropic")
    bal = solve_dense(backend, C, None, None, xm, ym, **kw)
    unb = solve_dense(backend, C, None, None, xm, ym, rho=1e3, grad="envelope", **kw)
    close(unb["value"], bal["value"], F64, "limit", "rho = 1e3 vs balanced")
    assert (unb["value"] - bal["value"]).abs().max() < 1e-3
