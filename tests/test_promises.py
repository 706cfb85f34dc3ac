"""Regression tests of issue 9 ("every promise holds"), items 1–9: no NaN, no silent wrong
value, every bad input named. Each test failed on the code before its fix.

Backends: ``torch`` (oracle), ``cpu`` (C++), ``triton`` (interpreter, small shapes).
"""

from __future__ import annotations

import os

import pytest
import torch

import optical_kernels as ok
from optical_kernels.backends import torch as R
from optical_kernels.config import SolverConfig
from optical_kernels.costs import cost_matrix

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

F32, F64 = torch.float32, torch.float64


def _backends() -> list[str]:
    names = ["torch"]
    if ok.backends()["cpu"]["available"]:
        names.append("cpu")
    return names


def _with_triton() -> list[str]:
    names = _backends()
    try:
        import optical_kernels.backends.triton as T

        if T.is_available()[0]:
            names.append("triton")
    except ImportError:
        pass
    return names


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------ 1. dot far from the origin
def _far_points() -> tuple[torch.Tensor, torch.Tensor]:
    g = _gen(0)
    x = (torch.randn(5, 4, generator=g) * 1e-2 + 1e4).float()
    y = (torch.randn(7, 4, generator=g) * 1e-2 + 1e4).float()
    return x, y


def _exact_dot(x: torch.Tensor, y: torch.Tensor, eps: float, objective: str):
    """fp64 oracle on the same fp32 points: solve on C − mean(C) (exact invariance)."""
    C = -(x.double() @ y.double().T)
    k = C.mean()
    res = ok.solve((C - k).clone().requires_grad_(True), eps=eps, objective=objective,
                   backend="torch", max_iter=2000, tol=1e-12)  # fmt: skip
    return C, res.value.item() + k.item()


@pytest.mark.parametrize("backend", _with_triton())
@pytest.mark.parametrize("eps_rel", [1.0, 1e-4])
@pytest.mark.parametrize("objective,grad", [("linear", "auto"), ("entropic", "unrolled")])
def test_dot_far_from_origin_fp32(backend, eps_rel, objective, grad):
    x, y = _far_points()
    C, exact = _exact_dot(x, y, 1.0, objective)
    Rng = (C.max() - C.min()).item()
    _, exact = _exact_dot(x, y, eps_rel * Rng, objective)
    xr = x.clone().requires_grad_(True)
    res = ok.solve_sample(xr, y, cost="dot", eps=eps_rel * Rng, objective=objective, grad=grad,
                          backend=backend, max_iter=50)  # fmt: skip
    v = res.value.double().item()
    # within the cost range (a plan's <P, C> must be) and within fp32 rounding of |C|
    assert C.min().item() - 0.05 * Rng <= v <= C.max().item() + 0.05 * Rng
    assert abs(v - exact) <= 0.05 * Rng
    res.value.backward()
    assert torch.isfinite(xr.grad).all()
    # gradient: ∂/∂x_i of <P, −x·y> ≈ −a_i Σ_j ... compare with the fp64 oracle gradient
    x64 = x.double().requires_grad_(True)
    ref = ok.solve_sample(x64, y.double(), cost="dot", eps=eps_rel * Rng, objective=objective,
                          grad=grad, backend="torch", max_iter=50)  # fmt: skip
    ref.value.backward()
    scale = x64.grad.abs().max().item()
    torch.testing.assert_close(xr.grad.double(), x64.grad, rtol=1e-3, atol=1e-3 * scale)


@pytest.mark.parametrize("backend", _backends())
def test_solve_given_C_with_large_offset_fp64(backend):
    """solve(C): a constant offset of C no longer multiplies the marginal error (fp64 too)."""
    x, y = _far_points()
    C = -(x.double() @ y.double().T)
    Rng = (C.max() - C.min()).item()
    C0 = C - C.mean()
    ref = ok.solve(C0, eps=1e-4 * Rng, backend="torch", max_iter=50).value.item() + C.mean().item()
    got = ok.solve(C, eps=1e-4 * Rng, backend=backend, max_iter=50).value.item()
    assert abs(got - ref) <= 1e-6 * Rng


