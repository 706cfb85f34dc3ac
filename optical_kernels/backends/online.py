"""The ``online`` backend: Sinkhorn on points without an [n, m] matrix (plain PyTorch, any device).

For problems too large for a dense cost (n = m = 32,768 is 4.3 GB per [n, m] float32 matrix,
and a dense solver keeps two) the cost is recomputed tile by tile from the points, as KeOps
and GeomLoss's ``online`` backend do: memory O(B·(n + m)·d) plus one tile of at most
:data:`TILE_ELEMENTS` entries (``OPTICAL_KERNELS_ONLINE_TILE`` overrides), never O(n·m).

One pass over the row tiles ``C[:, i0:i1, :]`` per iteration does both half-steps of the map
of :mod:`optical_kernels.config`: the tile's rows get their new ``f`` (an LSE over j inside
the tile), then the tile adds its rows to a running column LSE that gives the new ``g``
(``torch.logaddexp`` across tiles). The same row tiles serve the values, the marginal error,
the envelope and implicit gradients (each CG step streams ``P`` once) and the unrolled
gradient (the softmax weights of step t rebuilt from the stored potentials: the column
normaliser of the g-update is ``−g_t/(λε_t)``, the row normaliser of the f-update
``−f_t/(λε_t)``). A given cost matrix ``C`` (``forward``/``backward``) is tiled the same way,
which keeps one code path; there the memory gain is only in the work buffers.

Cost per iteration: per half-step one cost tile (a GEMM of 2·d flops per entry, computed as
:func:`optical_kernels.costs.cost_matrix` does, so the rounding is the oracle's) and one
``exp`` per entry — the price of O(n + m) memory against a dense solver.
The unrolled gradient streams the tiles once per iteration run, the implicit one once per
CG step. Speed is measured in ``bench/test_large.py``; correctness against the oracle in the
contract tests (``tests/test_online.py``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch

from ..config import SolverConfig, SolverOut
from ..constants import POINT_COSTS
from ..costs import _cost_forward, cost_vjp
from . import contract

NEG_INF = float("-inf")
#: entries of one cost tile (B·rows·m); 4 M float32 entries = 16 MiB
TILE_ELEMENTS = int(os.environ.get("OPTICAL_KERNELS_ONLINE_TILE", str(1 << 22)))


def is_available() -> tuple[bool, str]:
    """Always available (plain PyTorch)."""
    return True, f"plain PyTorch, cost recomputed in row tiles of <= {TILE_ELEMENTS} entries"


# --------------------------------------------------------------------------- tiles
def _row_ranges(B: int, n: int, m: int) -> Iterator[tuple[int, int]]:
    rows = max(1, TILE_ELEMENTS // max(1, B * m))
    for i0 in range(0, n, rows):
        yield i0, min(n, i0 + rows)


class _Cost:
    """The narrow primitive the solver loop is written over: row tiles of ``−C/ε + r_i + c_j``.

    From points, the tile of C is computed exactly as :func:`optical_kernels.costs.cost_matrix`
    computes it (same GEMM and rounding: the potentials stay consistent with the oracle's even
    where C/ε is ~1e9 and float32 cancellation is large), then scaled and biased in place; no
    cost tile outlives its use. A given matrix is sliced instead.
    """

    def __init__(self, a: torch.Tensor, *, C: torch.Tensor | None = None,
                 points: tuple[torch.Tensor, torch.Tensor, str] | None = None):
        self.C = C
        if points is not None:
            x, y, cost = points
            if cost not in POINT_COSTS:
                raise ValueError(f"cost must be one of {POINT_COSTS}, got {cost!r}")
            self.x, self.y, self.cost = x.to(a.dtype), y.to(a.dtype), cost

    def logits(self, i0: int, i1: int, eps: float, r: torch.Tensor | None,
               c: torch.Tensor | None) -> torch.Tensor:
        """``−C[:, i0:i1, :]/ε + r[:, i0:i1, None] + c[:, None, :]`` [B, i1−i0, m]
        (``r``/``c`` ``None``: no bias)."""
        if self.C is not None:
            z = self.C[:, i0:i1, :] / -eps
        else:
            z = _cost_forward(self.x[:, i0:i1].contiguous(), self.y, self.cost).div_(-eps)
        if r is not None:
            z.add_(r[:, i0:i1, None])
        if c is not None:
            z.add_(c[:, None, :])
        return z


def _lse(z: torch.Tensor, dim: int) -> torch.Tensor:
    """``logsumexp`` of a work tile along ``dim``, in place (``z`` is destroyed): 4 passes and
    no temporaries; an all −inf slice gives −inf."""
    top = z.amax(dim, keepdim=True)
    top = torch.where(torch.isfinite(top), top, 0.0)
    return z.sub_(top).exp_().sum(dim).log_().add_(top.squeeze(dim))


class _Weights:
    """Masks and log-weights of a padded batch (as the oracle defines them)."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor):
        self.va, self.vb = a > 0, b > 0
        self.nonempty = self.va.any(1) & self.vb.any(1)
        tiny = torch.finfo(a.dtype).tiny
        ne = self.nonempty[:, None]
        # the iteration's log-weights: −inf at padding, 0 everywhere for empty problems
        self.la = torch.where(ne, torch.where(self.va, a.clamp_min(tiny).log(), NEG_INF), 0.0)
        self.lb = torch.where(ne, torch.where(self.vb, b.clamp_min(tiny).log(), NEG_INF), 0.0)
        # the plan's: −inf at padding (so an empty problem's plan is 0)
        self.pa = torch.where(self.va, a.clamp_min(tiny).log(), NEG_INF)
        self.pb = torch.where(self.vb, b.clamp_min(tiny).log(), NEG_INF)


