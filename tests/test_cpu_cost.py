"""The cpu backend's point cost (csrc/cpu/cost.cpp; backends/cpu.py, ops.point_cost) against the
torch cost of :func:`optical_kernels.costs.cost_matrix`: values, both gradients with a random
upstream gradient, masks, odd sizes (1, 7, 33, 127), zero vectors, d = 0, float32 and float64,
the BLAS and the built-in GEMM, the eager and the custom-op path, the finiteness flag, and
that the api takes this path for ``backend="cpu"``.
"""

from __future__ import annotations

import pytest
import torch

import optical_kernels as ok
import optical_kernels.ops
from optical_kernels.backends import cpu
from optical_kernels.costs import cost_matrix

pytestmark = pytest.mark.skipif(not cpu.is_available()[0], reason=cpu.is_available()[1])

TOL = {torch.float32: 2e-6, torch.float64: 1e-13}
# the last: B = 1 with many rows, the problem alone on every thread (its passes and the
# built-in GEMM split over rows)
SHAPES = [(1, 1, 1, 1), (3, 7, 33, 5), (2, 33, 7, 127), (2, 127, 1, 17), (4, 32, 32, 384),
          (1, 300, 257, 40)]  # fmt: skip


def _problem(B, n, m, d, dtype, seed):  # noqa: ANN001, ANN202
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, n, d, generator=gen, dtype=torch.float64).to(dtype)
    y = torch.randn(B, m, d, generator=gen, dtype=torch.float64).to(dtype)
    if n > 1:
        x[0, 0] = 0.0  # a zero vector: no direction, gradient 0
    xv = torch.rand(B, n, generator=gen) < 0.75
    yv = torch.rand(B, m, generator=gen) < 0.75
    G = torch.randn(B, n, m, generator=gen, dtype=torch.float64).to(dtype)
    return x.requires_grad_(True), y.requires_grad_(True), xv, yv, G


def _point_cost(x, y, cost, xv, yv):  # noqa: ANN001, ANN202
    return optical_kernels.ops.point_cost("cpu", x, y, cost, xv, yv)


def _reference(x, y, xv, yv, cost):  # noqa: ANN001, ANN202
    C = cost_matrix(x, y, cost)
    return torch.where(xv[:, :, None] & yv[:, None, :], C, 0.0)


def _close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> None:
    scale = 1.0 + (b.abs().max().item() if b.numel() else 0.0)
    torch.testing.assert_close(a, b, rtol=0, atol=TOL[dtype] * scale)


@pytest.fixture(params=["blas", "builtin"])
def gemm(request, monkeypatch):  # noqa: ANN001, ANN201
    """Both GEMMs of cost.cpp: torch's BLAS and the built-in one (OPTICAL_KERNELS_CPU_BLAS=0)."""
    if request.param == "builtin":
        monkeypatch.setenv(cpu.BLAS_ENV, "0")
    cpu._blas.cache_clear()
    yield request.param
    cpu._blas.cache_clear()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cost", cpu.POINT_COSTS)
@pytest.mark.parametrize("shape", SHAPES)
def test_values_and_gradients_match_torch_cost(gemm, shape, cost, dtype):
    x, y, xv, yv, G = _problem(*shape, dtype, seed=sum(shape))
    C, finite = _point_cost(x, y, cost, xv, yv)
    assert finite is True
    C_ref = _reference(x, y, xv, yv, cost)
    _close(C, C_ref, dtype)
    assert (C[~(xv[:, :, None] & yv[:, None, :])] == 0).all()
    gx, gy = torch.autograd.grad((C * G).sum(), (x, y))
    rx, ry = torch.autograd.grad((C_ref * G).sum(), (x, y))
    _close(gx, rx, dtype)
    _close(gy, ry, dtype)
    if cost == "cosine" and shape[1] > 1:
        assert (gx[0, 0] == 0).all()  # the zero vector


@pytest.mark.parametrize("need", ["x", "y"])
def test_one_sided_gradient(need):
    x, y, xv, yv, G = _problem(2, 5, 6, 9, torch.float64, seed=3)
    x.requires_grad_(need == "x")
    y.requires_grad_(need == "y")
    C, _ = _point_cost(x, y, "cosine", xv, yv)
    (g,) = torch.autograd.grad((C * G).sum(), x if need == "x" else y)
    (r,) = torch.autograd.grad(
        (_reference(x, y, xv, yv, "cosine") * G).sum(), x if need == "x" else y
    )
    _close(g, r, torch.float64)