# ------------------------------------------------------------------ 2. dot + rho overflow
@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("dtype", [F32, F64])
def test_dot_rho_overflow_rejected_naming_the_combination(backend, dtype):
    g = _gen(0)
    x = torch.randn(2, 5, 4, generator=g, dtype=F64).to(dtype)
    y = torch.randn(2, 5, 4, generator=g, dtype=F64).to(dtype)
    with pytest.raises(ValueError, match=r"rho=0\.001 with cost='dot'"):
        ok.solve_sample(x, y, cost="dot", eps=0.01, rho=1e-3, backend=backend)
    with pytest.raises(ValueError, match="rho"):
        ok.solve(-(x @ y.transpose(1, 2)), eps=0.01, rho=1e-3, backend=backend)


@pytest.mark.parametrize("backend", _backends())
def test_dot_rho_divergence_empty_problem_gradient_is_zero(backend):
    g = _gen(1)
    x = torch.randn(2, 5, 4, generator=g).requires_grad_(True)
    y = torch.randn(2, 6, 4, generator=g)
    ym = torch.ones(2, 6, dtype=torch.bool)
    ym[1] = False  # problem 1 is empty
    res = ok.solve_sample(x, y, y_mask=ym, cost="dot", eps=0.5, rho=1.0, objective="divergence",
                          backend=backend)  # fmt: skip
    assert torch.isfinite(res.value).all() and res.value[1] == 0
    res.value.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert (x.grad[1] == 0).all()


# ------------------------------------------------------------------ 3. zero vector under cosine
@pytest.mark.parametrize("backend", _with_triton())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, F32, F64])
def test_cosine_zero_vector_gradient_finite(backend, dtype):
    if backend == "triton" and dtype == torch.float16:
        pytest.skip("triton takes bf16/fp32/fp64 points")
    g = _gen(2)
    x = torch.randn(2, 4, 8, generator=g).to(dtype)
    y = torch.randn(2, 5, 8, generator=g).to(dtype)
    x[0, 1] = 0.0
    y[1, 3] = 0.0
    x.requires_grad_(True)
    y.requires_grad_(True)
    try:
        res = ok.solve_sample(x, y, cost="cosine", backend=backend)
    except ValueError as exc:  # a backend may not take this dtype: then it says so
        pytest.skip(str(exc))
    res.value.sum().backward()
    for t in (x, y):
        assert torch.isfinite(t.grad.float()).all()
    assert (x.grad[0, 1] == 0).all() and (y.grad[1, 3] == 0).all()
    assert x.grad.float().abs().max() < 1e3


def test_cost_matrix_zero_vector_gradient_is_zero():
    g = _gen(3)
    x = torch.randn(3, 4, generator=g, dtype=F64)
    x[1] = 0.0
    x.requires_grad_(True)
    y = torch.randn(5, 4, generator=g, dtype=F64)
    C = cost_matrix(x, y, "cosine")
    assert torch.equal(C[1].detach(), torch.ones(5, dtype=F64))
    C.sum().backward()
    assert (x.grad[1] == 0).all() and torch.isfinite(x.grad).all()


# ------------------------------------------------------------------ 5. unbalanced divergence ≥ 0
@pytest.mark.parametrize("backend", _backends())
def test_unbalanced_divergence_nonnegative_with_unequal_masses(backend):
    worst = 0.0
    for seed in range(6):
        g = _gen(10 + seed)
        x = torch.randn(3, 6, 3, generator=g, dtype=F64)
        y = x + 0.01 * torch.randn(3, 6, 3, generator=g, dtype=F64)  # nearly equal clouds
        a = 0.5 + torch.rand(3, 6, generator=g, dtype=F64)
        b = 2.0 * a  # unequal masses
        for rho in (0.1, 1.0, 10.0):
            res = ok.solve_sample(x, y, a=a, b=b, cost="sqeuclidean", eps=0.1, rho=rho,
                                  objective="divergence", backend=backend, max_iter=500,
                                  tol=1e-9)  # fmt: skip
            worst = min(worst, res.value.min().item())
    assert worst >= -1e-9
    # equal inputs give 0
    res = ok.solve_sample(x, x, a=a, b=a, cost="sqeuclidean", eps=0.1, rho=1.0,
                          objective="divergence", backend=backend, max_iter=500, tol=1e-10)
    torch.testing.assert_close(res.value, torch.zeros(3, dtype=F64), atol=1e-8, rtol=0)