def _log_plan_tile(cost: _Cost, w: _Weights, f: torch.Tensor, g: torch.Tensor, eps: float,
                   i0: int, i1: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log P, C)`` on rows i0:i1, [B, r, m] each; log P is −inf at padded entries."""
    base = cost.logits(i0, i1, eps, None, None)  # −C/ε
    lp = base + (w.pa + f / eps)[:, i0:i1, None] + (w.pb + g / eps)[:, None, :]
    return lp, base.mul_(-eps)


# --------------------------------------------------------------------------- forward
def _solve(cost: _Cost, a: torch.Tensor, b: torch.Tensor, cfg: SolverConfig) -> SolverOut:
    B, n = a.shape
    m = b.shape[1]
    if B == 0 or n == 0 or m == 0:
        return contract.empty_out(B, n, m, a.dtype, a.device, cfg)
    w = _Weights(a, b)
    ranges = list(_row_ranges(B, n, m))
    f, g = a.new_zeros(B, n), a.new_zeros(B, m)
    active = w.nonempty.clone()
    n_iters = torch.zeros(B, dtype=torch.int32, device=a.device)
    hist_f: list[torch.Tensor] = []
    hist_g: list[torch.Tensor] = []
    for t in range(1, cfg.max_iter + 1):
        eps_t = cfg.eps_at(t)
        lam = cfg.damping(eps_t)
        f_new = torch.empty_like(f)
        cb = w.lb + g / eps_t
        col = a.new_full((B, m), NEG_INF)
        for i0, i1 in ranges:  # one cost tile per row block and iteration, both half-steps
            base = cost.logits(i0, i1, eps_t, None, None)  # −C/ε_t
            # f_i = −λε LSE_j[lb_j + (g_j − C_ij)/ε]
            fr = _lse(base + cb[:, None, :], 2).mul_(-lam * eps_t)
            f_new[:, i0:i1] = fr
            # g_j = −λε LSE_i[la_i + (f_i − C_ij)/ε], merged over the row tiles
            rb = w.la[:, i0:i1] + fr / eps_t
            col = torch.logaddexp(col, _lse(base.add_(rb[:, :, None]), 1))
        g_new = -lam * eps_t * col
        f = torch.where(active[:, None], f_new, f)
        g = torch.where(active[:, None], g_new, g)
        n_iters += active.to(torch.int32)
        if cfg.grad == "unrolled":
            hist_f.append(f)
            hist_g.append(g)
        if cfg.tol > 0 and t % cfg.check_every == 0 and eps_t == cfg.eps:
            err = _summary(cost, ranges, a, b, w, f, g, cfg)[2]
            active = active & (err >= cfg.tol)
            if t % (4 * cfg.check_every) == 0 and not bool(active.any()):
                break  # one host sync every 4 checks (as the oracle)
    keep_f, keep_g = w.va & w.nonempty[:, None], w.vb & w.nonempty[:, None]
    f, g = torch.where(keep_f, f, 0.0), torch.where(keep_g, g, 0.0)
    value, value_linear, err = _summary(cost, ranges, a, b, w, f, g, cfg)
    history = (torch.stack(hist_f), torch.stack(hist_g)) if hist_f else None
    return SolverOut(f, g, value, value_linear, n_iters, err, history)


def _summary(cost: _Cost, ranges: list[tuple[int, int]], a: torch.Tensor, b: torch.Tensor,
             w: _Weights, f: torch.Tensor, g: torch.Tensor, cfg: SolverConfig
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(value, value_linear, err)`` [B] of potentials ``f``, ``g`` in one pass over the tiles
    (the oracle's ``values`` and ``marginal_error``)."""
    B, n = a.shape
    m = b.shape[1]
    eps, rho = cfg.eps, cfg.rho
    lin = a.new_zeros(B)
    klsum = a.new_zeros(B)
    mass = a.new_zeros(B)
    log_r = a.new_full((B, n), NEG_INF)
    log_c = a.new_full((B, m), NEG_INF)
    for i0, i1 in ranges:
        lp, Ct = _log_plan_tile(cost, w, f, g, eps, i0, i1)
        P = lp.exp()
        lin += (P * Ct).sum((1, 2))
        klsum += (P * (f[:, i0:i1, None] + g[:, None, :] - Ct)).sum((1, 2))
        mass += P.sum((1, 2))
        log_r[:, i0:i1] = torch.logsumexp(lp, 2)
        log_c = torch.logaddexp(log_c, torch.logsumexp(lp, 1))
    value = lin + eps * (klsum / eps - mass + a.sum(1) * b.sum(1))
    keep_r = w.va & w.nonempty[:, None]
    r = torch.where(keep_r, log_r.exp(), 0.0)
    target = a if rho is None else a * torch.exp(-f / rho)
    err = torch.where(keep_r, (r - target).abs(), 0.0).sum(1)
    if rho is not None:
        denom = torch.maximum(r.sum(1), torch.where(keep_r, target, 0.0).sum(1))
        err = torch.where(denom > 0, err / torch.where(denom > 0, denom, 1.0), 0.0)
        for log_marg, wt, valid in ((log_r, a, w.va), (log_c, b, w.vb)):
            keep = valid & w.nonempty[:, None]
            lm = torch.where(keep, log_marg, 0.0)
            lw = torch.where(keep, wt.clamp_min(torch.finfo(wt.dtype).tiny).log(), 0.0)
            marg = lm.exp()
            value = value + rho * torch.where(keep, marg * (lm - lw) - marg + wt, 0.0).sum(1)
    zero = torch.zeros_like(value)
    ne = w.nonempty
    return torch.where(ne, value, zero), torch.where(ne, lin, zero), torch.where(ne, err, zero)


