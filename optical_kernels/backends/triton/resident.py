"""Resident Sinkhorn kernel: one Triton program per problem, the whole batch in one launch.

Each program loads its problem's weights, builds the cost tile ``C`` [BN, BM] once (given, or
fused from the points with ``tl.dot``, fp32 accumulation; fp64 for fp64 inputs), runs every
iteration of the map of :mod:`optical_kernels.config` on chip, tests its own convergence every
``check_every`` iterations and writes f, g, value, value_linear, n_iters, err (and, for the
unrolled gradient, the potentials of every iteration). No host synchronisation.

Numerics (docs/design.md §2): everything is computed in base 2 (``exp2``/``log2``, one FMA fewer per
entry) in the accumulation dtype ``ACC`` (fp32; fp64 for fp64 inputs). Every exponential is
shifted by its row/column maximum; padded rows/columns carry ``log2 w = NEG`` (a finite
−1e30, so no ``inf − inf``) and their cost entries are replaced by 0, so garbage there can
never leak into a valid entry.

Two iteration forms behind one interface (constexpr ``SCALING``, docs/design.md §5):

* log domain (default):  with ``k = log2(e)/ε_t``, ``L_i = LSE2_j[log2 b_j + (g_j − C_ij)k]``::

      f = −λ L / k,     g = −λ LSE2_i[log2 a_i + (f_i − C_ij)k] / k

  2·n·m exponentials per iteration. The row LSE of the next f-update is computed at the end
  of each iteration and reused by the convergence test (same ε once ε-scaling is over).
* stabilised scaling (Schmitzer 2019): with absorbed potentials f̃, g̃ and the plan tile
  ``P̃ = a⊗b·exp((f̃⊕g̃ − C)/ε)``, iterate ``u = a / (P̃ v)``, ``v = b / (P̃ᵀ u)`` (unbalanced:
  ``log2 u = −λ(log2(P̃v) − log2 a) − (1−λ) f̃ k``): FMA-only matvecs. When u or v leave
  ``[2^-A, 2^A]`` (or are not finite) the iteration is redone in the log domain and absorbed
  (``f̃ ← f``, ``u ← 1``, ``P̃`` rebuilt: one exp pass). Iterations of the ε-schedule are log
  iterations. Same fixed point, same map up to rounding, same stopping rule.

Shared ``@triton.jit`` helpers (weights, cost tile, LSE) are also used by
:mod:`optical_kernels.backends.triton.backward`.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import triton
import triton.language as tl
from torch import Tensor

from ...config import SolverConfig
from ...constants import Cost, cost_code
from . import launch

# log2-weight of padded positions: finite (no inf − inf), and exp2(NEG + anything finite) == 0
NEG = tl.constexpr(-1.0e30)
# the codes of constants.Cost as the kernels compare them (COST is a tl.constexpr argument)
GIVEN = tl.constexpr(int(Cost.GIVEN))
COSINE = tl.constexpr(int(Cost.COSINE))
SQEUCLIDEAN = tl.constexpr(int(Cost.SQEUCLIDEAN))


# ----------------------------------------------------------------------------- jit helpers
@triton.jit
def _weights(w_ptr, s_w, size, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """Weights [BLOCK] of one problem -> (w, valid, log2 w or NEG, extent, total)."""
    offs = tl.arange(0, BLOCK)
    w = tl.load(w_ptr + offs * s_w, mask=offs < size, other=0.0).to(ACC)
    valid = w > 0
    lw2 = tl.where(valid, tl.log2(tl.where(valid, w, 1.0)), NEG)
    extent = tl.max(tl.where(valid, offs + 1, 0), axis=0)  # 1 + last valid index
    total = tl.sum(tl.where(valid, w, 0.0), axis=0)
    return w, valid, lw2, extent, total


@triton.jit
def _pair(hi, lo, ACC: tl.constexpr):
    """A host float passed as an fp32 (hi, lo) pair -> ACC scalar (≈48 bits when ACC=fp64)."""
    return tl.cast(hi, ACC) + tl.cast(lo, ACC)


@triton.jit
def _cost_tile(
    C_ptr, x_ptr, y_ptr, pid, n_k, m_k, d,
    s_cb, s_cn, s_cm, s_xb, s_xn, s_xd, s_yb, s_ym, s_yd,
    COST: tl.constexpr, ACC: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr,
    BD: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    """Cost tile [BN, BM] of problem ``pid`` and the point norms.

    COST: 0 given C, 1 cosine ``1 − x·y/(max‖x‖,1e-8)(max‖y‖,1e-8)``, 2 sqeuclidean
    ``max(‖x‖² + ‖y‖² − 2x·y, 0)``, 3 dot ``−x·y``. Returns ``(C, xx, yy)`` where ``xx``,
    ``yy`` are the squared norms (zeros for a given C). Rows ≥ n_k / columns ≥ m_k are not
    loaded (zero).
    """
    offs_n = tl.arange(0, BN)
    offs_m = tl.arange(0, BM)
    rn = offs_n < n_k
    rm = offs_m < m_k
    pid64 = pid.to(tl.int64)
    xx = tl.zeros([BN], dtype=ACC)
    yy = tl.zeros([BM], dtype=ACC)
    if COST == GIVEN:
        ptrs = C_ptr + pid64 * s_cb + offs_n[:, None] * s_cn + offs_m[None, :] * s_cm
        C = tl.load(ptrs, mask=rn[:, None] & rm[None, :], other=0.0).to(ACC)
    else:
        xy = tl.zeros([BN, BM], dtype=ACC)
        xb = x_ptr + pid64 * s_xb
        yb = y_ptr + pid64 * s_yb
        for d0 in range(0, d, BD):
            offs_d = d0 + tl.arange(0, BD)
            md = offs_d < d
            xt = tl.load(xb + offs_n[:, None] * s_xn + offs_d[None, :] * s_xd,
                         mask=rn[:, None] & md[None, :], other=0.0)
            yt = tl.load(yb + offs_m[:, None] * s_ym + offs_d[None, :] * s_yd,
                         mask=rm[:, None] & md[None, :], other=0.0)
            xf = xt.to(ACC)
            yf = yt.to(ACC)
            if UPCAST:  # interpreter: its 16-bit tl.dot is wrong, the fp32 one is exact here
                xy = tl.dot(xf, tl.trans(yf), acc=xy, input_precision=PREC, out_dtype=ACC)
            else:
                xy = tl.dot(xt, tl.trans(yt), acc=xy, input_precision=PREC, out_dtype=ACC)
            xx += tl.sum(xf * xf, axis=1)
            yy += tl.sum(yf * yf, axis=1)
        if COST == COSINE:
            nx = tl.maximum(tl.sqrt(xx), 1e-8)
            ny = tl.maximum(tl.sqrt(yy), 1e-8)
            C = 1.0 - xy / (nx[:, None] * ny[None, :])
            # ‖x‖ < 1e-8: no direction, x̂ = 0 (costs.py)
            C = tl.where((tl.sqrt(xx) < 1e-8)[:, None] | (tl.sqrt(yy) < 1e-8)[None, :], 1.0, C)
        elif COST == SQEUCLIDEAN:
            C = tl.maximum(xx[:, None] + yy[None, :] - 2.0 * xy, 0.0)
        else:
            C = -xy
    return C, xx, yy


@triton.jit
def _rel_err(err, r, target, va):
    """Unbalanced stopping error relative to the mass: ``err / max(Σ r, Σ target)``."""
    d = tl.maximum(tl.sum(tl.where(va, r, 0.0), axis=0), tl.sum(tl.where(va, target, 0.0), axis=0))
    return tl.where(d > 0, err / tl.where(d > 0, d, 1.0), 0.0)


@triton.jit
def _lse2_rows(z):
    """Row-wise base-2 log-sum-exp of z [BN, BM] -> [BN] (shifted by the row max)."""
    mx = tl.max(z, axis=1)
    return mx + tl.log2(tl.sum(tl.exp2(z - mx[:, None]), axis=1))


@triton.jit
def _lse2_cols(z):
    """Column-wise base-2 log-sum-exp of z [BN, BM] -> [BM]."""
    mx = tl.max(z, axis=0)
    return mx + tl.log2(tl.sum(tl.exp2(z - mx[None, :]), axis=0))


@triton.jit
def _eps_at(t, t_eps, eps, start, log2_factor):
    """ε_t = max(eps, start·factor^(t−1)): ``eps`` from iteration ``t_eps`` on (host-computed)."""
    return tl.where(t >= t_eps, eps, start * tl.exp2((t - 1) * log2_factor))


# ----------------------------------------------------------------------------- the kernel
@triton.jit
def resident_forward_kernel(
    C_ptr, x_ptr, y_ptr, a_ptr, b_ptr,
    f_ptr, g_ptr, val_ptr, vlin_ptr, nit_ptr, err_ptr, hf_ptr, hg_ptr,
    B, n, m, d,
    s_cb, s_cn, s_cm, s_xb, s_xn, s_xd, s_yb, s_ym, s_yd, s_ab, s_an, s_bb, s_bm,
    eps_hi, eps_lo, rho_hi, rho_lo, st_hi, st_lo, lf_hi, lf_lo, tol_hi, tol_lo, absorb2,
    t_eps, max_iter, check_every,
    COST: tl.constexpr, BALANCED: tl.constexpr, SCALING: tl.constexpr,
    STORE_HIST: tl.constexpr, CHECK: tl.constexpr, ACC: tl.constexpr,
    BN: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Solve problem ``program_id(0)`` of the batch (see the module docstring)."""
    pid = tl.program_id(0)
    pid64 = pid.to(tl.int64)
    offs_n = tl.arange(0, BN)
    offs_m = tl.arange(0, BM)

    a, va, la2, n_k, sa = _weights(a_ptr + pid64 * s_ab, s_an, n, BN, ACC)
    b, vb, lb2, m_k, sb = _weights(b_ptr + pid64 * s_bb, s_bm, m, BM, ACC)
    C, xx, yy = _cost_tile(C_ptr, x_ptr, y_ptr, pid, n_k, m_k, d,
                           s_cb, s_cn, s_cm, s_xb, s_xn, s_xd, s_yb, s_ym, s_yd,
                           COST, ACC, BN, BM, BD, PREC, UPCAST)
    C = tl.where(va[:, None] & vb[None, :], C, 0.0)

    LN2 = tl.log(tl.full([], 2.0, ACC))
    LOG2E = 1.0 / LN2
    eps = _pair(eps_hi, eps_lo, ACC)
    rho = _pair(rho_hi, rho_lo, ACC)
    start = _pair(st_hi, st_lo, ACC)
    lf = _pair(lf_hi, lf_lo, ACC)
    tol = _pair(tol_hi, tol_lo, ACC)
    k_eps = LOG2E / eps

    nonempty = (n_k > 0) & (m_k > 0)
    active = nonempty.to(tl.int32)
    t = 0
    err = tl.sum(tl.zeros([BN], dtype=ACC), axis=0)
    f = tl.zeros([BN], dtype=ACC)
    g = tl.zeros([BM], dtype=ACC)
    if SCALING:
        ft = tl.zeros([BN], dtype=ACC)
        gt = tl.zeros([BM], dtype=ACC)
        u = tl.full([BN], 1.0, ACC)
        v = tl.full([BM], 1.0, ACC)
        Pt = tl.zeros([BN, BM], dtype=ACC)
        scal = 0
        hi_b = tl.exp2(tl.cast(absorb2, ACC))
        lo_b = 1.0 / hi_b
    else:
        k1 = LOG2E / _eps_at(1, t_eps, eps, start, lf)
        L = _lse2_rows((g[None, :] - C) * k1 + lb2[None, :])

    while (t < max_iter) & (active != 0):
        t += 1
        eps_t = _eps_at(t, t_eps, eps, start, lf)
        k = LOG2E / eps_t
        if BALANCED:
            lam = 1.0
        else:
            lam = rho / (rho + eps_t)
        if SCALING:
            good = 0
            if scal != 0:
                S = tl.sum(Pt * v[None, :], axis=1)
                if BALANCED:
                    un = a / S
                else:
                    un = tl.exp2(-lam * (tl.log2(S) - la2) - (1.0 - lam) * ft * k)
                Sc = tl.sum(Pt * un[:, None], axis=0)
                if BALANCED:
                    vn = b / Sc
                else:
                    vn = tl.exp2(-lam * (tl.log2(Sc) - lb2) - (1.0 - lam) * gt * k)
                bad_u = va & ~((un <= hi_b) & (un >= lo_b))
                bad_v = vb & ~((vn <= hi_b) & (vn >= lo_b))
                nbad = tl.sum(bad_u.to(tl.int32), axis=0) + tl.sum(bad_v.to(tl.int32), axis=0)
                if nbad == 0:
                    u = tl.where(va, un, 1.0)
                    v = tl.where(vb, vn, 1.0)
                    good = 1
            if good == 0:  # log-domain iteration from the current potentials, then absorb
                gc = gt + tl.log2(v) / k
                fl = tl.where(va, -lam * _lse2_rows((gc[None, :] - C) * k + lb2[None, :]) / k, 0.0)
                gl = tl.where(vb, -lam * _lse2_cols((fl[:, None] - C) * k + la2[:, None]) / k, 0.0)
                ft = fl
                gt = gl
                u = tl.full([BN], 1.0, ACC)
                v = tl.full([BM], 1.0, ACC)
                if t >= t_eps:
                    Pt = tl.exp2(la2[:, None] + lb2[None, :] + (ft[:, None] + gt[None, :] - C) * k)
                    scal = 1
            if STORE_HIST:
                f = tl.where(va, ft + tl.log2(u) / k, 0.0)
                g = tl.where(vb, gt + tl.log2(v) / k, 0.0)
        else:
            f = tl.where(va, -lam * L / k, 0.0)
            g = tl.where(vb, -lam * _lse2_cols((f[:, None] - C) * k + la2[:, None]) / k, 0.0)
            k_next = LOG2E / _eps_at(t + 1, t_eps, eps, start, lf)
            L = _lse2_rows((g[None, :] - C) * k_next + lb2[None, :])
        if STORE_HIST:
            hoff = (t - 1).to(tl.int64) * B
            tl.store(hf_ptr + (hoff + pid64) * n + offs_n, f, mask=offs_n < n)
            tl.store(hg_ptr + (hoff + pid64) * m + offs_m, g, mask=offs_m < m)
        if CHECK:
            if (t % check_every == 0) & (t >= t_eps):
                if SCALING:
                    r = u * tl.sum(Pt * v[None, :], axis=1)
                    fc = ft + tl.log2(u) / k_eps
                else:
                    r = tl.exp2(la2 + f * k_eps + L)
                    fc = f
                if BALANCED:
                    target = a
                else:
                    target = tl.exp2(la2 - fc * (LOG2E / rho))
                err = tl.sum(tl.where(va, tl.abs(r - target), 0.0), axis=0)
                if not BALANCED:  # relative to the mass (config.py)
                    err = _rel_err(err, r, target, va)
                active = (err >= tol).to(tl.int32)

    if SCALING:
        f = tl.where(va, ft + tl.log2(u) / k_eps, 0.0)
        g = tl.where(vb, gt + tl.log2(v) / k_eps, 0.0)

    # final pass: plan at ε, marginals, values, error of the returned potentials
    P = tl.exp2(la2[:, None] + lb2[None, :] + (f[:, None] + g[None, :] - C) * k_eps)
    r = tl.sum(P, axis=1)
    c = tl.sum(P, axis=0)
    vlin = tl.sum(tl.sum(P * C, axis=1), axis=0)
    mass = tl.sum(r, axis=0)
    value = tl.sum(r * f, axis=0) + tl.sum(c * g, axis=0) - eps * (mass - sa * sb)
    if BALANCED:
        target = a
    else:
        target = tl.exp2(la2 - f * (LOG2E / rho))
        kl_r = tl.where(va & (r > 0), r * (tl.log2(tl.where(r > 0, r, 1.0)) - la2) * LN2, 0.0)
        kl_c = tl.where(vb & (c > 0), c * (tl.log2(tl.where(c > 0, c, 1.0)) - lb2) * LN2, 0.0)
        value += rho * (tl.sum(kl_r, axis=0) - mass + sa + tl.sum(kl_c, axis=0) - mass + sb)
    err = tl.sum(tl.where(va, tl.abs(r - target), 0.0), axis=0)
    if not BALANCED:
        err = _rel_err(err, r, target, va)
    value = tl.where(nonempty, value, 0.0)
    vlin = tl.where(nonempty, vlin, 0.0)
    err = tl.where(nonempty, err, 0.0)

    tl.store(f_ptr + pid64 * n + offs_n, f, mask=offs_n < n)
    tl.store(g_ptr + pid64 * m + offs_m, g, mask=offs_m < m)
    tl.store(val_ptr + pid, value)
    tl.store(vlin_ptr + pid, vlin)
    tl.store(err_ptr + pid, err)
    tl.store(nit_ptr + pid, t)