# ------------------------------------------------------------------ 6. divergence reports all
@pytest.mark.parametrize("backend", _backends())
def test_divergence_reports_the_worst_solve(backend):
    """OT(x,x) of a tight cloud needs ~10× the iterations of OT(x,y): it is what is reported."""
    g = _gen(0)
    x = 0.3 * torch.randn(1, 12, 3, generator=g, dtype=F64)
    y = torch.randn(1, 10, 3, generator=g, dtype=F64) + 2
    kw = dict(cost="sqeuclidean", eps=0.05, tol=1e-6, max_iter=5000, backend=backend)
    div = ok.solve_sample(x, y, objective="divergence", **kw)
    parts = [ok.solve_sample(p, q, objective="entropic", **kw) for p, q in ((x, y), (x, x), (y, y))]
    iters = [p.n_iters.item() for p in parts]
    assert iters[1] > 2 * iters[0]  # the self-solve is the slow one
    assert div.n_iters.item() == max(iters)
    assert div.err.item() == pytest.approx(max(p.err.item() for p in parts), rel=1e-6, abs=1e-15)
    # a cap that the (x,y) solve meets but OT(x,x) does not: not converged
    short = ok.solve_sample(x, y, objective="divergence", **{**kw, "max_iter": iters[0] + 20})
    assert not bool(short.converged.item())
    assert short.err.item() >= 1e-6


# ------------------------------------------------------------------ 9. validation gaps
@pytest.mark.parametrize(
    "x,y,exc,name",
    [
        (torch.randn(2, 3, 4), torch.randn(2, 5, 3), ValueError, "feature dimension"),
        (torch.randint(0, 3, (3, 4)), torch.randn(5, 4), TypeError, "x must be a floating"),
        (torch.randn(3, 4), torch.randint(0, 3, (5, 4)), TypeError, "y must be a floating"),
        (torch.randn(4), torch.randn(5, 4), ValueError, "x must be"),
        (torch.randn(2, 3, 4), torch.randn(3, 5, 4), ValueError, "batch size"),
        ([[1.0]], torch.randn(5, 4), TypeError, "x must be a torch.Tensor"),
    ],
)
def test_cost_matrix_validates(x, y, exc, name):
    with pytest.raises(exc, match=name):
        cost_matrix(x, y, "cosine")


def test_meta_tensors_give_a_clear_error():
    x = torch.empty(2, 3, 4, device="meta")
    y = torch.empty(2, 5, 4, device="meta")
    with pytest.raises(ValueError, match="x is a meta tensor"):
        ok.solve_sample(x, y)
    with pytest.raises(ValueError, match="C is a meta tensor"):
        ok.solve(torch.empty(2, 3, 5, device="meta"))


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("dtype,eps", [(F32, 1e39), (F64, 1e-300), (F32, 1e-30), (F64, 1e308)])
def test_unrepresentable_eps_is_rejected(backend, dtype, eps):
    g = _gen(5)
    x = torch.randn(2, 4, 3, generator=g, dtype=dtype)
    y = torch.randn(2, 5, 3, generator=g, dtype=dtype)
    for cost in ("cosine", "sqeuclidean", "dot"):
        with pytest.raises(ValueError, match="eps="):
            ok.solve_sample(x, y, cost=cost, eps=eps, backend=backend)
    with pytest.raises(ValueError, match="eps="):
        ok.solve(cost_matrix(x, y, "sqeuclidean"), eps=eps, backend=backend)


@pytest.mark.parametrize("backend", _backends())
def test_eps_at_the_promise_edge_is_accepted_and_finite(backend):
    g = _gen(6)
    for dtype in (F32, F64):
        x = torch.randn(2, 4, 3, generator=g, dtype=dtype)
        y = torch.randn(2, 5, 3, generator=g, dtype=dtype)
        C = cost_matrix(x, y, "sqeuclidean")
        eps = 1e-4 * (C.max() - C.min()).item()
        res = ok.solve_sample(x, y, cost="sqeuclidean", eps=eps, backend=backend)
        assert torch.isfinite(res.value).all()


