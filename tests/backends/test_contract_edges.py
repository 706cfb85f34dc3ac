"""Contract: edge cases on every backend. Empty problems (no x point, no y point, neither),
fully masked batches, zero sizes and B = 0 give value 0 and gradient 0, never NaN; n or m = 1
and odd sizes 1/7/33/127 with ragged masks equal the oracle; one-point sides have the closed
form ``P = a⊗b``; unbatched, strided and expanded inputs; extreme ε and scales stay finite;
far-from-origin points (centring) in float32.
"""

from __future__ import annotations

import pytest
import torch

import optical_kernels as ok
from tests.backends.contract import (
    GRADS,
    INTERPRETER_WARNINGS,
    OBJECTIVES,
    ORACLE,
    RHOS,
    SCALE,
    Backend,
    Problem,
    close,
    compare,
    known_bug,
    make_problem,
    require,
    solve,
    solve_dense,
    thin,
)
from tests.helpers import random_cost, random_problem, random_weights

pytestmark = INTERPRETER_WARNINGS
F64 = torch.float64


def _assert_zero(res: dict, what: str) -> None:
    """value (and, where returned, value_linear, err, potentials) and both gradients are 0."""
    for key in ("value", "dx", "dy", "value_linear", "err", "f", "g"):
        if key not in res:
            continue
        assert torch.isfinite(res[key].double()).all(), f"{what}: {key} has NaN/Inf"
        assert (res[key] == 0).all(), f"{what}: {key} is not 0: {res[key]}"


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("grad", GRADS)
def test_fully_masked_batch(backend: Backend, grad: str, objective: str) -> None:
    """Every problem of the batch fully masked (both sides, or x only), points or a given C,
    float64 or float32: value, value_linear, err, potentials and gradients 0, no NaN."""
    thin(backend, "thirds-grid", (GRADS.index(grad) + OBJECTIVES.index(objective)) % 3 == 0)
    dtype = torch.float32 if (GRADS.index(grad) + OBJECTIVES.index(objective)) % 2 else F64
    P = make_problem(B=2, n=5, m=4, seed=51)
    P.x_mask[:] = False
    P.y_mask[0] = False  # problem 0: neither side has a point; problem 1: no x point
    res = solve(backend, P, "cosine", objective, grad, None, dtype=dtype)
    _assert_zero(res, f"{backend.name} all masked")
    assert res["empty"].all() and (res["n_iters"] == 0).all() and (res["err"] == 0).all()
    if objective != "divergence":  # the same batch as a given cost
        C = random_cost(2, 5, 4, seed=52).to(dtype)
        r = solve_dense(backend, C, P.a.to(dtype), None, P.x_mask, P.y_mask, objective=objective,
                        grad=grad, max_iter=20, tol=0.0)  # fmt: skip
        _assert_zero(r, f"{backend.name} all masked, given C")
        assert (r["dC"] == 0).all() and r["empty"].all() and (r["n_iters"] == 0).all()


@pytest.mark.parametrize("rho", RHOS)
@pytest.mark.parametrize("grad", GRADS)
def test_empty_problem_in_batch(backend: Backend, grad: str, rho: float | None) -> None:
    """Problems with no valid x point, no valid y point or neither, next to normal ones: those
    give 0 and a zero gradient, the others the oracle's results."""
    thin(backend, "reduced-grid", (GRADS.index(grad) + RHOS.index(rho)) % 2 == 0)
    P = make_problem(B=4, n=6, m=5, seed=61, empty_rows=(0, 1, 2), scale=0.5)
    got = solve(backend, P, "dot", "entropic", grad, rho)
    want = solve(ORACLE, P, "dot", "entropic", grad, rho)
    empty = torch.tensor([True, True, True, False])
    assert torch.equal(got["empty"], empty)
    assert (got["value"][empty] == 0).all() and (got["dx"][empty] == 0).all()
    assert (got["dy"][empty] == 0).all()
    compare(got, want, P, torch.float64, rho, f"{backend.name} empty rows {grad} rho={rho}")