# ----------------------------------------------------------------------------- host side
def split_f64(v: float) -> tuple[float, float]:
    """Host float -> (hi, lo) fp32 pair with hi + lo ≈ v to ~48 bits (kernel scalars are fp32)."""
    hi = float(np.float32(v))
    return hi, float(np.float32(v - hi))


def schedule_args(
    eps: float, max_iter: int, sched_start: float | None, sched_factor: float | None
) -> tuple[int, float, float]:
    """``(t_eps, start, log2 factor)``: ε_t = eps for t ≥ t_eps, else start·factor^(t−1).

    The kernels' encoding of :attr:`SolverConfig.schedule` (resolved there, once:
    ``t_eps`` is the first t with ``max(eps, start·factor^(t−1)) == eps``, ``max_iter + 1``
    if never reached).
    """
    schedule = None
    if sched_start is not None:
        schedule = (float(sched_start), float(0.5 if sched_factor is None else sched_factor))
    s = SolverConfig(eps=eps, max_iter=max_iter, eps_schedule=schedule).schedule
    log2_factor = math.log2(s.factor) if s.factor > 0.0 else -1.0e4
    return s.t_eps, s.start, log2_factor


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation / potential dtype for inputs of ``dtype``: fp64 for fp64, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


_TL = {torch.float32: tl.float32, torch.float64: tl.float64}