@pytest.mark.parametrize("arg", ["x_mask", "y_mask", "a", "b"])
def test_unbatched_call_with_batched_mask_names_the_argument(arg):
    x, y = torch.randn(4, 3), torch.randn(5, 3)
    k = 4 if arg in ("x_mask", "a") else 5
    val = torch.ones(1, k, dtype=torch.bool) if "mask" in arg else torch.ones(1, k)
    with pytest.raises(ValueError, match=rf"{arg} must be \[{k}\] for unbatched inputs"):
        ok.solve_sample(x, y, **{arg: val})


# ------------------------------------------------------------------ 4. cpu unbalanced implicit
def _little_mass_problem(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """sqeuclidean, ε = 0.05, ρ = 0.1: the plan transports ~1e-22 of mass."""
    g = _gen(1)
    x, y = torch.randn(12, 16, generator=g), torch.randn(10, 16, generator=g)
    return x.to(dtype), y.to(dtype)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("dtype", [F32, F64])
def test_unbalanced_implicit_gradient_little_mass(backend, dtype):
    kw = dict(cost="sqeuclidean", eps=0.05, rho=0.1, tol=0.0, max_iter=300, grad="implicit")
    x, y = _little_mass_problem(F64)
    x64 = x.clone().requires_grad_(True)
    ok.solve_sample(x64, y, backend="torch", **kw).value.backward()
    xr = x.to(dtype).requires_grad_(True)
    ok.solve_sample(xr, y.to(dtype), backend=backend, **kw).value.backward()
    rel = ((xr.grad.double() - x64.grad).norm() / x64.grad.norm()).item()
    assert rel < 1e-4  # cpu fp32 direct Schur path: 0.68 before


# ------------------------------------------------------------------ 7. unbalanced stopping rule
@pytest.mark.parametrize("backend", _with_triton())
@pytest.mark.parametrize("dtype", [F32, F64])
def test_unbalanced_stopping_rule_is_relative_to_the_mass(backend, dtype):
    kw = dict(cost="sqeuclidean", eps=0.05, rho=0.1)
    x, y = _little_mass_problem(F64)
    ref = ok.solve_sample(x, y, tol=0.0, max_iter=3000, backend="torch", **kw)
    res = ok.solve_sample(x.to(dtype), y.to(dtype), tol=1e-4, max_iter=3000, backend=backend, **kw)
    assert bool(res.converged) and 0 < res.err.item() < 1e-4
    # the absolute rule stopped at the first check (n_iters 10), 1.7% away from the fixed point
    assert abs(res.value.item() / ref.value.item() - 1) < 1e-4


def test_relative_error_definition_reference():
    """err = Σ|r − t| / max(Σr, Σt) for unbalanced problems; balanced unchanged."""
    g = _gen(7)
    C = torch.rand(2, 4, 5, generator=g, dtype=F64)
    a, b = torch.rand(2, 4, generator=g, dtype=F64), torch.rand(2, 5, generator=g, dtype=F64)
    f, g_ = torch.randn(2, 4, generator=g, dtype=F64), torch.randn(2, 5, generator=g, dtype=F64)
    P = R.plan(C, a, b, f, g_, 0.1)
    r, t = P.sum(2), a * torch.exp(-f / 0.5)
    expect = (r - t).abs().sum(1) / torch.maximum(r.sum(1), t.sum(1))
    torch.testing.assert_close(R.marginal_error(C, a, b, f, g_, 0.1, 0.5), expect)
    torch.testing.assert_close(R.marginal_error(C, a, b, f, g_, 0.1, None), (r - a).abs().sum(1))


# ------------------------------------------------------------------ 8. cpu ε table
@pytest.mark.skipif("cpu" not in _backends(), reason="cpu backend not built")
def test_cpu_eps_table_is_not_max_iter_long():
    from optical_kernels.backends import cpu

    big = 10**7
    assert cpu._eps_schedule(SolverConfig(eps=0.05, max_iter=big), big).numel() == 0
    sched = SolverConfig(eps=0.05, max_iter=big, eps_schedule=(1.0, 0.5))
    table = cpu._eps_schedule(sched, big)
    assert table.numel() == 6 and table[-1].item() == 0.05  # 1, .5, .25, .125, .0625, .05
    assert [sched.eps_at(t) for t in range(1, 7)] == table.tolist()
    # and the solver runs past the table with ε, as the reference
    g = _gen(8)
    C = torch.rand(2, 4, 5, generator=g, dtype=F64)
    a = torch.full((2, 4), 0.25, dtype=F64)
    b = torch.full((2, 5), 0.2, dtype=F64)
    for cfg in (SolverConfig(eps=0.05, max_iter=big, tol=1e-8),
                SolverConfig(eps=0.05, max_iter=big, tol=1e-8, eps_schedule=(1.0, 0.5))):
        got, ref = cpu.forward(C, a, b, cfg), R.forward(C, a, b, cfg)
        assert torch.equal(got.n_iters, ref.n_iters) and (got.n_iters < 1000).all()
        torch.testing.assert_close(got.f, ref.f)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dot_rho_overflow_in_self_solve_or_low_precision_gradient_rejected(backend, dtype):
    """OT(y,y) of the divergence overflows although OT(x,y) does not; and float16 points get
    their gradient in float16 (max 65504): both rejected clearly instead of NaN/Inf."""
    g = _gen(9)
    x = torch.zeros(1, 2, 1, dtype=dtype)  # x·y = 0, but −y·y reaches −1e4
    y = (100 * torch.randn(1, 6, 1, generator=g)).to(dtype)
    with pytest.raises(ValueError, match="rho=1 with cost='dot'"):
        ok.solve_sample(x, y, cost="dot", eps=1e-3, rho=1.0, objective="divergence",
                        backend=backend)  # fmt: skip
    x = (1e4 + 100 * torch.randn(2, 8, 5, generator=g)).to(dtype)
    y = (1e4 + 100 * torch.randn(2, 6, 5, generator=g)).to(dtype)
    if dtype == torch.float16:
        with pytest.raises(ValueError, match="rho=10 with cost='dot'"):
            ok.solve_sample(x, y, cost="dot", eps=1.8e7, rho=10.0, backend=backend)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("objective,grad", [("linear", "implicit"), ("entropic", "unrolled")])
def test_sqeuclidean_large_scale_tiny_eps_finite_fp32(backend, objective, grad):
    """Inputs at scale 1e4 (costs ~1e9) with ε = 0.05 = 5e-11 × the cost range: far outside
    the accuracy promise (the fp32 potentials carry ±64 of rounding, 1e3·ε: no backend's value
    means anything there, torch's own marginal error is 4), but never Inf/NaN. The cpu
    backend returned Inf; it now uses log-domain iterations when ε < 48 u max|C| and bounds
    the balanced plan by its exact bound P_ij ≤ 1."""
    for seed in (1, 2, 4, 5):
        g = _gen(seed)
        x = (torch.randn(2, 5, 4, generator=g) * 1e4).requires_grad_(True)
        y = torch.randn(2, 6, 4, generator=g) * 1e4
        res = ok.solve_sample(x, y, cost="sqeuclidean", eps=0.05, objective=objective, grad=grad,
                              backend=backend)  # fmt: skip
        res.value.sum().backward()
        assert torch.isfinite(res.value).all() and torch.isfinite(x.grad).all()
        assert torch.isfinite(res.err).all() and torch.isfinite(res.potentials[0]).all()


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("dtype", [torch.bfloat16, F32, F64])
def test_constant_cost_far_from_zero_gives_the_cost(backend, dtype):
    """Cost range 0 (one point each side, ~3e4 apart: C ≈ 8.8e8): any ε is in the promise
    domain and OT_ε = <P, C> = C. The cpu backend returned 3e-4 (the plan underflowed)."""
    x = torch.tensor([[[-5600.0, 18176.0, 2528.0, -8896.0, -5056.0]]], dtype=dtype)
    y = torch.tensor([[[11456.0, -1552.0, -5472.0, -7264.0, 6528.0]]], dtype=dtype)
    work = F64 if dtype == F64 else F32
    C = cost_matrix(x.to(work), y.to(work), "sqeuclidean").double().item()
    for eps in (3.2438763468051456e-4, 0.05, 1.0):
        res = ok.solve_sample(x, y, cost="sqeuclidean", eps=eps, objective="entropic", tol=0.0,
                              backend=backend)  # fmt: skip
        assert res.value.double().item() == pytest.approx(C, rel=1e-6)
        assert res.value_linear.double().item() == pytest.approx(C, rel=1e-6)