_ZERO = [(s, c) for s in [(0, 4), (4, 0), (0, 0)]
         for c in [("linear", "implicit"), ("divergence", "unrolled"), ("entropic", "envelope")]]


@pytest.mark.parametrize(("sizes", "combo"), _ZERO)
def test_zero_size(backend: Backend, sizes: tuple[int, int], combo: tuple[str, str]) -> None:
    """n = 0 or m = 0 (no points at all): value 0, gradients of the right (empty) shape."""
    thin(backend, "thirds-grid", _ZERO.index((sizes, combo)) % 4 == 0)
    n, m = sizes
    objective, grad = combo
    P = make_problem(B=2, n=n, m=m, seed=71)
    res = solve(backend, P, "sqeuclidean", objective, grad, None, max_iter=20, tol=0.0)
    _assert_zero(res, f"{backend.name} n={n} m={m} {objective}")
    assert res["dx"].shape == P.x.shape and res["dy"].shape == P.y.shape
    assert res["value"].shape == (2,)
    if objective != "divergence":
        assert res["f"].shape == (2, n) and res["g"].shape == (2, m)
        assert res["empty"].all() and (res["n_iters"] == 0).all()


def test_batch_of_zero_problems(backend: Backend) -> None:
    """B = 0: values of shape [0], gradients of the inputs' (empty) shapes."""
    z = lambda *shape, dt=torch.float64: torch.zeros(shape, dtype=dt)  # noqa: E731
    P = Problem(z(0, 4, 5), z(0, 3, 5), z(0, 4, dt=torch.bool), z(0, 3, dt=torch.bool),
                z(0, 4), z(0, 3), z(0))  # fmt: skip
    for cost in ("cosine", "matrix"):
        res = solve(backend, P, cost, "linear", "implicit", None, max_iter=20, tol=0.0)
        assert res["value"].shape == (0,) and res["f"].shape == (0, 4) and res["g"].shape == (0, 3)
        assert res["dx"].shape == P.x.shape and res["dy"].shape == P.y.shape


@pytest.mark.parametrize("grad", GRADS)
def test_empty_problems_dense(backend: Backend, grad: str) -> None:
    """A given C with problems emptied by the masks or by all-zero weights: 0 value, 0 ∂/∂C
    there, never NaN; the other problems the oracle's."""
    C = random_cost(4, 5, 6, seed=91)
    xm, ym = torch.ones(4, 5, dtype=torch.bool), torch.ones(4, 6, dtype=torch.bool)
    xm[0] = False
    ym[2] = False
    xm[1, 3] = ym[1, 0] = False
    a, b = random_weights(xm, seed=92), random_weights(ym, seed=93)
    a[3] = 0.0  # all-zero weights make a problem empty too
    w = torch.tensor([0.3, -1.1, 2.0, 0.7], dtype=F64)
    kw = dict(eps=0.2, grad=grad, objective="linear", tol=1e-9, max_iter=300)
    got = solve_dense(backend, C, a, b, xm, ym, w=w, **kw)
    want = solve_dense(ORACLE, C, a, b, xm, ym, w=w, **kw)
    e = [0, 2, 3]
    assert got["empty"].tolist() == [True, False, True, True]
    assert (got["value"][e] == 0).all() and (got["n_iters"][e] == 0).all()
    assert (got["dC"][e] == 0).all() and (got["f"][e] == 0).all() and (got["g"][e] == 0).all()
    for key in ("value", "value_linear", "dC"):
        assert torch.isfinite(got[key]).all(), key
        close(got[key], want[key], F64, "grad" if key == "dC" else "value", key)
    assert torch.equal(got["n_iters"], want["n_iters"])


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_empty_batch_reductions(backend: Backend, reduction: str) -> None:
    """Every problem empty, through ``sinkhorn_loss`` with each reduction: 0, gradient 0."""
    x, y, xm, ym = random_problem(3, 4, 5, 3, seed=95, empty_rows=(0, 1, 2),
                                  device=backend.device, requires_grad=True)  # fmt: skip
    loss = ok.sinkhorn_loss(x, y, x_mask=xm, y_mask=ym, reduction=reduction, max_iter=20,
                            backend=backend.name)  # fmt: skip
    assert loss.shape == ((3,) if reduction == "none" else ())
    assert (loss == 0).all()
    if loss.requires_grad:
        dx, dy = torch.autograd.grad(loss.sum(), (x, y))
        assert (dx == 0).all() and (dy == 0).all()


