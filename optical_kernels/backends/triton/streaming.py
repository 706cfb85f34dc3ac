"""The streaming Triton solver for large problems, any n, m (docs/design.md §5, "Streaming").

Flash-style: every pass is one launch with one program per (row block, problem) that loops
over column tiles, recomputing the cost tile on the fly — from points (``x·yᵀ`` on ``tl.dot``
plus per-point norms: cosine, sqeuclidean, dot) or by reading a given ``C`` tile-wise. No
``(B, n, m)`` tensor is ever allocated by the sample path: memory is ``O(B·(n+m)·d)``.

Files, by role: :mod:`.streaming_kernels` (the two ``@triton.jit`` kernels, ``_lse_kernel``
and ``_plan_kernel``, and their maths), :mod:`.streaming_passes` (:class:`Problem`: the host
launchers), this module (the public entry points and the forward solve),
:mod:`.streaming_backward` (the gradients), :mod:`.launch` (:class:`Tiles`, the block sizes).

Public functions follow the backend contract (:mod:`optical_kernels.backends.contract`):
:func:`forward`, :func:`backward`, :func:`forward_sample`, :func:`backward_sample`. Each takes
an optional ``tiles=`` (:class:`Tiles`) to force block sizes (tests use 16 to exercise many
tiles).

Passes (each streams the n×m tile grid once; grid = (⌈rows/block_r⌉, B[, d-chunks])):

* forward: 2 per iteration, +1 per convergence check (tol > 0), +2 at the end (value, err);
* envelope: 1 (dx or dC), +1 for dy;
* implicit: 2 (P1, (P∘C)1 and transposed) + 2 per CG step (Jacobi PCG, at most
  ``cfg.cg_limits(n, m, dtype, streamed=True)`` steps: ``cg_max_iter``, by default
  min(4(n+m)+50, ``config.CG_STREAMED_CAP`` = 1000); a host check every
  ``CG_SYNC_EVERY`` steps ends the loop once every problem is done) + the G pass(es);
* unrolled: 2 direct (+2 LSE when unbalanced) + per stored iteration 2 (given C, G accumulated
  into dC) or 4 (points; each softmax renormalised in-pass, dy carried along).

Memory: O(B·(n+m)·d) besides the inputs (+ O(B·T·(n+m)) history for ``unrolled``); the given-C
backward writes the [B, n, m] dC it returns. Limits: B ≤ 65535 (grid axis 1),
B·max(n, m) < 2³¹ (per-point vectors use int32 offsets; C, x, y, dx use int64 offsets).
"""

from __future__ import annotations

import torch
import triton

from ...config import SolverConfig, SolverOut
from .. import contract
from .launch import DEFAULT_TILES, Tiles
from .streaming_backward import _backward
from .streaming_passes import COST_CODES, Problem

__all__ = [
    "COST_CODES",
    "DEFAULT_TILES",
    "Tiles",
    "forward",
    "backward",
    "forward_sample",
    "backward_sample",
    "is_available",
]


