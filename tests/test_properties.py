"""Invariances of the solver (hypothesis, float64, ``torch`` backend, CPU).

* transpose symmetry: ``solve(C, a, b)`` and ``solve(Cᵀ, b, a)`` give the same value and
  swapped potentials (up to the gauge ``f + t, g − t``);
* permutation equivariance of the points (exact at every iteration, not only at convergence);
* padding invariance: masked rows/columns of garbage never change a result;
* cost shift: ``C + t`` shifts ``OT_ε`` and ``<P, C>`` by ``t`` and leaves the plan, the
  iteration count and ``∂/∂C`` unchanged (balanced problems);
* batch independence: a problem's result does not depend on the other problems of its batch,
  including with early stopping (``tol > 0``);
* the fused-cost code path (``forward_sample``) equals the dense path.

These run on the oracle alone (hypothesis-randomised, tight tolerances); the same properties on
every backend (deterministic seeds, one tolerance table) are in
tests/backends/test_contract_properties.py.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from optical_kernels import solve, solve_sample
from tests.helpers import (
    COSTS,
    GRAD_MODES,
    pad_cost,
    pad_points,
    pad_weights,
    random_cost,
    random_problem,
    random_weights,
    use_fused_reference,
)

F64 = torch.float64
T = {"backend": "torch"}
# A deeper, randomised run: OPTICAL_KERNELS_HYPOTHESIS_EXAMPLES=200 pytest tests/test_properties.py
_DEEP = int(os.environ.get("OPTICAL_KERNELS_HYPOTHESIS_EXAMPLES", "0"))
FEW = settings(
    max_examples=_DEEP or 6,
    deadline=None,
    derandomize=not _DEEP,
    suppress_health_check=[HealthCheck.too_slow],
)
CONVERGED = dict(tol=1e-11, max_iter=5000, check_every=5)

seeds = st.integers(0, 2**16)
sizes = st.integers(1, 6)
eps_values = st.sampled_from([0.1, 0.3, 1.0])
costs = st.sampled_from(COSTS)
grad_modes = st.sampled_from(GRAD_MODES)


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-10) -> None:
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def gauge_free(u: torch.Tensor, v: torch.Tensor, valid: torch.Tensor, tol: float) -> None:
    """``u − v`` is one constant over the valid entries of each problem."""
    diff = torch.where(valid, u - v, 0.0)
    for k in range(u.shape[0]):
        if valid[k].any():
            dk = diff[k][valid[k]]
            assert (dk - dk[0]).abs().max() < tol, (k, dk)


# ----------------------------------------------------------------------------- transpose
@FEW
@given(B=st.integers(1, 3), n=sizes, m=sizes, seed=seeds, eps=eps_values, grad=grad_modes)
def test_transpose_symmetry(B, n, m, seed, eps, grad):
    C = random_cost(B, n, m, seed=seed, requires_grad=True)
    _, _, xm, ym = random_problem(B, n, m, 1, seed=seed + 1)
    a, b = random_weights(xm, seed + 2), random_weights(ym, seed + 3)
    kw = dict(eps=eps, objective="entropic", grad=grad, **CONVERGED, **T)
    r1 = solve(C, a, b, x_mask=xm, y_mask=ym, **kw)
    Ct = C.detach().transpose(1, 2).clone().requires_grad_(True)
    r2 = solve(Ct, b, a, x_mask=ym, y_mask=xm, **kw)
    assume(bool(r1.converged.all() and r2.converged.all()))  # symmetric only at the fixed point
    close(r1.value, r2.value, 1e-8)
    close(r1.value_linear, r2.value_linear, 1e-8)
    close(r1.plan(), r2.plan().transpose(1, 2), 1e-8)
    f1, g1 = r1.potentials
    f2, g2 = r2.potentials
    gauge_free(f1, g2, xm, 1e-7)
    gauge_free(g1, f2, ym, 1e-7)
    (d1,) = torch.autograd.grad(r1.value.sum(), (C,))
    (d2,) = torch.autograd.grad(r2.value.sum(), (Ct,))
    close(d1, d2.transpose(1, 2), 1e-6)


@FEW
@given(n=sizes, m=sizes, d=st.integers(1, 4), seed=seeds, eps=eps_values, cost=costs)
def test_swap_point_sets(n, m, d, seed, eps, cost):
    """All three costs are symmetric, so swapping x and y transposes the problem."""
    x, y, xm, ym = random_problem(2, n, m, d, seed=seed)
    kw = dict(cost=cost, eps=eps, objective="entropic", **CONVERGED, **T)
    r1 = solve_sample(x, y, x_mask=xm, y_mask=ym, **kw)
    r2 = solve_sample(y, x, x_mask=ym, y_mask=xm, **kw)
    assume(bool(r1.converged.all() and r2.converged.all()))  # 1-D, small ε: can be slow
    close(r1.value, r2.value, 1e-8)
    close(r1.plan(), r2.plan().transpose(1, 2), 1e-8)


# ----------------------------------------------------------------------------- permutation
@FEW
@given(n=sizes, m=sizes, seed=seeds, eps=eps_values, cost=costs, grad=grad_modes)
def test_permutation_equivariance(n, m, seed, eps, cost, grad):
    B, d = 2, 3
    x, y, xm, ym = random_problem(B, n, m, d, seed=seed, requires_grad=True)
    a, b = random_weights(xm, seed + 1), random_weights(ym, seed + 2)
    gen = torch.Generator().manual_seed(seed)
    pi, sigma = torch.randperm(n, generator=gen), torch.randperm(m, generator=gen)
    kw = dict(cost=cost, eps=eps, grad=grad, tol=0.0, max_iter=15, **T)
    r1 = solve_sample(x, y, a, b, x_mask=xm, y_mask=ym, **kw)
    xp = x.detach()[:, pi].requires_grad_(True)
    yp = y.detach()[:, sigma].requires_grad_(True)
    r2 = solve_sample(xp, yp, a[:, pi], b[:, sigma], x_mask=xm[:, pi], y_mask=ym[:, sigma], **kw)
    close(r1.value, r2.value)
    close(r1.potentials[0][:, pi], r2.potentials[0])
    close(r1.potentials[1][:, sigma], r2.potentials[1])
    assert torch.equal(r1.n_iters, r2.n_iters)
    dx1, dy1 = torch.autograd.grad(r1.value.sum(), (x, y))
    dx2, dy2 = torch.autograd.grad(r2.value.sum(), (xp, yp))
    close(dx1[:, pi], dx2, 1e-8)
    close(dy1[:, sigma], dy2, 1e-8)


# ----------------------------------------------------------------------------- padding
@FEW
@given(
    n=sizes, m=sizes, extra_n=st.integers(0, 4), extra_m=st.integers(0, 4), front=st.booleans(),
    seed=seeds, cost=costs, grad=grad_modes,
    objective=st.sampled_from(["linear", "entropic", "divergence"]),
    tol=st.sampled_from([0.0, 1e-6]),
)
def test_padding_invariance_sample(n, m, extra_n, extra_m, front, seed, cost, grad, objective,
                                   tol):
    x, y, xm, ym = random_problem(3, n, m, 3, seed=seed, empty_rows=(2,) if seed % 2 else ())
    a, b = random_weights(xm, seed + 1), random_weights(ym, seed + 2)
    xp, xmp = pad_points(x, xm, extra_n, seed + 3, front)
    yp, ymp = pad_points(y, ym, extra_m, seed + 4, front)
    ap, bp = pad_weights(a, extra_n, front), pad_weights(b, extra_m, front)
    x.requires_grad_(True)
    y.requires_grad_(True)
    xp.requires_grad_(True)
    yp.requires_grad_(True)
    kw = dict(cost=cost, grad=grad, objective=objective, eps=0.2, tol=tol, max_iter=40,
              check_every=4, **T)
    r1 = solve_sample(x, y, a, b, x_mask=xm, y_mask=ym, **kw)
    r2 = solve_sample(xp, yp, ap, bp, x_mask=xmp, y_mask=ymp, **kw)
    vx = slice(extra_n, None) if front else slice(0, n)
    vy = slice(extra_m, None) if front else slice(0, m)
    close(r1.value, r2.value)
    close(r1.value_linear, r2.value_linear)
    close(r1.err, r2.err, 1e-9)
    close(r1.potentials[0], r2.potentials[0][:, vx])
    close(r1.potentials[1], r2.potentials[1][:, vy])
    assert torch.equal(r1.n_iters, r2.n_iters)
    assert torch.equal(r1.empty, r2.empty)
    dx1, dy1 = torch.autograd.grad(r1.value.sum(), (x, y))
    dx2, dy2 = torch.autograd.grad(r2.value.sum(), (xp, yp))
    close(dx1, dx2[:, vx], 1e-8)
    close(dy1, dy2[:, vy], 1e-8)
    assert (dx2[~xmp] == 0).all() and (dy2[~ymp] == 0).all()
    assert (r2.potentials[0][~xmp] == 0).all() and (r2.potentials[1][~ymp] == 0).all()


@FEW
@given(n=sizes, m=sizes, extra_n=st.integers(0, 4), extra_m=st.integers(1, 4), seed=seeds,
       grad=grad_modes, objective=st.sampled_from(["linear", "entropic"]))
def test_padding_invariance_dense(n, m, extra_n, extra_m, seed, grad, objective):
    C = random_cost(3, n, m, seed=seed, requires_grad=True)
    _, _, xm, ym = random_problem(3, n, m, 1, seed=seed + 1)
    Cp = pad_cost(C.detach(), extra_n, extra_m, seed + 2).requires_grad_(True)
    xmp = torch.cat([xm, torch.zeros(3, extra_n, dtype=torch.bool)], 1)
    ymp = torch.cat([ym, torch.zeros(3, extra_m, dtype=torch.bool)], 1)
    kw = dict(grad=grad, objective=objective, eps=0.1, tol=1e-7, max_iter=60, check_every=3, **T)
    r1 = solve(C, None, None, x_mask=xm, y_mask=ym, **kw)
    r2 = solve(Cp, None, None, x_mask=xmp, y_mask=ymp, **kw)
    close(r1.value, r2.value)
    close(r1.potentials[0], r2.potentials[0][:, :n])
    close(r1.potentials[1], r2.potentials[1][:, :m])
    assert torch.equal(r1.n_iters, r2.n_iters)
    (d1,) = torch.autograd.grad(r1.value.sum(), (C,))
    (d2,) = torch.autograd.grad(r2.value.sum(), (Cp,))
    close(d1, d2[:, :n, :m], 1e-8)
    assert (d2[:, n:] == 0).all() and (d2[:, :, m:] == 0).all()


def test_zero_weight_equals_masked():
    """A zero weight is a mask: such a point is excluded everywhere."""
    x, y, xm, ym = random_problem(2, 6, 5, 3, seed=3, ragged=False)
    a = random_weights(xm, 4)
    a[:, 2] = 0.0
    keep = torch.tensor([0, 1, 3, 4, 5])
    r1 = solve_sample(x, y, a, tol=0.0, max_iter=20, **T)
    r2 = solve_sample(x[:, keep], y, a[:, keep], tol=0.0, max_iter=20, **T)
    close(r1.value, r2.value)
    close(r1.potentials[0][:, keep], r2.potentials[0])
    assert (r1.potentials[0][:, 2] == 0).all()


# ----------------------------------------------------------------------------- cost shift
@FEW
@given(B=st.integers(1, 3), n=sizes, m=sizes, seed=seeds, eps=eps_values,
       shift=st.floats(-5.0, 50.0), grad=grad_modes, tol=st.sampled_from([0.0, 1e-6]))
def test_cost_shift(B, n, m, seed, eps, shift, grad, tol):
    C = random_cost(B, n, m, seed=seed)
    _, _, xm, ym = random_problem(B, n, m, 1, seed=seed + 1)
    a, b = random_weights(xm, seed + 2), random_weights(ym, seed + 3)
    kw = dict(eps=eps, grad=grad, tol=tol, max_iter=30, check_every=3, **T)
    C1 = C.clone().requires_grad_(True)
    C2 = (C + shift).requires_grad_(True)
    for objective in ("entropic", "linear"):
        r1 = solve(C1, a, b, x_mask=xm, y_mask=ym, objective=objective, **kw)
        r2 = solve(C2, a, b, x_mask=xm, y_mask=ym, objective=objective, **kw)
        close(r2.value, r1.value + shift, 1e-9)
        close(r2.value_linear, r1.value_linear + shift, 1e-9)
        close(r1.plan(), r2.plan(), 1e-9)
        assert torch.equal(r1.n_iters, r2.n_iters)
        (d1,) = torch.autograd.grad(r1.value.sum(), (C1,))
        (d2,) = torch.autograd.grad(r2.value.sum(), (C2,))
        close(d1, d2, 1e-7)


# ----------------------------------------------------------------------------- batch
@FEW
@given(n=sizes, m=sizes, seed=seeds, cost=costs, grad=grad_modes,
       objective=st.sampled_from(["linear", "entropic", "divergence"]))
def test_batch_independence(n, m, seed, cost, grad, objective):
    B = 4
    x, y, xm, ym = random_problem(B, n, m, 3, seed=seed, empty_rows=(3,) if seed % 3 else (),
                                  scale=1.0 + (seed % 5))
    kw = dict(cost=cost, grad=grad, objective=objective, eps=0.1, tol=1e-6, max_iter=60,
              check_every=3, **T)
    xb, yb = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
    rb = solve_sample(xb, yb, x_mask=xm, y_mask=ym, **kw)
    dxb, dyb = torch.autograd.grad(rb.value.sum(), (xb, yb))
    for k in range(B):
        xk = x[k : k + 1].clone().requires_grad_(True)
        yk = y[k : k + 1].clone().requires_grad_(True)
        rk = solve_sample(xk, yk, x_mask=xm[k : k + 1], y_mask=ym[k : k + 1], **kw)
        dxk, dyk = torch.autograd.grad(rk.value.sum(), (xk, yk))
        assert rk.n_iters.item() == rb.n_iters[k].item()
        close(rk.value[0], rb.value[k])
        close(rk.potentials[0][0], rb.potentials[0][k])
        close(rk.potentials[1][0], rb.potentials[1][k])
        close(dxk[0], dxb[k], 1e-8)
        close(dyk[0], dyb[k], 1e-8)


def test_batch_independence_different_stopping_times():
    """Problems that stop at different iterations in one batch are unaffected by each other."""
    C = random_cost(3, 5, 4, seed=11)
    eps_scale = torch.tensor([1.0, 0.05, 3.0], dtype=F64)[:, None, None]
    C = (C / eps_scale).requires_grad_(True)  # very different conditioning per problem
    kw = dict(eps=0.1, tol=1e-8, max_iter=400, check_every=2, grad="unrolled", **T)
    rb = solve(C, **kw)
    assert len(set(rb.n_iters.tolist())) > 1, rb.n_iters
    (db,) = torch.autograd.grad(rb.value.sum(), (C,))
    for k in range(3):
        Ck = C.detach()[k : k + 1].clone().requires_grad_(True)
        rk = solve(Ck, **kw)
        (dk,) = torch.autograd.grad(rk.value.sum(), (Ck,))
        assert rk.n_iters.item() == rb.n_iters[k].item()
        close(rk.value[0], rb.value[k])
        close(dk[0], db[k], 1e-8)


# ----------------------------------------------------------------------------- duality
@FEW
@given(B=st.integers(1, 3), n=sizes, m=sizes, seed=seeds, eps=eps_values)
def test_entropic_value_equals_dual_at_convergence(B, n, m, seed, eps):
    C = random_cost(B, n, m, seed=seed)
    _, _, xm, ym = random_problem(B, n, m, 1, seed=seed + 1)
    a, b = random_weights(xm, seed + 2), random_weights(ym, seed + 3)
    r = solve(C, a, b, x_mask=xm, y_mask=ym, eps=eps, objective="entropic", **CONVERGED, **T)
    assume(bool(r.converged.all()))
    an = torch.where(xm, a, 0.0) / torch.where(xm, a, 0.0).sum(1, keepdim=True)
    bn = torch.where(ym, b, 0.0) / torch.where(ym, b, 0.0).sum(1, keepdim=True)
    f, g = r.potentials
    close(r.value, (an * f).sum(1) + (bn * g).sum(1), 1e-8)


# ----------------------------------------------------------------------------- fused path
@pytest.mark.parametrize("grad", GRAD_MODES)
@pytest.mark.parametrize("cost", COSTS)
def test_fused_sample_path_equals_dense_path(monkeypatch, cost, grad):
    """The API's forward_sample branch (masking, centring, custom op sinkhorn_sample) gives the
    same results as the dense branch, with a test double backend built from the reference."""
    fused = use_fused_reference(monkeypatch)
    x, y, xm, ym = random_problem(3, 6, 5, 4, seed=5, offset=20.0, empty_rows=(1,))
    results = []
    for backend in ("torch", fused):
        xr, yr = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
        r = solve_sample(xr, yr, x_mask=xm, y_mask=ym, cost=cost, grad=grad, objective="linear",
                         tol=1e-6,
                         max_iter=50, backend=backend)
        results.append((r, *torch.autograd.grad(r.value.sum(), (xr, yr))))
    (r1, dx1, dy1), (r2, dx2, dy2) = results
    close(r1.value, r2.value, 1e-9)
    close(r1.potentials[0], r2.potentials[0], 1e-8)
    assert torch.equal(r1.n_iters, r2.n_iters)
    close(dx1, dx2, 1e-7)
    close(dy1, dy2, 1e-7)
    close(r1.plan(), r2.plan(), 1e-8)
    # x alone requiring grad: the fused backward skips dy
    xr = x.clone().requires_grad_(True)
    r = solve_sample(xr, y, x_mask=xm, y_mask=ym, cost=cost, grad=grad, backend=fused, tol=1e-6,
                     max_iter=50)
    (dx,) = torch.autograd.grad(r.value.sum(), (xr,))
    close(dx, dx1, 1e-7)
