"""Edge cases of the public API on the ``torch`` backend (CPU): empty problems, degenerate
sizes, unbatched inputs, extreme ε and scales, low precision, unbalanced problems, plan
marginals, convergence flags, module/functional equivalence, reductions, ``backends()``.

The backend-dependent edge cases run on every backend in tests/backends/test_contract_edges.py.
"""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch

import optical_kernels as ok
from optical_kernels import SinkhornLoss, sinkhorn_loss, solve, solve_sample
from tests.helpers import (
    COSTS,
    GRAD_MODES,
    OBJECTIVES,
    assert_finite,
    random_cost,
    random_problem,
    random_weights,
)

F64 = torch.float64
T = {"backend": "torch"}


# ----------------------------------------------------------------------------- empty problems
EMPTY_ROWS = (1, 3, 4)  # problem 1: no x; problem 3: no y; problem 4: neither


@pytest.mark.parametrize("grad", GRAD_MODES)
@pytest.mark.parametrize("objective", ["linear", "entropic"])
@pytest.mark.parametrize("cost", COSTS)
def test_empty_problems_in_batch(cost, objective, grad):
    x, y, xm, ym = random_problem(5, 6, 5, 3, seed=1, empty_rows=EMPTY_ROWS, requires_grad=True)
    res = solve_sample(x, y, x_mask=xm, y_mask=ym, cost=cost, objective=objective, grad=grad,
                       max_iter=30, **T)
    dx, dy = torch.autograd.grad(res.value.sum(), (x, y))
    e = list(EMPTY_ROWS)
    assert res.empty.tolist() == [False, True, False, True, True]
    assert (res.value[e] == 0).all() and (res.value_linear[e] == 0).all()
    assert (res.n_iters[e] == 0).all() and (res.err[e] == 0).all()
    assert res.converged[e].all()
    assert (res.potentials[0][e] == 0).all() and (res.potentials[1][e] == 0).all()
    assert (dx[e] == 0).all() and (dy[e] == 0).all()
    # padded positions of the non-empty problems get no gradient either
    assert (dx[~xm] == 0).all() and (dy[~ym] == 0).all()
    assert (res.n_iters[[0, 2]] > 0).all()
    assert (res.value[[0, 2]] != 0).all()
    assert_finite(res.value, res.value_linear, res.err, *res.potentials, dx, dy)


@pytest.mark.parametrize("grad", GRAD_MODES)
@pytest.mark.parametrize("objective", ["linear", "entropic"])
def test_empty_problems_dense(objective, grad):
    C = random_cost(4, 5, 6, seed=2, requires_grad=True)
    xm = torch.ones(4, 5, dtype=torch.bool)
    ym = torch.ones(4, 6, dtype=torch.bool)
    xm[0] = False
    ym[2] = False
    a = random_weights(xm, seed=3)
    a[3] = 0.0  # all-zero weights make a problem empty too
    res = solve(C, a, None, x_mask=xm, y_mask=ym, objective=objective, grad=grad, **T)
    (dC,) = torch.autograd.grad(res.value.sum(), (C,))
    e = [0, 2, 3]
    assert res.empty.tolist() == [True, False, True, True]
    assert (res.value[e] == 0).all() and (res.n_iters[e] == 0).all()
    assert (dC[e] == 0).all() and res.n_iters[1] > 0
    assert_finite(res.value, res.err, *res.potentials, dC)


@pytest.mark.parametrize("grad", GRAD_MODES)
@pytest.mark.parametrize("objective", ["linear", "entropic"])
def test_all_empty_batch(objective, grad):
    x, y, xm, ym = random_problem(3, 4, 5, 3, seed=4, empty_rows=(0, 1, 2), requires_grad=True)
    for reduction in ("mean", "sum", "none"):
        loss = sinkhorn_loss(x, y, x_mask=xm, y_mask=ym, objective=objective, grad=grad,
                             reduction=reduction,
                             **T)
        assert loss.shape == ((3,) if reduction == "none" else ())
        assert (loss == 0).all()
        dx, dy = torch.autograd.grad(loss.sum(), (x, y))
        assert (dx == 0).all() and (dy == 0).all()