def forward(C: torch.Tensor, a: torch.Tensor, b: torch.Tensor, cfg: SolverConfig) -> SolverOut:
    """Solve a padded batch, ``C`` [B, n, m] given (tiled like the points path)."""
    return _solve(_Cost(a, C=C), a, b, cfg)


def forward_sample(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                   cost: str, cfg: SolverConfig) -> SolverOut:
    """Solve ``C = cost(x, y)`` for x [B, n, d], y [B, m, d] without materialising C."""
    return _solve(_Cost(a, points=(x, y, cost)), a, b, cfg)


# --------------------------------------------------------------------------- backward
class _GradSink:
    """Receives ``∂L/∂C`` one row tile at a time: a dense [B, n, m] buffer (given-cost path)
    or the cost's chain rule into ``dx`` [B, n, d] / ``dy`` [B, m, d] (points path)."""

    def __init__(self, B: int, n: int, m: int, like: torch.Tensor,
                 points: tuple[torch.Tensor, torch.Tensor, str, bool] | None):
        self.points = points
        if points is None:
            self.dC = like.new_zeros(B, n, m)
        else:
            x, y, _, need_dy = points
            self.dx = x.new_zeros(x.shape)
            self.dy = y.new_zeros(y.shape) if need_dy else None

    def add(self, i0: int, i1: int, G: torch.Tensor) -> None:
        if self.points is None:
            self.dC[:, i0:i1] += G
            return
        x, y, cost, need_dy = self.points
        dx, dy = cost_vjp(G, x[:, i0:i1].contiguous(), y, cost, need_dy)
        self.dx[:, i0:i1] += dx
        if need_dy:
            self.dy += dy


