"""The ``online`` backend (optical_kernels/backends/online.py) against the torch oracle.

Tiles are forced to a few rows (``TILE_ELEMENTS`` patched) so that every pass crosses tile
boundaries: a tile-merging bug (a missed row block, a wrong running LSE) shows up as a value
or gradient mismatch. The memory test checks the point of the backend: no [n, m] buffer.
"""

from __future__ import annotations

import pytest
import torch

import optical_kernels as ok
from optical_kernels.backends import online
from optical_kernels.backends import torch as reference
from optical_kernels.config import SolverConfig, SolverOut
from tests.test_memory import PeakLiveBytes

COSTS = ("cosine", "sqeuclidean", "dot")
GRADS = ("envelope", "implicit", "unrolled")
TOL = {torch.float64: 1e-9, torch.float32: 2e-4}


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    monkeypatch.setattr(online, "TILE_ELEMENTS", 40)


def _problem(seed: int, dtype: torch.dtype, B: int = 3, n: int = 13, m: int = 9, d: int = 5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, n, d, generator=g, dtype=dtype)
    y = torch.randn(B, m, d, generator=g, dtype=dtype)
    xm = torch.ones(B, n, dtype=torch.bool)
    ym = torch.ones(B, m, dtype=torch.bool)
    xm[1, 7:] = False  # ragged
    ym[0, 4:] = False
    if B > 2:
        xm[2] = False  # a fully masked problem
    up = torch.randn(B, generator=g, dtype=dtype)
    return x, y, xm, ym, up


def _run(backend: str, x, y, xm, ym, up, **kw):  # noqa: ANN001, ANN003, ANN202
    xx, yy = x.clone().requires_grad_(), y.clone().requires_grad_()
    loss = ok.sinkhorn_loss(xx, yy, x_mask=xm, y_mask=ym, backend=backend, reduction="none",
                            **kw)
    (loss * up).sum().backward()
    return loss.detach(), xx.grad, yy.grad


def _close(got, want, tol):  # noqa: ANN001, ANN202
    for g, w in zip(got, want, strict=True):
        assert torch.isfinite(g).all()
        scale = float(w.abs().max()) + 1e-12
        assert float((g - w).abs().max()) <= tol * scale, (float((g - w).abs().max()), scale)


@pytest.mark.parametrize("cost", COSTS)
@pytest.mark.parametrize("grad", GRADS)
@pytest.mark.parametrize("rho", [None, 1.0])
def test_matches_oracle_fp64(cost, grad, rho):
    args = _problem(hash((cost, grad, rho)) % 1000, torch.float64)
    for objective in ("entropic", "linear", "divergence"):
        kw = dict(cost=cost, grad=grad, rho=rho, objective=objective, eps=0.3, max_iter=30,
                  tol=0.0)
        _close(_run("online", *args, **kw), _run("torch", *args, **kw), TOL[torch.float64])


@pytest.mark.parametrize("grad", GRADS)
def test_matches_oracle_fp32_with_stopping_rule(grad):
    args = _problem(7, torch.float32, B=2, n=33, m=7, d=4)
    kw = dict(cost="cosine", grad=grad, eps=0.1, max_iter=200, tol=1e-4, check_every=5)
    _close(_run("online", *args, **kw), _run("torch", *args, **kw), TOL[torch.float32])


@pytest.mark.parametrize("grad", GRADS)
def test_given_cost_matches_oracle(grad):
    C = torch.rand(2, 11, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    up = torch.tensor([0.7, -1.3], dtype=torch.float64)
    got, want = [], []
    for backend, sink in (("online", got), ("torch", want)):
        Cc = C.clone().requires_grad_()
        res = ok.solve(Cc, eps=0.1, grad=grad, backend=backend, max_iter=50, rho=0.5)
        (res.value * up).sum().backward()
        sink += [res.value.detach(), *(p.detach() for p in res.potentials), Cc.grad]
    _close(got, want, TOL[torch.float64])


def test_sizes_one_and_empty():
    for n, m in ((1, 1), (1, 127), (127, 1)):
        x, y = torch.randn(2, n, 3, dtype=torch.float64), torch.randn(2, m, 3, dtype=torch.float64)
        a = ok.sinkhorn_loss(x, y, backend="online", reduction="none")
        b = ok.sinkhorn_loss(x, y, backend="torch", reduction="none")
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)
    x = torch.randn(1, 0, 3, requires_grad=True)
    loss = ok.sinkhorn_loss(x, torch.randn(1, 4, 3), backend="online")
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.isfinite(x.grad).all()


def _peaks(n: int, grad: str) -> tuple[int, int, SolverOut]:
    """Peak live bytes of forward_sample and of backward_sample at n = m (d = 8, fp64)."""
    d = 8
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, n, d, generator=g, dtype=torch.float64)
    y = torch.randn(1, n, d, generator=g, dtype=torch.float64)
    a = torch.full((1, n), 1.0 / n, dtype=torch.float64)
    cfg = SolverConfig(eps=0.5, max_iter=6, tol=0.0, grad=grad, cg_max_iter=4)
    with PeakLiveBytes(ignore=(x, y, a)) as mode:
        out = online.forward_sample(x, y, a, a, "sqeuclidean", cfg)
    fwd = mode.peak
    one = torch.ones(1, dtype=torch.float64)
    with PeakLiveBytes(ignore=(x, y, a, out, one)) as mode:
        dx, dy = online.backward_sample(x, y, a, a, "sqeuclidean", out, one, one, cfg, True)
    assert torch.isfinite(dx).all() and torch.isfinite(dy).all()
    C = torch.cdist(x, y).square()
    assert torch.allclose(out.value, reference.forward(C, a, a, cfg).value, rtol=1e-10)
    return fwd, mode.peak, out


@pytest.mark.parametrize("grad", ["envelope", "implicit"])
def test_no_dense_buffer(grad, monkeypatch):
    """With a fixed tile, doubling n = m quadruples an [n, m] buffer but the online backend's
    peak live bytes (forward, backward) grow like n + m; and they stay far below one [n, m]."""
    monkeypatch.setattr(online, "TILE_ELEMENTS", 4096)
    small, large = _peaks(256, grad), _peaks(512, grad)
    dense = 512 * 512 * 8
    for s_peak, l_peak in zip(small[:2], large[:2], strict=True):
        assert l_peak < 2.5 * s_peak, (s_peak, l_peak)
        assert l_peak < dense / 4, (l_peak, dense)