@pytest.mark.parametrize("grad", GRAD_MODES)
@pytest.mark.parametrize("sizes", [(0, 4), (4, 0), (0, 0)])
def test_zero_size_problems(sizes, grad):
    n, m = sizes
    x = torch.randn(2, n, 3, dtype=F64, requires_grad=True)
    y = torch.randn(2, m, 3, dtype=F64, requires_grad=True)
    res = solve_sample(x, y, grad=grad, **T)
    assert res.empty.all() and (res.value == 0).all() and (res.n_iters == 0).all()
    assert res.potentials[0].shape == (2, n) and res.potentials[1].shape == (2, m)
    dx, dy = torch.autograd.grad(res.value.sum(), (x, y))
    assert dx.shape == x.shape and dy.shape == y.shape
    assert res.plan().shape == (2, n, m)


@pytest.mark.parametrize("grad", GRAD_MODES)
@pytest.mark.parametrize("cost", COSTS)
def test_empty_problems_divergence(cost, grad):
    x, y, xm, ym = random_problem(4, 6, 5, 3, seed=5, empty_rows=(1, 2, 3), requires_grad=True)
    res = solve_sample(x, y, x_mask=xm, y_mask=ym, cost=cost, objective="divergence", grad=grad,
                       max_iter=30,
                       **T)
    dx, dy = torch.autograd.grad(res.value.sum(), (x, y))
    e = [1, 2, 3]
    assert res.empty[e].all()
    assert (res.value[e] == 0).all(), res.value
    assert (dx[e] == 0).all() and (dy[e] == 0).all()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_problem_reduction(reduction):
    x, y, xm, ym = random_problem(4, 6, 5, 3, seed=6, empty_rows=(2,))
    per = sinkhorn_loss(x, y, x_mask=xm, y_mask=ym, reduction="none", **T)
    assert per[2] == 0
    loss = sinkhorn_loss(x, y, x_mask=xm, y_mask=ym, reduction=reduction, **T)
    expected = {"none": per, "sum": per.sum(), "mean": per.sum() / 4}[reduction]
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)