# ============================================================================ forward
def _row_err(
    prob: Problem, f: torch.Tensor, L: torch.Tensor, eps: float, rho: float | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(err [B], r [B, n], log r [B, n]) from the row LSE ``L`` of the current g."""
    a = prob.a
    valid = prob.rows.valid & prob.nonempty[:, None]
    log_r = torch.where(valid, torch.log(torch.where(valid, a, 1.0)) + f / eps + L, 0.0)
    r = torch.where(valid, torch.exp(log_r), 0.0)
    target = a if rho is None else a * torch.exp(-f / rho)
    err = torch.where(valid, (r - target).abs(), 0.0).sum(1)
    if rho is not None:  # relative to the mass (config.py)
        denom = torch.maximum(r.sum(1), torch.where(valid, target, 0.0).sum(1))
        err = torch.where(denom > 0, err / torch.where(denom > 0, denom, 1.0), 0.0)
    return err, r, log_r


def _solve(prob: Problem, cfg: SolverConfig) -> SolverOut:
    """The iteration map of :mod:`optical_kernels.config` with streamed half-steps."""
    B, n, m, dt, dev = prob.B, prob.n, prob.m, prob.dtype, prob.device
    f = torch.zeros(B, n, dtype=dt, device=dev)
    g = torch.zeros(B, m, dtype=dt, device=dev)
    active = prob.ne_i32.clone()
    stopped = torch.zeros(B, dtype=torch.int32, device=dev)
    unrolled = cfg.grad == "unrolled"
    if unrolled:
        hist_f = torch.zeros(cfg.max_iter, B, n, dtype=dt, device=dev)
        hist_g = torch.zeros(cfg.max_iter, B, m, dtype=dt, device=dev)
    L = torch.zeros(B, n, dtype=dt, device=dev)
    for t in range(1, cfg.max_iter + 1):
        eps_t = cfg.eps_at(t)
        lam = cfg.damping(eps_t)
        prob.lse(True, g, f, eps_t, lam, act=active)
        prob.lse(False, f, g, eps_t, lam, act=active)
        if unrolled:
            hist_f[t - 1].copy_(f)
            hist_g[t - 1].copy_(g)
        if cfg.tol > 0 and t % cfg.check_every == 0 and eps_t == cfg.eps:
            prob.lse(True, g, L, cfg.eps, act=active, stats=True)
            err, _, _ = _row_err(prob, f, L, cfg.eps, cfg.rho)
            newly = (active > 0) & (err < cfg.tol)
            stopped.masked_fill_(newly, t)
            active.masked_fill_(newly, 0)
    n_iters = torch.where(active > 0, cfg.max_iter, stopped).to(torch.int32)
    value, value_linear, err = _values(prob, f, g, cfg.eps, cfg.rho)
    history = (hist_f, hist_g) if unrolled else None
    return SolverOut(f, g, value, value_linear, n_iters, err, history)


def _values(
    prob: Problem, f: torch.Tensor, g: torch.Tensor, eps: float, rho: float | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(value, value_linear, err) [B] from two statistics passes (config.py formulas).

    With r = P1, c = Pᵀ1 (log-domain), c̄_i the P-weighted mean cost of row i:
    ``value_linear = Σ r c̄``, ``value = Σ r f + Σ c g − ε(Σr − Σa Σb) [+ ρ KL(r‖a) + ρ KL(c‖b)]``.
    """
    B, n, m, dt, dev = prob.B, prob.n, prob.m, prob.dtype, prob.device
    L = torch.zeros(B, n, dtype=dt, device=dev)
    cbar = torch.zeros(B, n, dtype=dt, device=dev)
    Lc = torch.zeros(B, m, dtype=dt, device=dev)
    prob.lse(True, g, L, eps, stats=True, cbar=cbar)
    prob.lse(False, f, Lc, eps, stats=True)
    L = torch.where(prob.nonempty[:, None], L, 0.0)
    Lc = torch.where(prob.nonempty[:, None], Lc, 0.0)
    cbar = torch.where(prob.nonempty[:, None], cbar, 0.0)
    err, r, log_r = _row_err(prob, f, L, eps, rho)
    vc = prob.cols.valid & prob.nonempty[:, None]
    b = prob.b
    log_c = torch.where(vc, torch.log(torch.where(vc, b, 1.0)) + g / eps + Lc, 0.0)
    c = torch.where(vc, torch.exp(log_c), 0.0)
    value_linear = (r * cbar).sum(1)
    value = (r * f).sum(1) + (c * g).sum(1) - eps * (r.sum(1) - prob.a.sum(1) * b.sum(1))
    if rho is not None:
        va = prob.rows.valid & prob.nonempty[:, None]
        la = torch.log(torch.where(va, prob.a, 1.0))
        lb = torch.log(torch.where(vc, b, 1.0))
        kl_r = torch.where(va, r * (log_r - la) - r + prob.a, 0.0).sum(1)
        kl_c = torch.where(vc, c * (log_c - lb) - c + b, 0.0).sum(1)
        value = value + rho * (kl_r + kl_c)
    zero = torch.zeros_like(value)
    ne = prob.nonempty
    return torch.where(ne, value, zero), torch.where(ne, value_linear, zero), \
        torch.where(ne, err, zero)


def forward(
    C: torch.Tensor, a: torch.Tensor, b: torch.Tensor, cfg: SolverConfig,
    tiles: Tiles | None = None,
) -> SolverOut:
    """Solve on a given cost C [B, n, m] (read tile-wise, never copied), a [B, n], b [B, m]."""
    contract.check_cost_matrix(C)
    B, n, m = C.shape
    contract.check_weights(a, b, B, n, m)
    dt = contract.compute_dtype(C.dtype, a.dtype)
    if B == 0 or n == 0 or m == 0:
        return contract.empty_out(B, n, m, dt, C.device, cfg)
    return _solve(Problem(a, b, C=C, tiles=tiles), cfg)


def forward_sample(
    x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor, cost: str,
    cfg: SolverConfig, tiles: Tiles | None = None,
) -> SolverOut:
    """Solve with the cost fused from x [B, n, d], y [B, m, d]; memory O(B·(n+m)·d)."""
    contract.check_points(x, y)
    B, n, _ = x.shape
    m = y.shape[1]
    contract.check_weights(a, b, B, n, m)
    contract.check_cost(cost)
    dt = contract.compute_dtype(x.dtype, a.dtype)
    if B == 0 or n == 0 or m == 0:
        return contract.empty_out(B, n, m, dt, x.device, cfg)
    return _solve(Problem(a, b, x=x, y=y, cost=cost, tiles=tiles), cfg)


# ============================================================================ backward
def backward(
    C: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    out: SolverOut,
    grad_value: torch.Tensor,
    grad_value_linear: torch.Tensor,
    cfg: SolverConfig,
    tiles: Tiles | None = None,
) -> torch.Tensor:
    """``∂(Σ_k gv_k value_k + gl_k value_linear_k)/∂C`` [B, n, m], written tile-wise."""
    contract.check_grad(cfg)
    contract.check_cost_matrix(C)
    B, n, m = C.shape
    contract.check_weights(a, b, B, n, m)
    if B == 0 or n == 0 or m == 0:
        dt = contract.compute_dtype(C.dtype, a.dtype)
        return torch.zeros(B, n, m, dtype=dt, device=C.device)
    prob = Problem(a, b, C=C, tiles=tiles)
    return _backward(prob, out, grad_value, grad_value_linear, cfg, need_dy=False).dC


def backward_sample(
    x: torch.Tensor,
    y: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    cost: str,
    out: SolverOut,
    grad_value: torch.Tensor,
    grad_value_linear: torch.Tensor,
    cfg: SolverConfig,
    need_dy: bool,
    tiles: Tiles | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(dx [B, n, d], dy [B, m, d] or None) via the fused chain rule; G never materialised."""
    contract.check_grad(cfg)
    contract.check_points(x, y)
    B, n, _ = x.shape
    m = y.shape[1]
    contract.check_weights(a, b, B, n, m)
    contract.check_cost(cost)
    if B == 0 or n == 0 or m == 0:
        return torch.zeros_like(x), (torch.zeros_like(y) if need_dy else None)
    prob = Problem(a, b, x=x, y=y, cost=cost, tiles=tiles)
    sink = _backward(prob, out, grad_value, grad_value_linear, cfg, need_dy)
    dx = sink.dx.to(x.dtype)
    dy = sink.dy.to(y.dtype) if need_dy else None
    return dx, dy


def is_available() -> tuple[bool, str]:
    """Triton importable (GPU use additionally needs CUDA tensors or TRITON_INTERPRET=1)."""
    return True, f"triton {triton.__version__}"