# --------------------------------------------------------------------------- sizes
_SIZES = [
    (1, 1, "cosine", "implicit", None, F64),
    (1, 7, "sqeuclidean", "unrolled", None, F64),
    (7, 1, "dot", "envelope", 1.0, F64),
    (33, 7, "cosine", "unrolled", None, F64),
    (7, 127, "sqeuclidean", "implicit", 1.0, F64),
    (127, 33, "matrix", "envelope", None, F64),
    (1, 33, "matrix", "implicit", 1.0, F64),
    (127, 1, "cosine", "envelope", None, torch.float32),
    (33, 127, "dot", "implicit", None, torch.float32),
    (127, 127, "sqeuclidean", "unrolled", 1.0, torch.float32),
    # past the Triton resident limit (128): the streaming kernels, through the public API
    (129, 7, "dot", "unrolled", 1.0, F64),
    (9, 257, "cosine", "envelope", None, F64),
]


def _size_id(case: tuple) -> str:
    n, m, cost, grad, rho, dtype = case
    return f"{n}x{m}-{cost}-{grad}-{'bal' if rho is None else 'rho'}-{str(dtype)[6:]}"


@pytest.mark.parametrize("case", _SIZES, ids=_size_id)
def test_sizes(backend: Backend, case: tuple) -> None:
    """n or m = 1, odd sizes 1/7/33/127, and 129/257 (past the Triton resident kernel and the
    cuda backend's limit): all points valid in problem 0 (the padded size is
    the size), ragged in problem 1; float64 and float32 (fixed iterations, see
    test_contract_values.py::test_matches_oracle_float32), balanced and unbalanced."""
    require(backend, "vs-oracle")
    n, m, cost, grad, rho, dtype = case
    if max(n, m) > 256:
        require(backend, "n>256")
    thin(backend, "reduced-grid", _SIZES.index(case) % 2 == 0 or max(n, m) != 127)
    P = make_problem(B=2, n=n, m=m, seed=n * 131 + m, scale=SCALE[cost], full_first=True)
    kw = dict(dtype=dtype) if dtype == F64 else dict(dtype=dtype, tol=0.0, max_iter=40)
    if max(n, m) > 128:  # 10 fixed iterations: the interpreted streaming kernels are slow
        kw.update(tol=0.0, max_iter=10)
    got = solve(backend, P, cost, "linear", grad, rho, **kw)
    want = solve(ORACLE, P, cost, "linear", grad, rho, **kw)
    compare(got, want, P, dtype, rho, f"{backend.name} {_size_id(case)}")


@pytest.mark.parametrize("grad", GRADS)
@pytest.mark.parametrize("side", ["n=1", "m=1", "n=m=1"])
def test_single_point_side(backend: Backend, side: str, grad: str) -> None:
    """One point on a side: the plan is a⊗b whatever C is, so ``value_linear = Σ a_i b_j C_ij``
    and ∂/∂C = a⊗b exactly (small ε, every mode)."""
    n, m = {"n=1": (1, 6), "m=1": (5, 1), "n=m=1": (1, 1)}[side]
    C = random_cost(3, n, m, seed=101 + n + 7 * m)
    a = random_weights(torch.ones(3, n, dtype=torch.bool), seed=102)
    b = random_weights(torch.ones(3, m, dtype=torch.bool), seed=103)
    r = solve_dense(backend, C, a, b, grad=grad, eps=0.05, max_iter=50)
    an, bn = a / a.sum(1, keepdim=True), b / b.sum(1, keepdim=True)
    outer = an[:, :, None] * bn[:, None, :]
    close(r["value"], (outer * C).sum((1, 2)), F64, "value", "value")
    close(r["P"], outer, F64, "property", "plan")
    assert r["converged"].all()
    close(r["dC"], outer, F64, "grad", "dC")


