"""Cost matrices (docs/design.md §2) against their direct definitions, and the chain rules of
``costs.cost_vjp`` (docs/design.md §3) against autograd."""

from __future__ import annotations

import pytest
import torch

from optical_kernels import cost_matrix
from optical_kernels.costs import NORM_FLOOR, centre, cost_vjp
from tests.helpers import random_problem

F64 = torch.float64


def direct_cost(x: torch.Tensor, y: torch.Tensor, cost: str) -> torch.Tensor:
    """Textbook definitions, no centring or expansion tricks. x [B,n,d], y [B,m,d]."""
    if cost == "cosine":  # x̂ = x/‖x‖, 0 (no direction) where ‖x‖ < 1e-8
        nx = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
        ny = torch.linalg.vector_norm(y, dim=-1, keepdim=True)
        xh = torch.where(nx < NORM_FLOOR, 0.0, x / nx.clamp_min(NORM_FLOOR))
        yh = torch.where(ny < NORM_FLOOR, 0.0, y / ny.clamp_min(NORM_FLOOR))
        return 1.0 - (xh[:, :, None, :] * yh[:, None, :, :]).sum(-1)
    if cost == "sqeuclidean":
        return ((x[:, :, None, :] - y[:, None, :, :]) ** 2).sum(-1)
    if cost == "dot":
        return -(x[:, :, None, :] * y[:, None, :, :]).sum(-1)
    raise AssertionError(cost)


def points(seed: int, B: int = 3, n: int = 6, m: int = 5, d: int = 4, dtype=F64, **kw):
    x, y, _, _ = random_problem(B, n, m, d, dtype=dtype, seed=seed, ragged=False, **kw)
    return x, y