def _backward(cost: _Cost, a: torch.Tensor, b: torch.Tensor, out: SolverOut,
              gv: torch.Tensor, gvl: torch.Tensor, cfg: SolverConfig, sink: _GradSink) -> None:
    B, n = a.shape
    m = b.shape[1]
    if B == 0 or n == 0 or m == 0:
        return  # nothing to differentiate: the sink's zeros
    w = _Weights(a, b)
    ranges = list(_row_ranges(B, n, m))
    if cfg.grad == "envelope":
        for i0, i1 in ranges:
            P = _log_plan_tile(cost, w, out.f, out.g, cfg.eps, i0, i1)[0].exp_()
            sink.add(i0, i1, (gv + gvl)[:, None, None] * P)
    elif cfg.grad == "implicit":
        _implicit(cost, ranges, a, b, w, out, gv, gvl, cfg, sink)
    elif cfg.grad == "unrolled":
        _unrolled(cost, ranges, a, b, w, out, gv, gvl, cfg, sink)
    else:
        raise ValueError(f"grad must be one of envelope, implicit, unrolled; got {cfg.grad!r}")


def _implicit(cost: _Cost, ranges: list[tuple[int, int]], a: torch.Tensor, b: torch.Tensor,
              w: _Weights, out: SolverOut, gv: torch.Tensor, gvl: torch.Tensor,
              cfg: SolverConfig, sink: _GradSink) -> None:
    """The oracle's Jacobi-PCG (``implicit_linear_grad``) with ``P`` streamed per matvec."""
    B, n = a.shape
    m = b.shape[1]
    f, g, eps = out.f, out.g, cfg.eps

    def plan(i0: int, i1: int) -> tuple[torch.Tensor, torch.Tensor]:
        lp, Ct = _log_plan_tile(cost, w, f, g, eps, i0, i1)
        return lp.exp_(), Ct

    rhs_u, rhs_v = a.new_zeros(B, n), a.new_zeros(B, m)
    r, c = a.new_zeros(B, n), a.new_zeros(B, m)
    for i0, i1 in ranges:
        P, Ct = plan(i0, i1)
        PC = P * Ct
        rhs_u[:, i0:i1] = PC.sum(2)
        rhs_v += PC.sum(1)
        r[:, i0:i1] = P.sum(2)
        c += P.sum(1)
    kappa = 1.0 if cfg.rho is None else 1.0 + cfg.eps / cfg.rho
    r, c = kappa * r, kappa * c
    tiny = torch.finfo(a.dtype).tiny
    va, vb = w.va, w.vb
    du = torch.where(va & (r > tiny), r, torch.ones_like(r))
    dv = torch.where(vb & (c > tiny), c, torch.ones_like(c))

    def matvec(u: torch.Tensor, v: torch.Tensor, _: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        pv, ptu = a.new_zeros(B, n), a.new_zeros(B, m)
        for i0, i1 in ranges:
            P, _ = plan(i0, i1)
            pv[:, i0:i1] = torch.einsum("bij,bj->bi", P, v)
            ptu += torch.einsum("bij,bi->bj", P, u[:, i0:i1])
        return torch.where(va, r * u + pv, u), torch.where(vb, c * v + ptu, v)

    max_iter, tol = cfg.cg_limits(n, m, a.dtype, streamed=True)  # each CG step streams P
    u, v = contract.jacobi_pcg(matvec, rhs_u, rhs_v, du, dv,
                               torch.zeros(B, dtype=torch.bool, device=a.device), max_iter, tol)
    for i0, i1 in ranges:
        P, Ct = plan(i0, i1)
        lin = P * (1.0 + (u[:, i0:i1, None] + v[:, None, :] - Ct) / eps)
        sink.add(i0, i1, gv[:, None, None] * P + gvl[:, None, None] * lin)


def _unrolled(cost: _Cost, ranges: list[tuple[int, int]], a: torch.Tensor, b: torch.Tensor,
              w: _Weights, out: SolverOut, gv: torch.Tensor, gvl: torch.Tensor,
              cfg: SolverConfig, sink: _GradSink) -> None:
    """The oracle's reverse pass (``_unrolled``), one tile pass per iteration run."""
    B, n = a.shape
    m = b.shape[1]
    eps, rho, f, g = cfg.eps, cfg.rho, out.f, out.g
    # partials of the values at fixed potentials (the oracle's values_vjp), tile by tile
    log_r, log_c = a.new_full((B, n), NEG_INF), a.new_full((B, m), NEG_INF)
    if rho is not None:
        for i0, i1 in ranges:
            lp = _log_plan_tile(cost, w, f, g, eps, i0, i1)[0]
            log_r[:, i0:i1] = torch.logsumexp(lp, 2)
            log_c = torch.logaddexp(log_c, torch.logsumexp(lp, 1))
    ell_r, ell_c = a.new_zeros(B, n), a.new_zeros(B, m)
    if rho is not None:
        for ell, log_marg, wt, valid in ((ell_r, log_r, a, w.va), (ell_c, log_c, b, w.vb)):
            keep = valid & w.nonempty[:, None]
            lw = torch.where(keep, wt.clamp_min(torch.finfo(wt.dtype).tiny).log(), 0.0)
            ell.copy_(torch.where(keep, rho * (torch.where(keep, log_marg, 0.0) - lw), 0.0))
    gv3, gvl3 = gv[:, None, None], gvl[:, None, None]
    fbar, gbar = a.new_zeros(B, n), a.new_zeros(B, m)
    dC_t: dict[tuple[int, int], torch.Tensor] = {}
    for i0, i1 in ranges:
        lp, Ct = _log_plan_tile(cost, w, f, g, eps, i0, i1)
        P = lp.exp_()
        S = f[:, i0:i1, None] + g[:, None, :] + ell_r[:, i0:i1, None] + ell_c[:, None, :]
        PQ = P * (gvl3 * Ct + gv3 * S) / eps
        fbar[:, i0:i1] = PQ.sum(2)
        gbar += PQ.sum(1)
        dC_t[(i0, i1)] = (gv3 + gvl3) * P - PQ
    if out.history is not None:
        hist_f, hist_g = out.history
        n_iters = out.n_iters
        last = min(hist_f.shape[0], int(n_iters.max())) if n_iters.numel() else 0
        for t in range(last, 0, -1):
            act = (n_iters >= t)[:, None]
            eps_t = cfg.eps_at(t)
            lam = cfg.damping(eps_t)
            f_t = hist_f[t - 1]
            g_t = hist_g[t - 1]
            g_prev = hist_g[t - 2] if t >= 2 else torch.zeros_like(hist_g[0])
            gb = torch.where(act, gbar, 0.0)
            gbar = torch.where(act, 0.0, gbar)
            # normalisers of the two softmaxes: LSE = −potential/(λ ε_t) for active problems
            col_norm = torch.where(act, -g_t / (lam * eps_t), 0.0)
            row_norm = torch.where(act, -f_t / (lam * eps_t), 0.0)
            rb_t = w.la + f_t / eps_t
            cb_t = w.lb + g_prev / eps_t
            for i0, i1 in ranges:
                Tw = cost.logits(i0, i1, eps_t, rb_t, -col_norm).exp_()
                Tw = torch.where(act[:, :, None], Tw, 0.0)
                fb_tile = fbar[:, i0:i1] - lam * torch.einsum("bij,bj->bi", Tw, gb)
                Sw = cost.logits(i0, i1, eps_t, -row_norm, cb_t).exp_()
                Sw = torch.where(act[:, :, None], Sw, 0.0)
                fb = torch.where(act, fb_tile, 0.0)
                dC_t[(i0, i1)] = dC_t[(i0, i1)] + lam * (Tw * gb[:, None, :] + Sw * fb[:, :, None])
                gbar = gbar - lam * torch.einsum("bij,bi->bj", Sw, fb)
                fbar[:, i0:i1] = torch.where(act, 0.0, fb_tile)
    for i0, i1 in ranges:
        mask = (w.va & w.nonempty[:, None])[:, i0:i1, None] & w.vb[:, None, :]
        sink.add(i0, i1, torch.where(mask, dC_t[(i0, i1)], 0.0))


def backward(C: torch.Tensor, a: torch.Tensor, b: torch.Tensor, out: SolverOut,
             grad_value: torch.Tensor, grad_value_linear: torch.Tensor,
             cfg: SolverConfig) -> torch.Tensor:
    """``∂L/∂C`` [B, n, m] for ``cfg.grad`` (the oracle's contract), tile by tile."""
    B, n, m = C.shape
    sink = _GradSink(B, n, m, C, None)
    _backward(_Cost(a, C=C), a, b, out, grad_value, grad_value_linear, cfg, sink)
    return sink.dC


def backward_sample(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                    cost: str, out: SolverOut, grad_value: torch.Tensor,
                    grad_value_linear: torch.Tensor, cfg: SolverConfig, need_dy: bool
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(∂L/∂x [B, n, d], ∂L/∂y [B, m, d] or None)`` without materialising C or ∂L/∂C."""
    B, n = a.shape
    m = b.shape[1]
    xw, yw = x.to(a.dtype), y.to(a.dtype)
    sink = _GradSink(B, n, m, a, (xw, yw, cost, need_dy))
    _backward(_Cost(a, points=(x, y, cost)), a, b, out, grad_value, grad_value_linear, cfg, sink)
    return sink.dx.to(x.dtype), (None if sink.dy is None else sink.dy.to(y.dtype))