def test_zero_feature_dimension():
    x, y = torch.zeros(2, 3, 0, requires_grad=True), torch.zeros(2, 4, 0)
    xv, yv = torch.ones(2, 3, dtype=torch.bool), torch.ones(2, 4, dtype=torch.bool)
    for cost, value in (("cosine", 1.0), ("dot", 0.0)):
        C, finite = _point_cost(x, y, cost, xv, yv)
        assert finite and torch.equal(C, torch.full((2, 3, 4), value))
        (gx,) = torch.autograd.grad(C.sum(), x)
        assert gx.shape == x.shape


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("cost", cpu.POINT_COSTS)
def test_non_finite_points_clear_the_flag(bad, cost):
    x, y = torch.randn(2, 3, 4), torch.randn(2, 5, 4)
    xv, yv = torch.ones(2, 3, dtype=torch.bool), torch.ones(2, 5, dtype=torch.bool)
    assert _point_cost(x, y, cost, xv, yv)[1] is True
    y[1, 2, 3] = bad
    assert _point_cost(x, y, cost, xv, yv)[1] is False


def test_api_names_the_argument_through_the_flag():
    x, y = torch.randn(2, 3, 4), torch.randn(2, 5, 4)
    y[0, 1, 0] = float("nan")
    with pytest.raises(ValueError, match="y contains NaN"):
        ok.sinkhorn_loss(x, y, backend="cpu")
    big = torch.full((1, 2, 3), 3e38)
    with pytest.raises(ValueError, match="overflows"):
        ok.sinkhorn_loss(big, big, cost="cosine", backend="cpu")


def test_custom_op_path_is_bitwise_the_eager_path(monkeypatch):
    x, y, xv, yv, G = _problem(3, 7, 5, 11, torch.float32, seed=5)
    C1, f1 = _point_cost(x, y, "cosine", xv, yv)
    g1 = torch.autograd.grad((C1 * G).sum(), (x, y))
    monkeypatch.setattr(optical_kernels.ops, "_eager", lambda *ts: False)
    C2, f2 = _point_cost(x, y, "cosine", xv, yv)
    assert C2.grad_fn is not None and "Eager" not in type(C2.grad_fn).__name__
    g2 = torch.autograd.grad((C2 * G).sum(), (x, y))
    assert bool(f2) is f1 is True
    assert torch.equal(C1, C2)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


def test_custom_op_fake_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x, y = torch.empty(2, 3, 4), torch.empty(2, 5, 4)
        xv, yv = torch.ones(2, 3, dtype=torch.bool), torch.ones(2, 5, dtype=torch.bool)
        C, xs, ys, flag = optical_kernels.ops.point_cost_op(x, y, xv, yv, "cosine", "cpu")
    assert C.shape == (2, 3, 5) and xs.shape == (2, 3) and ys.shape == (2, 5) and flag.dim() == 0


def test_double_backward_is_refused():
    x, y, xv, yv, G = _problem(2, 4, 3, 5, torch.float64, seed=7)
    C, _ = _point_cost(x, y, "cosine", xv, yv)
    (gx,) = torch.autograd.grad((C * G).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(gx.sum(), x)


def test_api_uses_the_point_cost_for_the_cpu_backend(monkeypatch):
    """``backend="cpu"`` computes C here for cosine and dot, not for sqeuclidean or other
    backends; the loss and gradient agree with the torch backend (the oracle)."""
    calls = []
    real = cpu.point_cost_forward
    monkeypatch.setattr(cpu, "point_cost_forward", lambda *a: calls.append(a[4]) or real(*a))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 6, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    y = torch.randn(3, 5, 8, generator=gen, dtype=torch.float64)
    xm = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 0, 1, 0, 1, 0]])
    for cost in ("cosine", "dot", "sqeuclidean"):
        kw = dict(x_mask=xm, cost=cost, eps=0.2, max_iter=200, tol=1e-9)
        loss = ok.sinkhorn_loss(x, y, backend="cpu", **kw)
        (g,) = torch.autograd.grad(loss, x)
        loss_r = ok.sinkhorn_loss(x, y, backend="torch", **kw)
        (g_r,) = torch.autograd.grad(loss_r, x)
        torch.testing.assert_close(loss, loss_r, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(g, g_r, rtol=1e-7, atol=1e-9)
    assert calls == ["cosine", "dot"]


def test_gemm_info_names_what_runs(monkeypatch):
    cpu._blas.cache_clear()
    assert "gemm" in cpu.gemm_info(torch.float32).lower()
    monkeypatch.setenv(cpu.BLAS_ENV, "0")
    cpu._blas.cache_clear()
    assert cpu.gemm_info(torch.float64).startswith("built-in GEMM")
    cpu._blas.cache_clear()