@pytest.mark.parametrize("cost", ["cosine", "sqeuclidean", "dot"])
def test_single_point_sample(backend: Backend, cost: str) -> None:
    """n = 1 with points: the value is the mean cost to y, gradients finite."""
    x, y, _, _ = random_problem(2, 1, 4, 3, seed=105, ragged=False, device=backend.device,
                                requires_grad=True)  # fmt: skip
    res = ok.solve_sample(x, y, cost=cost, backend=backend.name)
    want = ok.cost_matrix(x.detach().cpu(), y.detach().cpu(), cost).mean((1, 2))
    close(res.value, want, F64, "value", "value")
    dx, dy = torch.autograd.grad(res.value.sum(), (x, y))
    assert torch.isfinite(dx).all() and torch.isfinite(dy).all()


# --------------------------------------------------------------------------- layouts
def test_unbatched_inputs(backend: Backend) -> None:
    """x [n, d], y [m, d] (and C [n, m]): 0-d results, unbatched potentials and gradients,
    equal to the batched solve of the same problem."""
    dev = backend.device
    x, y, _, _ = random_problem(1, 6, 4, 3, seed=111, ragged=False, device=dev)
    x, y = x[0].requires_grad_(True), y[0].requires_grad_(True)
    xm = torch.tensor([True, True, False, True, True, True], device=dev)
    kw = dict(backend=backend.name, max_iter=50)
    res = ok.solve_sample(x, y, x_mask=xm, **kw)
    assert res.value.shape == () and res.potentials[0].shape == (6,)
    assert res.potentials[1].shape == (4,) and res.n_iters.shape == () and res.err.shape == ()
    dx, dy = torch.autograd.grad(res.value, (x, y))
    assert dx.shape == (6, 3) and dy.shape == (4, 3) and (dx[2] == 0).all()
    batched = ok.solve_sample(x[None].detach(), y[None].detach(), x_mask=xm[None], **kw)
    close(res.value, batched.value[0], F64, "property", "unbatched vs batched")
    C = random_cost(1, 5, 3, seed=112)[0].to(dev).requires_grad_(True)
    r = ok.solve(C, **kw)
    (dC,) = torch.autograd.grad(r.value, (C,))
    assert r.value.shape == () and r.potentials[0].shape == (5,) and dC.shape == (5, 3)


@pytest.mark.parametrize("cost", ["cosine", "sqeuclidean", "dot"])
def test_non_contiguous_and_expanded_inputs(backend: Backend, cost: str) -> None:
    """Strided views and a teacher batch broadcast with expand() (stride 0): the same values
    and gradients as contiguous copies."""
    thin(backend, "thirds-grid", cost == "dot")
    dev = backend.device
    big, _, _, _ = random_problem(3, 12, 5, 8, seed=121, ragged=False, device=dev)
    x = big[:, ::2, 1::2].detach().requires_grad_(True)  # [3, 6, 4], non-contiguous leaf
    y_one = torch.randn(5, 4, dtype=F64, generator=torch.Generator().manual_seed(122)).to(dev)
    y_one.requires_grad_(True)
    y = y_one.expand(3, 5, 4)  # stride 0 over the batch
    assert not x.is_contiguous() and y.stride(0) == 0
    kw = dict(cost=cost, backend=backend.name, max_iter=100)
    res = ok.solve_sample(x, y, **kw)
    dx, dy = torch.autograd.grad(res.value.sum(), (x, y_one))
    xc = x.detach().contiguous().requires_grad_(True)
    yc = y.detach().contiguous().requires_grad_(True)
    ref = ok.solve_sample(xc, yc, **kw)
    dxc, dyc = torch.autograd.grad(ref.value.sum(), (xc, yc))
    close(res.value, ref.value, F64, "property", "value")
    close(dx, dxc, F64, "grad", "dx")
    close(dy, dyc.sum(0), F64, "grad", "dy")