def problem_dims(
    C: Tensor | None, x: Tensor | None, y: Tensor | None
) -> tuple[int, int, int, int, Tensor]:
    """``(B, n, m, d, ref)`` of a dense (C [B, n, m], d = 0) or point (x, y) problem; ``ref``
    is the tensor whose dtype and device the launch follows."""
    if C is not None:
        B, n, m = C.shape
        return B, n, m, 0, C
    if x is None or y is None:
        raise ValueError("the Triton launchers need C or both x and y")
    B, n, d = x.shape
    return B, n, y.shape[1], d, x


def launch_forward(
    C: Tensor | None, x: Tensor | None, y: Tensor | None, a: Tensor, b: Tensor,
    cost: str, eps: float, rho: float | None, max_iter: int, tol: float, check_every: int,
    sched_start: float | None, sched_factor: float | None, store_history: bool,
    scaling: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Resident solve: given C [B, n, m] (cost="given") or points x [B, n, d], y [B, m, d].

    Returns ``(f [B,n], g [B,m], value [B], value_linear [B], n_iters [B] int32, err [B],
    hist_f [T,B,n], hist_g [T,B,m])`` in the accumulation dtype, ``T = max_iter`` if
    ``store_history`` else 0. One launch, no host synchronisation.
    """
    B, n, m, d, ref = problem_dims(C, x, y)
    in_dtype = ref.dtype
    acc = acc_dtype(in_dtype)
    dev = ref.device
    a = a.to(acc)
    b = b.to(acc)
    f = torch.empty(B, n, dtype=acc, device=dev)
    g = torch.empty(B, m, dtype=acc, device=dev)
    value = torch.empty(B, dtype=acc, device=dev)
    vlin = torch.empty(B, dtype=acc, device=dev)
    n_iters = torch.empty(B, dtype=torch.int32, device=dev)
    err = torch.empty(B, dtype=acc, device=dev)
    T = max_iter if store_history else 0
    hf = torch.zeros(T, B, n, dtype=acc, device=dev)
    hg = torch.zeros(T, B, m, dtype=acc, device=dev)
    if B == 0:
        return f, g, value, vlin, n_iters, err, hf, hg
    ls = launch.resident(n, m, d, in_dtype, form="scaling" if scaling else "log")
    t_eps, start, lf = schedule_args(eps, max_iter, sched_start, sched_factor)
    cs = C.stride() if C is not None else (0, 0, 0)
    xs = x.stride() if x is not None else (0, 0, 0)
    ys = y.stride() if y is not None else (0, 0, 0)
    dummy = ref
    resident_forward_kernel[(B,)](
        C if C is not None else dummy, x if x is not None else dummy,
        y if y is not None else dummy, a, b,
        f, g, value, vlin, n_iters, err, hf if store_history else f, hg if store_history else g,
        B, n, m, d,
        *cs, *xs, *ys, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
        *split_f64(eps), *split_f64(rho if rho is not None else 1.0),
        *split_f64(start), *split_f64(lf), *split_f64(tol), float(launch.ABSORB_LOG2),
        t_eps, max_iter, check_every,
        COST=cost_code(cost), BALANCED=rho is None, SCALING=bool(scaling),
        STORE_HIST=bool(store_history), CHECK=tol > 0, ACC=_TL[acc],
        BN=ls.BN, BM=ls.BM, BD=ls.BD, PREC=ls.prec, UPCAST=ls.upcast_dot,
        num_warps=ls.num_warps, num_stages=ls.num_stages,
    )
    return f, g, value, vlin, n_iters, err, hf, hg