@pytest.mark.parametrize("cost", ["cosine", "sqeuclidean", "dot"])
def test_cost_matrix_matches_definition_fp64(cost):
    x, y = points(0)
    C = cost_matrix(x, y, cost)
    assert C.shape == (3, 6, 5) and C.dtype == F64
    torch.testing.assert_close(C, direct_cost(x, y, cost), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cost", ["cosine", "sqeuclidean", "dot"])
def test_cost_matrix_unbatched(cost):
    x, y = points(1)
    C = cost_matrix(x[0], y[0], cost)
    assert C.shape == (6, 5)
    torch.testing.assert_close(C, cost_matrix(x, y, cost)[0], rtol=1e-12, atol=1e-12)


def test_sqeuclidean_matches_cdist_fp64():
    x, y = points(2, scale=3.0)
    C = cost_matrix(x, y, "sqeuclidean")
    torch.testing.assert_close(C, torch.cdist(x, y) ** 2, rtol=1e-10, atol=1e-10)
    assert (C >= 0).all()


def test_sqeuclidean_far_from_origin_fp32():
    """Centring keeps fp32 exact-ish at |x| ~ 1e4 (without it the error would be O(1))."""
    x64, y64 = points(3, offset=1e4)
    x, y = x64.float(), y64.float()
    C = cost_matrix(x, y, "sqeuclidean")
    assert C.dtype == torch.float32
    truth = torch.cdist(x.double(), y.double()) ** 2  # exact for the fp32 inputs
    err = (C.double() - truth).abs().max().item()
    assert err < 1e-4 * max(1.0, truth.max().item()), err
    # the naive expansion loses everything at this offset (documents why centring matters)
    naive = (x * x).sum(-1)[:, :, None] + (y * y).sum(-1)[:, None, :] - 2 * x @ y.transpose(1, 2)
    assert (naive.double() - truth).abs().max().item() > 100 * err


def test_sqeuclidean_centring_uses_valid_points_only():
    x, y, xm, ym = random_problem(3, 6, 5, 4, seed=4, offset=50.0)
    C_masked = cost_matrix(x, y, "sqeuclidean", xm, ym)
    truth = torch.cdist(x, y) ** 2
    valid = xm[:, :, None] & ym[:, None, :]
    torch.testing.assert_close(C_masked[valid], truth[valid], rtol=1e-9, atol=1e-9)


def test_centre_is_common_shift():
    x, y, xm, ym = random_problem(2, 5, 4, 3, seed=5, offset=7.0)
    xc, yc = centre(x, y, xm, ym)
    shift_x, shift_y = x - xc, y - yc
    torch.testing.assert_close(shift_x, shift_x[:, :1].expand_as(shift_x))
    torch.testing.assert_close(shift_x[:, 0], shift_y[:, 0])
    # the mean of the valid points (both sets together) is 0 after centring
    total = (xc * xm[..., None]).sum(1) + (yc * ym[..., None]).sum(1)
    torch.testing.assert_close(total, torch.zeros_like(total), atol=1e-10, rtol=0)


def test_cosine_zero_and_tiny_vectors():
    x, y = points(6)
    x[0, 1] = 0.0  # zero vector: x̂ = 0, so C = 1 on the whole row
    x[1, 2] = 1e-10 * torch.tensor([1.0, 2.0, 2.0, 0.0], dtype=F64)  # norm 3e-10 < 1e-8
    C = cost_matrix(x, y, "cosine")
    assert torch.isfinite(C).all()
    torch.testing.assert_close(C[0, 1], torch.ones(5, dtype=F64))
    # below the floor the point has no direction: x̂ = 0, C = 1 (issue 9: finite gradient)
    torch.testing.assert_close(C[1, 2], torch.ones(5, dtype=F64), rtol=0, atol=0)
    torch.testing.assert_close(C, direct_cost(x, y, "cosine"), rtol=1e-12, atol=1e-12)


def test_cosine_scale_invariant_and_bounded():
    x, y = points(7)
    C = cost_matrix(x, y, "cosine")
    torch.testing.assert_close(cost_matrix(1e3 * x, 1e-3 * y, "cosine"), C, rtol=1e-10, atol=1e-10)
    assert (C >= -1e-12).all() and (C <= 2 + 1e-12).all()
    torch.testing.assert_close(torch.diagonal(cost_matrix(x, x, "cosine"), dim1=1, dim2=2),
                               torch.zeros(3, 6, dtype=F64), atol=1e-12, rtol=0)


@pytest.mark.parametrize("cost", ["cosine", "sqeuclidean", "dot"])
def test_cost_matrix_low_precision_inputs(cost):
    x, y = points(8)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        C = cost_matrix(x.to(dtype), y.to(dtype), cost)
        assert C.dtype == dtype and torch.isfinite(C.float()).all()


# ----------------------------------------------------------------------------- chain rules
def autograd_vjp(G, x, y, cost):
    xr = x.detach().requires_grad_(True)
    yr = y.detach().requires_grad_(True)
    C = direct_cost(xr, yr, cost)
    dx, dy = torch.autograd.grad((G * C).sum(), (xr, yr))
    return dx, dy


@pytest.mark.parametrize("need_dy", [True, False])
@pytest.mark.parametrize("cost", ["cosine", "sqeuclidean", "dot"])
@pytest.mark.parametrize("seed", [0, 1])
def test_cost_vjp_matches_autograd(cost, need_dy, seed):
    x, y = points(10 + seed, scale=2.0)
    G = torch.randn(3, 6, 5, dtype=F64, generator=torch.Generator().manual_seed(seed))
    dx, dy = cost_vjp(G, x, y, cost, need_dy)
    ref_dx, ref_dy = autograd_vjp(G, x, y, cost)
    torch.testing.assert_close(dx, ref_dx, rtol=1e-10, atol=1e-10)
    if need_dy:
        torch.testing.assert_close(dy, ref_dy, rtol=1e-10, atol=1e-10)
    else:
        assert dy is None


@pytest.mark.parametrize("cost", ["cosine", "sqeuclidean", "dot"])
def test_cost_vjp_matches_autograd_of_cost_matrix(cost):
    """Same check through the library's own (centred, expanded) cost_matrix."""
    x, y = points(20, offset=3.0)
    G = torch.randn(3, 6, 5, dtype=F64, generator=torch.Generator().manual_seed(3))
    xr, yr = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
    ref_dx, ref_dy = torch.autograd.grad((G * cost_matrix(xr, yr, cost)).sum(), (xr, yr))
    dx, dy = cost_vjp(G, x, y, cost, True)
    torch.testing.assert_close(dx, ref_dx, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(dy, ref_dy, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("side", ["x", "y"])
def test_cosine_vjp_zero_norm_row(side):
    x, y = points(30)
    (x if side == "x" else y)[1, 2] = 0.0
    G = torch.randn(3, 6, 5, dtype=F64, generator=torch.Generator().manual_seed(4))
    dx, dy = cost_vjp(G, x, y, "cosine", True)
    ref_dx, ref_dy = autograd_vjp(G, x, y, "cosine")
    assert torch.isfinite(dx).all() and torch.isfinite(dy).all()
    # the zero row has no direction (x̂ = 0 nearby): gradient exactly 0 there
    g = dx if side == "x" else dy
    assert (g[1, 2] == 0).all()
    torch.testing.assert_close(dx, ref_dx, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(dy, ref_dy, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("cost", ["cosine", "sqeuclidean", "dot"])
def test_cost_vjp_zero_G_gives_zero(cost):
    x, y = points(40)
    dx, dy = cost_vjp(torch.zeros(3, 6, 5, dtype=F64), x, y, cost, True)
    assert (dx == 0).all() and (dy == 0).all()


@pytest.mark.parametrize("cost", ["cosine", "sqeuclidean", "dot"])
def test_cost_vjp_finite_differences(cost):
    """An independent check: directional derivative of <G, C(x + t v, y)> at t = 0."""
    x, y = points(50, B=1, n=4, m=3, d=3)
    gen = torch.Generator().manual_seed(5)
    G = torch.randn(1, 4, 3, dtype=F64, generator=gen)
    v = torch.randn(x.shape, dtype=F64, generator=gen)
    w = torch.randn(y.shape, dtype=F64, generator=gen)
    dx, dy = cost_vjp(G, x, y, cost, True)
    h = 1e-6
    plus = (G * direct_cost(x + h * v, y + h * w, cost)).sum()
    minus = (G * direct_cost(x - h * v, y - h * w, cost)).sum()
    fd = (plus - minus) / (2 * h)
    torch.testing.assert_close((dx * v).sum() + (dy * w).sum(), fd, rtol=1e-6, atol=1e-8)