# --------------------------------------------------------------------------- extremes
_EXTREME = [
    ("cosine", "linear", "implicit"),
    ("sqeuclidean", "entropic", "unrolled"),
    ("dot", "divergence", "envelope"),
    ("sqeuclidean", "linear", "envelope"),
    ("cosine", "divergence", "unrolled"),
    ("dot", "entropic", "implicit"),
]


@pytest.mark.parametrize(("cost", "objective", "grad"), _EXTREME)
def test_extreme_eps_and_scale_are_finite(backend: Backend, cost: str, objective: str,
                                          grad: str, request: pytest.FixtureRequest) -> None:
    """float32, ε ∈ {1e-3, 10} × point scale ∈ {1, 1e3}, 10 iterations: every output and
    gradient finite (the log-domain updates never overflow)."""
    thin(backend, "thirds-grid", _EXTREME.index((cost, objective, grad)) % 3 == 0)
    known_bug(backend, f"extreme-{cost}-{objective}-{grad}", request)
    for eps, scale in ((1e-3, 1.0), (1e-3, 1e3), (10.0, 1e3), (10.0, 1.0)):
        x, y, xm, ym = random_problem(2, 6, 5, 4, dtype=torch.float32, seed=131, scale=scale,
                                      device=backend.device, requires_grad=True)  # fmt: skip
        res = ok.solve_sample(x, y, x_mask=xm, y_mask=ym, cost=cost, objective=objective,
                              grad=grad, eps=eps, max_iter=10, tol=0.0, backend=backend.name)
        dx, dy = torch.autograd.grad(res.value.sum(), (x, y))
        for t in (res.value, res.value_linear, res.err, *res.potentials, dx, dy):
            assert torch.isfinite(t).all(), f"eps={eps} scale={scale}: non-finite {t}"


@pytest.mark.parametrize("grad", GRADS)
def test_sqeuclidean_far_from_origin(backend: Backend, grad: str) -> None:
    """Points at 1e4 in float32 (the squared norms are ~1e8): centring keeps the result equal
    to the float64 solve of the same (rounded) points."""
    thin(backend, "reduced-grid", grad != "implicit")
    x0, y0, xm, ym = random_problem(3, 7, 6, 4, seed=141)
    P32 = Problem((x0 + 1e4).float(), (y0 + 1e4).float(), xm, ym, random_weights(xm, 142),
                  random_weights(ym, 143), torch.ones(3, dtype=F64))  # fmt: skip
    kw = dict(eps=0.5, tol=0.0, max_iter=50)
    r32 = solve(backend, P32, "sqeuclidean", "linear", grad, None, **kw)
    r64 = solve(ORACLE, P32, "sqeuclidean", "linear", grad, None, dtype=F64, **kw)
    for key in ("value", "value_linear"):
        close(r32[key], r64[key], torch.float32, "value", key)
    close(r32["dx"], r64["dx"], torch.float32, "grad", "dx")
    close(r32["dy"], r64["dy"], torch.float32, "grad", "dy")


def test_cosine_zero_vector(backend: Backend) -> None:
    """A valid all-zero point under the cosine cost (its norm is clamped): finite, and the
    oracle's result."""
    require(backend, "vs-oracle")
    P = make_problem(B=2, n=6, m=5, seed=151, ragged=False)
    P.x[0, 2] = 0.0
    P.y[1, 4] = 0.0
    got = solve(backend, P, "cosine", "linear", "implicit", None)
    want = solve(ORACLE, P, "cosine", "linear", "implicit", None)
    compare(got, want, P, F64, None, f"{backend.name} zero vector")