# ----------------------------------------------------------------------------- tiny sizes
@pytest.mark.parametrize("grad", GRAD_MODES)
@pytest.mark.parametrize("side", ["n=1", "m=1", "n=m=1"])
def test_single_point_side(side, grad):
    """With one point on a side the plan is a⊗b whatever C is: value_linear = Σ a_i b_j C_ij
    and its exact gradient w.r.t. C is a⊗b."""
    n, m = {"n=1": (1, 6), "m=1": (5, 1), "n=m=1": (1, 1)}[side]
    C = random_cost(3, n, m, seed=7, requires_grad=True)
    a = random_weights(torch.ones(3, n, dtype=torch.bool), seed=8)
    b = random_weights(torch.ones(3, m, dtype=torch.bool), seed=9)
    res = solve(C, a, b, grad=grad, eps=0.05, **T)
    an, bn = a / a.sum(1, keepdim=True), b / b.sum(1, keepdim=True)
    outer = an[:, :, None] * bn[:, None, :]
    torch.testing.assert_close(res.value, (outer * C).sum((1, 2)), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(res.plan(), outer, rtol=1e-10, atol=1e-12)
    assert res.converged.all()
    (dC,) = torch.autograd.grad(res.value.sum(), (C,))
    torch.testing.assert_close(dC, outer, rtol=1e-8, atol=1e-10)  # envelope: P = a⊗b too


@pytest.mark.parametrize("cost", COSTS)
def test_single_point_sample(cost):
    x, y, _, _ = random_problem(2, 1, 4, 3, seed=10, ragged=False, requires_grad=True)
    res = solve_sample(x, y, cost=cost, **T)
    torch.testing.assert_close(res.value, ok.cost_matrix(x, y, cost).mean((1, 2)))
    assert_finite(*torch.autograd.grad(res.value.sum(), (x, y)))


# ----------------------------------------------------------------------------- layouts
@pytest.mark.parametrize("cost", COSTS)
def test_non_contiguous_and_expanded_inputs(cost):
    """Strided views and a teacher batch broadcast with expand() (stride 0) are accepted and
    give the same values and gradients as contiguous copies."""
    big, _, _, _ = random_problem(3, 12, 5, 8, seed=35, ragged=False)
    x = big[:, ::2, 1::2].detach().requires_grad_(True)  # [3, 6, 4], non-contiguous leaf
    y_one = torch.randn(5, 4, dtype=F64, generator=torch.Generator().manual_seed(36))
    y_one.requires_grad_(True)
    y = y_one.expand(3, 5, 4)  # stride 0 over the batch
    assert not x.is_contiguous() and y.stride(0) == 0
    res = solve_sample(x, y, cost=cost, **T)
    dx, dy = torch.autograd.grad(res.value.sum(), (x, y_one))
    xc = x.detach().contiguous().requires_grad_(True)
    yc = y.detach().contiguous().requires_grad_(True)
    ref = solve_sample(xc, yc, cost=cost, **T)
    dxc, dyc = torch.autograd.grad(ref.value.sum(), (xc, yc))
    torch.testing.assert_close(res.value, ref.value, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dx, dxc, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(dy, dyc.sum(0), rtol=1e-10, atol=1e-12)


def test_weights_get_no_gradient():
    """Weights are constants (documented): no gradient flows to a or b."""
    x, y, xm, ym = random_problem(2, 5, 4, 3, seed=37, requires_grad=True)
    a = random_weights(xm, seed=38).requires_grad_(True)
    res = solve_sample(x, y, a, x_mask=xm, y_mask=ym, **T)
    res.value.sum().backward()
    assert a.grad is None and x.grad is not None


# ----------------------------------------------------------------------------- unbatched
def test_unbatched_outputs_sample():
    x, y, _, _ = random_problem(1, 6, 4, 3, seed=11, ragged=False)
    x, y = x[0].requires_grad_(True), y[0].requires_grad_(True)
    xm = torch.tensor([True, True, False, True, True, True])
    res = solve_sample(x, y, x_mask=xm, **T)
    assert res.value.shape == () and res.value_linear.shape == ()
    assert res.potentials[0].shape == (6,) and res.potentials[1].shape == (4,)
    for t in (res.n_iters, res.err, res.converged, res.empty):
        assert t.shape == ()
    assert res.plan().shape == (6, 4)
    dx, dy = torch.autograd.grad(res.value, (x, y))
    assert dx.shape == (6, 3) and dy.shape == (4, 3) and (dx[2] == 0).all()
    batched = solve_sample(x[None].detach(), y[None].detach(), x_mask=xm[None], **T)
    torch.testing.assert_close(res.value.detach(), batched.value[0])
    for reduction in ("mean", "sum", "none"):
        assert sinkhorn_loss(x, y, reduction=reduction, **T).shape == ()


def test_unbatched_outputs_dense():
    C = random_cost(1, 5, 3, seed=12)[0].requires_grad_(True)
    a = torch.rand(5, dtype=F64) + 0.1
    res = solve(C, a, None, **T)
    assert res.value.shape == () and res.potentials[0].shape == (5,)
    assert res.plan().shape == (5, 3)
    (dC,) = torch.autograd.grad(res.value, (C,))
    assert dC.shape == (5, 3)


# ----------------------------------------------------------------------------- extremes
@pytest.mark.parametrize(
    "cost, objective, grad", list(itertools.product(COSTS, OBJECTIVES, GRAD_MODES))
)
def test_extreme_eps_and_scale_are_finite(cost, objective, grad):
    for eps, scale in itertools.product((1e-3, 10.0), (1.0, 1e3)):
        x, y, xm, ym = random_problem(
            2, 6, 5, 4, dtype=torch.float32, seed=13, scale=scale, requires_grad=True
        )
        res = solve_sample(x, y, x_mask=xm, y_mask=ym, cost=cost, objective=objective, grad=grad,
                           eps=eps,
                           max_iter=10, **T)
        dx, dy = torch.autograd.grad(res.value.sum(), (x, y))
        assert_finite(res.value, res.value_linear, res.err, *res.potentials, dx, dy)


@pytest.mark.parametrize("grad", GRAD_MODES)
def test_sqeuclidean_far_from_origin(grad):
    """x + 1e4 in fp32: centring keeps the result equal to the fp64 solve on the same inputs
    and close to the un-offset problem (the inputs themselves are rounded at ~1e-3)."""
    x0, y0, xm, ym = random_problem(3, 7, 6, 4, seed=14)
    kw = dict(cost="sqeuclidean", eps=0.5, grad=grad, tol=0.0, max_iter=50, **T)
    x32 = (x0 + 1e4).float().requires_grad_(True)
    y32 = (y0 + 1e4).float().requires_grad_(True)
    res32 = solve_sample(x32, y32, x_mask=xm, y_mask=ym, **kw)
    dx32, dy32 = torch.autograd.grad(res32.value.sum(), (x32, y32))
    x64 = x32.detach().double().requires_grad_(True)
    y64 = y32.detach().double().requires_grad_(True)
    res64 = solve_sample(x64, y64, x_mask=xm, y_mask=ym, **kw)
    dx64, dy64 = torch.autograd.grad(res64.value.sum(), (x64, y64))
    torch.testing.assert_close(res32.value.double(), res64.value, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dx32.double(), dx64, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(dy32.double(), dy64, rtol=1e-3, atol=1e-3)
    res0 = solve_sample(x0, y0, x_mask=xm, y_mask=ym, **kw)
    torch.testing.assert_close(res32.value.double(), res0.value, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("grad", GRAD_MODES)
def test_low_precision_inputs(dtype, grad):
    x, y, xm, ym = random_problem(3, 6, 5, 8, dtype=dtype, seed=15, requires_grad=True)
    res = solve_sample(x, y, x_mask=xm, y_mask=ym, grad=grad, **T)
    assert res.value.dtype == torch.float32 and res.potentials[0].dtype == torch.float32
    dx, dy = torch.autograd.grad(res.value.sum(), (x, y))
    assert dx.dtype == dtype and dy.dtype == dtype
    assert_finite(res.value, *res.potentials, dx, dy)
    # same problem on the upcast inputs
    ref = solve_sample(x.detach().float(), y.detach().float(), x_mask=xm, y_mask=ym, grad=grad, **T)
    torch.testing.assert_close(res.value, ref.value, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_cost(dtype):
    C = random_cost(2, 5, 4, seed=16).to(dtype).requires_grad_(True)
    res = solve(C, **T)
    assert res.value.dtype == torch.float32
    (dC,) = torch.autograd.grad(res.value.sum(), (C,))
    assert dC.dtype == dtype and torch.isfinite(dC.float()).all()


# ----------------------------------------------------------------------------- unbalanced
@pytest.mark.parametrize("grad", ["envelope", "unrolled"])
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_unbalanced_runs(objective, grad):
    x, y, xm, ym = random_problem(3, 6, 5, 3, seed=17, requires_grad=True, empty_rows=(2,))
    res = solve_sample(x, y, x_mask=xm, y_mask=ym, rho=0.5, objective=objective, grad=grad, **T)
    dx, dy = torch.autograd.grad(res.value.sum(), (x, y))
    assert_finite(res.value, res.err, *res.potentials, dx, dy)
    assert res.value[2] == 0 or objective == "divergence"


def test_unbalanced_implicit_entropic_is_envelope():
    """For the entropic objective 'implicit' is the envelope gradient (Danskin), rho or not."""
    C = random_cost(2, 5, 4, seed=18, requires_grad=True)
    g1 = torch.autograd.grad(solve(C, rho=1.0, objective="entropic", grad="implicit", **T)
                             .value.sum(), (C,))[0]
    g2 = torch.autograd.grad(solve(C, rho=1.0, objective="entropic", grad="envelope", **T)
                             .value.sum(), (C,))[0]
    torch.testing.assert_close(g1, g2)


def test_large_rho_approaches_balanced():
    C = random_cost(2, 5, 4, seed=19)
    kw = dict(eps=0.1, tol=1e-10, max_iter=2000, objective="entropic", **T)
    bal = solve(C, **kw)
    unb = solve(C, rho=1e5, grad="envelope", **kw)
    torch.testing.assert_close(unb.value, bal.value, rtol=1e-3, atol=1e-4)


def test_unbalanced_auto_grad_linear():
    x, y, _, _ = random_problem(2, 5, 4, 3, seed=20, ragged=False)
    assert torch.isfinite(sinkhorn_loss(x, y, rho=1.0, **T))


# ----------------------------------------------------------------------------- plan
def test_plan_marginals_balanced():
    x, y, xm, ym = random_problem(4, 7, 6, 3, seed=21)
    a, b = random_weights(xm, seed=22), random_weights(ym, seed=23)
    res = solve_sample(x, y, a, b, x_mask=xm, y_mask=ym, eps=0.2, tol=1e-10, max_iter=5000, **T)
    assert res.converged.all()
    P = res.plan()
    assert P.shape == (4, 7, 6) and (P >= 0).all()
    an = torch.where(xm, a, 0.0)
    an = an / an.sum(1, keepdim=True)
    bn = torch.where(ym, b, 0.0)
    bn = bn / bn.sum(1, keepdim=True)
    torch.testing.assert_close(P.sum(1), bn, rtol=0, atol=1e-12)  # exact after a g-update
    assert ((P.sum(2) - an).abs().sum(1) <= res.err + 1e-12).all()
    torch.testing.assert_close(P.sum(2), an, rtol=0, atol=1e-9)
    assert (P[~xm] == 0).all() and (P.transpose(1, 2)[~ym] == 0).all()
    torch.testing.assert_close((P * ok.cost_matrix(x, y, "cosine")).sum((1, 2)),
                               res.value_linear)


def test_plan_after_early_stop_matches_err():
    C = random_cost(3, 6, 5, seed=24)
    res = solve(C, eps=0.02, tol=0.0, max_iter=3, **T)
    P = res.plan()
    a = torch.full((3, 6), 1 / 6, dtype=F64)
    torch.testing.assert_close((P.sum(2) - a).abs().sum(1), res.err, rtol=1e-10, atol=1e-14)


def test_result_eps_and_plan_not_differentiable():
    C = random_cost(2, 4, 4, seed=25, requires_grad=True)
    res = solve(C, eps=0.3, **T)
    assert res.eps == 0.3
    assert not res.plan().requires_grad


# ----------------------------------------------------------------------------- convergence
def test_converged_flags():
    x, y, xm, ym = random_problem(4, 6, 5, 3, seed=26, empty_rows=(3,))
    easy = solve_sample(x, y, x_mask=xm, y_mask=ym, eps=0.5, tol=1e-6, max_iter=1000,
                        check_every=5, **T)
    assert easy.converged.all() and (easy.err[:3] < 1e-6).all()
    assert ((easy.n_iters[:3] % 5) == 0).all() and (easy.n_iters[:3] < 1000).all()
    xm_all, ym_all = torch.ones_like(xm), torch.ones_like(ym)
    ym_all[3] = False  # problem 3 stays empty; the others use every point (no 1-point sides)
    hard = solve_sample(x, y, x_mask=xm_all, y_mask=ym_all, eps=0.01, tol=1e-12, max_iter=2, **T)
    assert hard.converged.tolist() == [False, False, False, True]
    assert (hard.n_iters[:3] == 2).all()
    never = solve_sample(x, y, x_mask=xm, y_mask=ym, tol=0.0, max_iter=7, **T)
    assert never.converged.tolist() == [False, False, False, True]  # err < 0 never holds
    assert never.n_iters.tolist() == [7, 7, 7, 0]
    for res, tol in ((easy, 1e-6), (hard, 1e-12), (never, 0.0)):
        assert torch.equal(res.converged, (res.err < tol) | res.empty)


def test_check_every_controls_stopping_points():
    C = random_cost(3, 6, 5, seed=27)
    for check_every in (1, 3, 7):
        res = solve(C, eps=0.3, tol=1e-8, max_iter=500, check_every=check_every, **T)
        assert res.converged.all()
        assert ((res.n_iters % check_every) == 0).all()
        if check_every == 1:
            # converged exactly when first below tol: one iteration fewer is not
            prev = solve(C, eps=0.3, tol=0.0, max_iter=int(res.n_iters.max()) - 1, **T)
            assert (prev.err >= 1e-8).any()


# ----------------------------------------------------------------------------- module
@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"cost": "sqeuclidean", "eps": 0.2, "reduction": "sum", "objective": "entropic"},
        {"cost": "dot", "grad": "unrolled", "max_iter": 20, "tol": 0.0, "reduction": "none"},
        {"objective": "divergence", "rho": 1.0, "grad": "envelope", "eps_schedule": (1.0, 0.5)},
    ],
)
def test_module_equals_functional(kwargs):
    x, y, xm, ym = random_problem(3, 6, 5, 4, seed=28, requires_grad=True)
    module = SinkhornLoss(**kwargs, backend="torch")
    out_m = module(x, y, x_mask=xm, y_mask=ym)
    gm = torch.autograd.grad(out_m.sum(), (x, y))
    out_f = sinkhorn_loss(x, y, x_mask=xm, y_mask=ym, **kwargs, backend="torch")
    gf = torch.autograd.grad(out_f.sum(), (x, y))
    torch.testing.assert_close(out_m, out_f, rtol=0, atol=0)
    for u, v in zip(gm, gf):
        torch.testing.assert_close(u, v, rtol=0, atol=0)
    rep = repr(module)
    for key in kwargs:
        assert key in rep
    assert list(module.parameters()) == []


def test_module_weights_argument():
    x, y, xm, ym = random_problem(2, 5, 4, 3, seed=29)
    a, b = random_weights(xm, seed=30), random_weights(ym, seed=31)
    module = SinkhornLoss(backend="torch", reduction="none")
    torch.testing.assert_close(module(x, y, a, b, x_mask=xm, y_mask=ym),
                               solve_sample(x, y, a, b, x_mask=xm, y_mask=ym, **T).value)


def test_reduction_semantics():
    x, y, xm, ym = random_problem(5, 6, 5, 3, seed=32, requires_grad=True)
    per = sinkhorn_loss(x, y, x_mask=xm, y_mask=ym, reduction="none", **T)
    assert per.shape == (5,)
    torch.testing.assert_close(per, solve_sample(x, y, x_mask=xm, y_mask=ym, **T).value)
    total = sinkhorn_loss(x, y, x_mask=xm, y_mask=ym, reduction="sum", **T)
    torch.testing.assert_close(total, per.sum())
    mean = sinkhorn_loss(x, y, x_mask=xm, y_mask=ym, **T)  # default reduction is mean
    torch.testing.assert_close(mean, per.mean())
    g_mean = torch.autograd.grad(mean, x)[0]
    total = sinkhorn_loss(x, y, x_mask=xm, y_mask=ym, reduction="sum", **T)
    g_sum = torch.autograd.grad(total, x)[0]
    torch.testing.assert_close(g_mean * 5, g_sum)


def test_default_objective_is_linear_plan_cost():
    x, y, xm, ym = random_problem(2, 5, 4, 3, seed=33)
    res = solve_sample(x, y, x_mask=xm, y_mask=ym, **T)
    torch.testing.assert_close(res.value, res.value_linear, rtol=0, atol=0)
    ent = solve_sample(x, y, x_mask=xm, y_mask=ym, objective="entropic", **T)
    torch.testing.assert_close(ent.value_linear, res.value_linear)
    assert (ent.value >= ent.value_linear - 1e-12).all()  # ε·KL ≥ 0


def test_backends_structure():
    info = ok.backends()
    assert set(info) == {"torch", "cpu", "triton", "cuda", "online"}
    for name, entry in info.items():
        assert set(entry) == {"available", "reason"}, name
        assert isinstance(entry["available"], bool) and isinstance(entry["reason"], str)
        assert entry["reason"], name
    assert info["torch"]["available"] is True and info["online"]["available"] is True


def test_auto_backend_on_cpu_gives_same_result_as_torch():
    x, y, xm, ym = random_problem(2, 5, 4, 3, seed=34)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # one-time fallback notice
        auto = solve_sample(x, y, x_mask=xm, y_mask=ym)
    ref = solve_sample(x, y, x_mask=xm, y_mask=ym, **T)
    torch.testing.assert_close(auto.value, ref.value, rtol=1e-5, atol=1e-6)
