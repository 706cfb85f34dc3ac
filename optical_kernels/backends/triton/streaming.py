"""Streaming Triton kernels for large problems (docs/design.md §5, "Streaming kernel"), any n, m.

Flash-style: every pass is one launch with one program per (row block, problem) that loops
over column tiles, recomputing the cost tile on the fly — from points (``x·yᵀ`` on ``tl.dot``
plus per-point norms: cosine, sqeuclidean, dot) or by reading a given ``C`` tile-wise. No
``(B, n, m)`` tensor is ever allocated by the sample path: memory is ``O(B·(n+m)·d)``.

Two kernels, one per concept, with ``tl.constexpr`` switches:

``_lse_kernel`` — a Sinkhorn half-step (``MODE=0``) or row statistics (``MODE=1``). For the
rows ``i`` of one side and the columns ``j`` of the other (weights ``w``, potential ``h``)::

    z_ij = log2 w_j + (h_j − C_ij)·K,           K = log2(e)/ε_t
    L_i  = ln 2 · log2 Σ_j 2^{z_ij}              (online max/sum in the exp2 domain)
    MODE 0:  out_i = −λ_t ε_t L_i                (the f- or g-update of docs/design.md §2)
    MODE 1:  out_i = L_i,  out2_i = Σ_j 2^{z_ij} C_ij / Σ_j 2^{z_ij}   (softmax-mean cost)

The column half-step is the same kernel on the transposed problem (x↔y, a↔b, f↔g, strides
of ``C`` swapped): all three costs are symmetric.

``_plan_kernel`` — passes over a plan-like tile with bounded exponent (no running max
needed: ``p_i + q_j − K C_ij ≤ 0`` up to rounding for plans and softmax weights)::

    E_ij = 2^{p_i + q_j − K C_ij},   G_ij = E_ij · (α_i + β_j + γ C_ij)   (absent terms: G = E)
    OUT_SUM:  s1_i = Σ_j G_ij,  s2_i = Σ_j G_ij C_ij (S2=1) or Σ_j E_ij (S2=2)
    OUT_GRAD: dx_i (+)= Σ_j G_ij ∂C_ij/∂x_i      (docs/design.md §3 chain rule, G·y on tl.dot)
    OUT_G:    G tile (+)= stored into a dense ∂L/∂C (given-C backward)
    POST:     G_ij = post_i E_ij / Σ_j E_ij (softmax weights renormalised in the same arithmetic;
              the unrolled reverse pass of the sample path), applied after the loop

With it: the plan ``P`` (p = log2 a + f K, q = log2 b + g K), the CG matvec
``H[u; v] = [Σ_j P_ij(u_i+v_j); Σ_i P_ij(u_i+v_j)]``, the implicit gradient
``G = P∘((gv+gl) + gl(u_i + v_j − C_ij)/ε)`` and the unrolled reverse steps (softmax weights
recomputed from the stored potentials).

Convergence flags live on the device: each launch reads ``act[k] ≥ thr`` and a finished
problem's programs exit at once; the forward loop has no host sync (graph-capturable).
Padded positions are those of weight 0 (a zero weight inside a problem is masked likewise);
``rlen``/``clen`` (last positive weight + 1) only let programs skip trailing padding.

Public functions follow :mod:`optical_kernels.config`: :func:`forward`, :func:`backward`,
:func:`forward_sample`, :func:`backward_sample`. Each takes an optional ``tiles=``
(:class:`Tiles`) to force block sizes (tests use 16 to exercise many tiles).

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

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ...config import SolverConfig, SolverOut
from ...constants import POINT_COSTS, cost_code

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
NORM_FLOOR = 1e-8
COST_CODES = {c: cost_code(c) for c in POINT_COSTS}  # kernel codes (constants.Cost)

_NEG = tl.constexpr(-1.0e30)  # finite "−inf": NEG − NEG = 0, never NaN
_LN2 = tl.constexpr(LN2)


@dataclass(frozen=True)
class Tiles:
    """Launch parameters of the streaming kernels (0 = automatic).

    Attributes:
        block_r: rows per program (power of two ≥ 16).
        block_c: columns per inner-loop tile; 0: 64 for FMA dots (fp32 ``ieee``, fp64, a given
            C), 32 for tensor-core dots (``tf32x3``/``tf32``, bf16/fp16).
        block_d: feature chunk of ``tl.dot``; 0: 16 for FMA dots (several chunks per tile),
            ``next_pow2(d)`` up to 64 (tf32) / 128 (16-bit) for tensor-core dots, else 32 / 64.
            When d fits one chunk the x tile is loaded once per program.
        num_warps, num_stages: Triton launch options (ignored by the interpreter).
        dot_precision: ``tl.dot`` input precision for fp32 points: ``"ieee"`` (exact fp32 FMA,
            default: matches the reference to 1e-5), ``"tf32x3"`` (3×TF32 on tensor cores,
            ~fp32 accuracy, expected much faster for d ≥ 32) or ``"tf32"`` (~1e-3 relative
            cost error). 16-bit points always use their native tensor-core dot.

    The automatic choices are spill-free for sm_90 with Triton 3.6 (ptxas, d = 64 and 128);
    they are not yet timed on a GPU.
    """

    block_r: int = 64
    block_c: int = 0
    block_d: int = 0
    num_warps: int = 4
    num_stages: int = 2
    dot_precision: str = "ieee"

    def __post_init__(self) -> None:
        for name in ("block_r", "block_c", "block_d"):
            v = getattr(self, name)
            if (v or name == "block_r") and (v < 16 or v & (v - 1)):
                raise ValueError(f"Tiles.{name} must be a power of two >= 16, got {v}")
        if self.dot_precision not in ("ieee", "tf32x3", "tf32"):
            raise ValueError(
                f"Tiles.dot_precision must be ieee, tf32x3 or tf32, got {self.dot_precision!r}")

    def resolve(self, d: int, pts_dtype: torch.dtype | None) -> tuple[int, int, int, str]:
        """(block_r, block_c, block_d, precision) for feature size d and point dtype
        (``None``: a given cost matrix)."""
        if pts_dtype is None:
            return self.block_r, self.block_c or 64, 16, "ieee"
        half = pts_dtype in (torch.float16, torch.bfloat16)
        prec = self.dot_precision if pts_dtype == torch.float32 else "ieee"
        tensor_core = half or prec != "ieee"
        bc = self.block_c or (32 if tensor_core else 64)
        if self.block_d:
            bd = self.block_d
        elif not tensor_core:
            bd = 16
        else:
            cap = 128 if half else 64
            p2 = max(16, _next_pow2(d))
            bd = p2 if p2 <= cap else cap // 2
        return self.block_r, bc, bd, prec


DEFAULT_TILES = Tiles()
CG_SYNC_EVERY = 10  # implicit backward: host check "all CG problems done" every k steps (0: never)


# ============================================================================ kernels
@triton.jit
def _cost_tile(
    c_ptr, s_cb, s_cr, s_cc,
    x_ptr, s_xb, s_xr, s_xd,
    y_ptr, s_yb, s_yr, s_yd,
    nx, ny_ptr, Cn, d, pid_b, offs_r, mask_r, offs_c, mask_c, xblk,
    COST: tl.constexpr, ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr, ONE_D: tl.constexpr, PREC: tl.constexpr, DOT_F32: tl.constexpr,
):
    """Cost tile C [BLOCK_R, BLOCK_C] (and the column-point tile [BLOCK_C, BLOCK_D] if ONE_D)."""
    b64 = pid_b.to(tl.int64)
    if COST == 0:
        ptrs = (c_ptr + b64 * s_cb + offs_r.to(tl.int64)[:, None] * s_cr
                + offs_c.to(tl.int64)[None, :] * s_cc)
        c = tl.load(ptrs, mask=mask_r[:, None] & mask_c[None, :], other=0.0).to(ACC)
        yblk = c
    else:
        offs_d = tl.arange(0, BLOCK_D)
        ybase = y_ptr + b64 * s_yb + offs_c.to(tl.int64)[:, None] * s_yr
        if ONE_D:
            yblk = tl.load(ybase + offs_d[None, :] * s_yd,
                           mask=mask_c[:, None] & (offs_d[None, :] < d), other=0.0)
            if DOT_F32:
                yblk = yblk.to(tl.float32)
            s = tl.dot(xblk, tl.trans(yblk), input_precision=PREC, out_dtype=ACC)
        else:
            xbase = x_ptr + b64 * s_xb + offs_r.to(tl.int64)[:, None] * s_xr
            s = tl.zeros([BLOCK_R, BLOCK_C], dtype=ACC)
            for k0 in range(0, d, BLOCK_D):
                dm = (k0 + offs_d) < d
                xk = tl.load(xbase + (k0 + offs_d)[None, :] * s_xd,
                             mask=mask_r[:, None] & dm[None, :], other=0.0)
                yk = tl.load(ybase + (k0 + offs_d)[None, :] * s_yd,
                             mask=mask_c[:, None] & dm[None, :], other=0.0)
                if DOT_F32:
                    xk = xk.to(tl.float32)
                    yk = yk.to(tl.float32)
                s += tl.dot(xk, tl.trans(yk), input_precision=PREC, out_dtype=ACC)
            yblk = s
        if COST == 3:
            c = -s
        else:
            ny = tl.load(ny_ptr + pid_b * Cn + offs_c, mask=mask_c, other=0.0).to(ACC)
            if COST == 1:
                c = 1.0 - s * tl.abs(nx)[:, None] * tl.abs(ny)[None, :]
            else:
                c = tl.maximum(nx[:, None] + ny[None, :] - 2.0 * s, 0.0)
    return c, yblk


@triton.jit
def _row_setup(
    x_ptr, s_xb, s_xr, s_xd, nx_ptr, act_ptr, thr, rlen_ptr, clen_ptr, R, d,
    COST: tl.constexpr, ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    ONE_D: tl.constexpr, DOT_F32: tl.constexpr,
):
    """Common prologue: row offsets/mask, number of columns to stream, row norms, x tile."""
    pid_r = tl.program_id(0)
    pid_b = tl.program_id(1)
    live = (tl.load(act_ptr + pid_b) >= thr) & (pid_r * BLOCK_R < tl.load(rlen_ptr + pid_b))
    rlen = tl.load(rlen_ptr + pid_b)
    clen = tl.load(clen_ptr + pid_b)
    n_col = tl.where(live, clen, 0)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < rlen
    if COST == 1 or COST == 2:
        nx = tl.load(nx_ptr + pid_b * R + offs_r, mask=mask_r, other=0.0).to(ACC)
    else:
        nx = tl.zeros([BLOCK_R], dtype=ACC)
    if COST != 0 and ONE_D:
        offs_d = tl.arange(0, BLOCK_D)
        xblk = tl.load(x_ptr + pid_b.to(tl.int64) * s_xb + offs_r.to(tl.int64)[:, None] * s_xr
                       + offs_d[None, :] * s_xd,
                       mask=mask_r[:, None] & (offs_d[None, :] < d), other=0.0)
        if DOT_F32:
            xblk = xblk.to(tl.float32)
    else:
        xblk = nx
    return pid_b, live, clen, n_col, offs_r, mask_r, nx, xblk


@triton.jit
def _lse_kernel(
    c_ptr, s_cb, s_cr, s_cc,
    x_ptr, s_xb, s_xr, s_xd,
    y_ptr, s_yb, s_yr, s_yd,
    nx_ptr, ny_ptr,
    wr_ptr, wc_ptr, hc_ptr, act_ptr, thr, rlen_ptr, clen_ptr, out_ptr, out2_ptr,
    K, scale, R, Cn, d,
    COST: tl.constexpr, MODE: tl.constexpr, WANT_CBAR: tl.constexpr, ACC: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    ONE_D: tl.constexpr, PREC: tl.constexpr, DOT_F32: tl.constexpr,
):
    """Half-step (MODE 0) or row LSE statistics (MODE 1); see the module docstring."""
    pid_b, live, clen, n_col, offs_r, mask_r, nx, xblk = _row_setup(
        x_ptr, s_xb, s_xr, s_xd, nx_ptr, act_ptr, thr, rlen_ptr, clen_ptr, R, d,
        COST, ACC, BLOCK_R, BLOCK_D, ONE_D, DOT_F32)
    wr = tl.load(wr_ptr + pid_b * R + offs_r, mask=mask_r, other=0.0)
    valid_r = mask_r & (wr > 0)
    m_i = tl.full([BLOCK_R], _NEG, ACC)
    s_i = tl.zeros([BLOCK_R], dtype=ACC)
    cb_i = tl.zeros([BLOCK_R], dtype=ACC)
    for c0 in range(0, n_col, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < clen
        wc = tl.load(wc_ptr + pid_b * Cn + offs_c, mask=mask_c, other=0.0).to(ACC)
        hc = tl.load(hc_ptr + pid_b * Cn + offs_c, mask=mask_c, other=0.0).to(ACC)
        valid_c = wc > 0
        q = tl.log2(tl.where(valid_c, wc, 1.0)) + hc * K
        c, _unused = _cost_tile(
            c_ptr, s_cb, s_cr, s_cc, x_ptr, s_xb, s_xr, s_xd, y_ptr, s_yb, s_yr, s_yd,
            nx, ny_ptr, Cn, d, pid_b, offs_r, mask_r, offs_c, mask_c, xblk,
            COST, ACC, BLOCK_R, BLOCK_C, BLOCK_D, ONE_D, PREC, DOT_F32)
        # masked columns get exactly NEG: while a row has seen no valid column the junk
        # 2^(NEG−NEG) = 1 terms are wiped by the next rescale 2^(NEG − m) = 0.
        z = tl.where(valid_c[None, :], q[None, :] - c * K, _NEG)
        m_new = tl.maximum(m_i, tl.max(z, 1))
        alpha = tl.exp2(m_i - m_new)
        e = tl.exp2(z - m_new[:, None])
        s_i = s_i * alpha + tl.sum(e, 1)
        if WANT_CBAR:
            cb_i = cb_i * alpha + tl.sum(e * c, 1)
        m_i = m_new
    smask = mask_r & live
    s_safe = tl.where(s_i > 0, s_i, 1.0)
    lse2 = m_i + tl.log2(s_safe)
    optr = out_ptr + pid_b * R + offs_r
    if MODE == 0:
        tl.store(optr, tl.where(valid_r, scale * lse2, 0.0), mask=smask)
    else:
        tl.store(optr, tl.where(valid_r, lse2 * _LN2, 0.0), mask=smask)
        if WANT_CBAR:
            tl.store(out2_ptr + pid_b * R + offs_r, tl.where(valid_r, cb_i / s_safe, 0.0),
                     mask=smask)


@triton.jit
def _plan_kernel(
    c_ptr, s_cb, s_cr, s_cc,
    x_ptr, s_xb, s_xr, s_xd,
    y_ptr, s_yb, s_yr, s_yd,
    nx_ptr, ny_ptr,
    p_ptr, q_ptr, K, al_ptr, be_ptr, ga_ptr, post_ptr,
    act_ptr, thr, rlen_ptr, clen_ptr,
    s1_ptr, s2_ptr,
    dx_ptr, s_ob, s_or, s_od,
    gout_ptr, s_gb, s_gr, s_gc,
    R, Cn, d,
    COST: tl.constexpr, HAS_AL: tl.constexpr, HAS_BE: tl.constexpr, HAS_GA: tl.constexpr,
    OUT_SUM: tl.constexpr, S2: tl.constexpr, OUT_GRAD: tl.constexpr, OUT_G: tl.constexpr,
    ACCUM: tl.constexpr, POST: tl.constexpr, ACC: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    ONE_D: tl.constexpr, PREC: tl.constexpr, DOT_F32: tl.constexpr,
):
    """Plan-tile pass: row sums, point gradient and/or dense G; see the module docstring."""
    pid_b, live, clen, n_col, offs_r, mask_r, nx, xblk = _row_setup(
        x_ptr, s_xb, s_xr, s_xd, nx_ptr, act_ptr, thr, rlen_ptr, clen_ptr, R, d,
        COST, ACC, BLOCK_R, BLOCK_D, ONE_D, DOT_F32)
    pid_d = tl.program_id(2)
    pr = tl.load(p_ptr + pid_b * R + offs_r, mask=mask_r, other=_NEG).to(ACC)
    if HAS_AL:
        al = tl.load(al_ptr + pid_b * R + offs_r, mask=mask_r, other=0.0).to(ACC)
    if HAS_GA:
        ga = tl.load(ga_ptr + pid_b).to(ACC)
    s1 = tl.zeros([BLOCK_R], dtype=ACC)
    s2 = tl.zeros([BLOCK_R], dtype=ACC)
    tsum = tl.zeros([BLOCK_R], dtype=ACC)
    offs_d = tl.arange(0, BLOCK_D)
    od = pid_d * BLOCK_D + offs_d
    mask_d = od < d
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=ACC)
    for c0 in range(0, n_col, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < clen
        qc = tl.load(q_ptr + pid_b * Cn + offs_c, mask=mask_c, other=_NEG).to(ACC)
        c, yblk = _cost_tile(
            c_ptr, s_cb, s_cr, s_cc, x_ptr, s_xb, s_xr, s_xd, y_ptr, s_yb, s_yr, s_yd,
            nx, ny_ptr, Cn, d, pid_b, offs_r, mask_r, offs_c, mask_c, xblk,
            COST, ACC, BLOCK_R, BLOCK_C, BLOCK_D, ONE_D, PREC, DOT_F32)
        e = tl.exp2(pr[:, None] + qc[None, :] - c * K)
        if HAS_AL or HAS_BE or HAS_GA:
            coef = tl.zeros([BLOCK_R, BLOCK_C], dtype=ACC)
            if HAS_AL:
                coef += al[:, None]
            if HAS_BE:
                be = tl.load(be_ptr + pid_b * Cn + offs_c, mask=mask_c, other=0.0).to(ACC)
                coef += be[None, :]
            if HAS_GA:
                coef += ga * c
            G = e * coef
        else:
            G = e
        if OUT_SUM or POST:
            s1 += tl.sum(G, 1)
            if S2 == 1:
                s2 += tl.sum(G * c, 1)
            if S2 == 2 or POST:
                s2 += tl.sum(e, 1)
        if OUT_G:
            gp = (gout_ptr + pid_b.to(tl.int64) * s_gb + offs_r.to(tl.int64)[:, None] * s_gr
                  + offs_c.to(tl.int64)[None, :] * s_gc)
            gm = mask_r[:, None] & mask_c[None, :]
            gv = G
            if ACCUM:
                gv += tl.load(gp, mask=gm, other=0.0)
            tl.store(gp, gv, mask=gm)
        if OUT_GRAD:
            if COST == 1:
                ny = tl.load(ny_ptr + pid_b * Cn + offs_c, mask=mask_c, other=0.0).to(ACC)
                Gw = G * tl.abs(ny)[None, :]
                tsum += tl.sum(G * (1.0 - c), 1)
            else:
                Gw = G
                if COST == 2:
                    tsum += tl.sum(G, 1)
            if ONE_D:
                yo = yblk
            else:
                yo = tl.load(y_ptr + pid_b.to(tl.int64) * s_yb
                             + offs_c.to(tl.int64)[:, None] * s_yr + od[None, :] * s_yd,
                             mask=mask_c[:, None] & mask_d[None, :], other=0.0)
                if DOT_F32:
                    yo = yo.to(tl.float32)
            acc += tl.dot(Gw.to(yo.dtype), yo, input_precision=PREC, out_dtype=ACC)
    if POST:
        # self-normalised softmax pass: G_ij = post_i · E_ij / Σ_j E_ij, applied after the loop
        post = tl.load(post_ptr + pid_b * R + offs_r, mask=mask_r, other=0.0).to(ACC)
        scale = tl.where(s2 > 0, post / tl.where(s2 > 0, s2, 1.0), 0.0)
        acc = acc * scale[:, None]
        tsum = tsum * scale
    if OUT_SUM:
        # every row < R is written (zeros where the problem is inactive): no stale sums
        smask = (offs_r < R) & (pid_d == 0)
        tl.store(s1_ptr + pid_b * R + offs_r, s1, mask=smask)
        if S2 != 0:
            tl.store(s2_ptr + pid_b * R + offs_r, s2, mask=smask)
    if OUT_GRAD:
        xo = tl.load(x_ptr + pid_b.to(tl.int64) * s_xb + offs_r.to(tl.int64)[:, None] * s_xr
                     + od[None, :] * s_xd,
                     mask=mask_r[:, None] & mask_d[None, :], other=0.0).to(ACC)
        if COST == 1:
            # −(1/‖x‖)(I − x̂x̂ᵀ) Σ_j G ŷ ; x̂·Σ_j G ŷ = Σ_j G_ij (1 − C_ij); nx < 0 marks a
            # clamped norm (no projection there, as in costs.cost_vjp)
            anx = tl.abs(nx)
            t = tl.where(nx > 0, anx * tsum, 0.0)
            dxv = -anx[:, None] * (acc - xo * t[:, None])
        elif COST == 2:
            dxv = 2.0 * (tsum[:, None] * xo - acc)
        else:
            dxv = -acc
        optr = dx_ptr + pid_b.to(tl.int64) * s_ob + offs_r.to(tl.int64)[:, None] * s_or \
            + od[None, :] * s_od
        om = (mask_r & live)[:, None] & mask_d[None, :]
        if ACCUM:
            dxv += tl.load(optr, mask=om, other=0.0)
        tl.store(optr, dxv, mask=om)


# ============================================================================ host side
def _next_pow2(v: int) -> int:
    return 1 << max(0, (int(v) - 1).bit_length())


def _valid_len(w: torch.Tensor) -> torch.Tensor:
    """Last index with positive weight, plus one: [B] int32 (0 for no valid entry)."""
    idx = torch.arange(1, w.shape[1] + 1, device=w.device, dtype=torch.int32)
    return torch.where(w > 0, idx, 0).amax(1).to(torch.int32)


def _log2w(w: torch.Tensor) -> torch.Tensor:
    """log2 w at positive weights, NEG elsewhere."""
    return torch.where(w > 0, torch.log2(torch.where(w > 0, w, 1.0)), -1.0e30)


class _Side:
    """One side of the batch: weights [B, L], valid extent [B], points [B, L, d], norms [B, L]."""

    def __init__(self, w: torch.Tensor, pts: torch.Tensor | None, nv: torch.Tensor | None):
        self.w = w
        self.len = _valid_len(w)
        self.valid = w > 0
        self.pts = pts
        self.nv = nv
        self.L = w.shape[1]


class _Problem:
    """A padded batch (given C or points) with both pass orientations and the launchers."""

    def __init__(
        self,
        a: torch.Tensor,
        b: torch.Tensor,
        *,
        C: torch.Tensor | None = None,
        x: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
        cost: str | None = None,
        tiles: Tiles | None = None,
    ) -> None:
        self.tiles = tiles or DEFAULT_TILES
        src = C if C is not None else x
        self.dtype = torch.float64 if (src.dtype == torch.float64 or a.dtype == torch.float64) \
            else torch.float32
        self.acc = tl.float64 if self.dtype == torch.float64 else tl.float32
        self.device = src.device
        self.a = a.to(self.dtype).contiguous()
        self.b = b.to(self.dtype).contiguous()
        self.B, self.n = self.a.shape
        self.m = self.b.shape[1]
        self.C = C
        if C is not None:
            self.code = 0
            self.d = 1
            nx = ny = None
            xs = ys = None
            pts_dtype = self.dtype
        else:
            if cost not in COST_CODES:
                raise ValueError(f"cost must be one of {tuple(COST_CODES)}, got {cost!r}")
            self.code = COST_CODES[cost]
            if x.dtype == torch.float64 or self.dtype == torch.float64:
                x, y = x.to(torch.float64), y.to(torch.float64)
            self.d = x.shape[2]
            xs, ys = x, y
            nx, ny = self._norms(x), self._norms(y)
            pts_dtype = x.dtype
        self.rows = _Side(self.a, xs, nx)
        self.cols = _Side(self.b, ys, ny)
        self.nonempty = self.rows.valid.any(1) & self.cols.valid.any(1)
        self.ne_i32 = self.nonempty.to(torch.int32)
        self.block_r, self.block_c, bd, self.prec = self.tiles.resolve(
            self.d, None if self.code == 0 else pts_dtype)
        self.block_d = bd
        self.one_d = self.code != 0 and self.d <= bd
        self.n_dchunks = triton.cdiv(self.d, bd) if self.code != 0 else 1
        # the Triton 3.6 interpreter computes 16-bit tl.dot wrongly: upcast tiles there only
        self.dot_f32 = os.environ.get("TRITON_INTERPRET") == "1" and \
            pts_dtype in (torch.float16, torch.bfloat16)
        self._dummy = self.a

    # ----------------------------------------------------------------- helpers
    def _norms(self, p: torch.Tensor) -> torch.Tensor | None:
        """Cosine: 1/‖p‖, 0 where ‖p‖ < 1e-8 (x̂ = 0: C = 1, gradient 0, as costs.py);
        sqeuclidean: ‖p‖²."""
        if self.code == 3:
            return None
        p32 = p.to(self.dtype)
        if self.code == 2:
            return (p32 * p32).sum(-1).contiguous()
        nrm = p32.norm(dim=-1)
        inv = 1.0 / nrm.clamp_min(NORM_FLOOR)
        return torch.where(nrm < NORM_FLOOR, 0.0, inv).contiguous()

    def _src_args(self, rows: bool) -> tuple:
        """Kernel arguments of the cost source for a pass whose rows are ``rows``' side."""
        r, c = (self.rows, self.cols) if rows else (self.cols, self.rows)
        if self.code == 0:
            C = self.C
            sb, sr, sc = C.stride()
            if not rows:
                sr, sc = sc, sr
            dm = self._dummy
            return (C, sb, sr, sc, dm, 0, 0, 0, dm, 0, 0, 0, dm, dm)
        x, y = r.pts, c.pts
        nx = r.nv if r.nv is not None else self._dummy
        ny = c.nv if c.nv is not None else self._dummy
        return (self._dummy, 0, 0, 0, x, *x.stride(), y, *y.stride(), nx, ny)

    def _common(self) -> dict:
        t = self.tiles
        return dict(
            COST=self.code, ACC=self.acc, BLOCK_R=self.block_r, BLOCK_C=self.block_c,
            BLOCK_D=self.block_d, ONE_D=self.one_d, PREC=self.prec, DOT_F32=self.dot_f32,
            num_warps=t.num_warps, num_stages=t.num_stages,
        )

    # ----------------------------------------------------------------- launchers
    def lse(
        self,
        rows: bool,
        h: torch.Tensor,
        out: torch.Tensor,
        eps_t: float,
        lam: float = 1.0,
        act: torch.Tensor | None = None,
        thr: int = 1,
        stats: bool = False,
        cbar: torch.Tensor | None = None,
    ) -> None:
        """Half-step into ``out`` (stats=False) or row LSE [+ softmax-mean cost] (stats=True).

        ``h`` is the other side's potential; ``act`` [B] int32, a problem runs iff act ≥ thr.
        """
        r, c = (self.rows, self.cols) if rows else (self.cols, self.rows)
        act = self.ne_i32 if act is None else act
        grid = (triton.cdiv(r.L, self.block_r), self.B)
        _lse_kernel[grid](
            *self._src_args(rows),
            r.w, c.w, h, act, thr, r.len, c.len, out, cbar if cbar is not None else out,
            LOG2E / eps_t, -lam * eps_t * LN2, r.L, c.L, self.d,
            MODE=1 if stats else 0, WANT_CBAR=cbar is not None, **self._common(),
        )

    def plan(
        self,
        rows: bool,
        p: torch.Tensor,
        q: torch.Tensor,
        K: float,
        *,
        alpha: torch.Tensor | None = None,
        beta: torch.Tensor | None = None,
        gamma: torch.Tensor | None = None,
        act: torch.Tensor | None = None,
        thr: int = 1,
        sums: bool = False,
        s2: int = 0,
        grad_out: torch.Tensor | None = None,
        g_out: torch.Tensor | None = None,
        accum: bool = False,
        post: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """One pass over ``G = 2^{p_i+q_j−K C_ij}(α_i + β_j + γ C_ij)`` in the given orientation.

        ``p``, ``alpha`` index the pass rows, ``q``, ``beta`` its columns. Returns
        ``(s1, s2)`` row sums when ``sums`` (s2 per ``s2``: 1 Σ G·C, 2 Σ E); emits the point
        gradient into ``grad_out`` [B, rows, d] or the dense ``G`` into ``g_out`` (given as
        the [B, n, m] tensor: it is transposed here for the column orientation). ``post``
        [B, rows]: renormalise each row of E to sum 1 and scale it by ``post`` (no α, β, γ);
        then ``s2`` returns the row sums of E.
        """
        if post is not None:
            sums, s2 = True, 2
        r, c = (self.rows, self.cols) if rows else (self.cols, self.rows)
        act = self.ne_i32 if act is None else act
        s1 = torch.zeros(self.B, r.L, dtype=self.dtype, device=self.device) if sums else None
        s2t = torch.zeros_like(s1) if (sums and s2) else None
        dm = self._dummy
        if grad_out is not None:
            go, (s_ob, s_or, s_od) = grad_out, grad_out.stride()
        else:
            go, s_ob, s_or, s_od = dm, 0, 0, 0
        if g_out is not None:
            gb, gr, gc = g_out.stride()
            if not rows:
                gr, gc = gc, gr
            gg = g_out
        else:
            gg, gb, gr, gc = dm, 0, 0, 0
        nd = self.n_dchunks if grad_out is not None else 1
        grid = (triton.cdiv(r.L, self.block_r), self.B, nd)
        _plan_kernel[grid](
            *self._src_args(rows),
            p, q, K,
            alpha if alpha is not None else dm, beta if beta is not None else dm,
            gamma if gamma is not None else dm, post if post is not None else dm,
            act, thr, r.len, c.len,
            s1 if s1 is not None else dm, s2t if s2t is not None else dm,
            go, s_ob, s_or, s_od, gg, gb, gr, gc,
            r.L, c.L, self.d,
            HAS_AL=alpha is not None, HAS_BE=beta is not None, HAS_GA=gamma is not None,
            OUT_SUM=sums, S2=s2 if sums else 0, OUT_GRAD=grad_out is not None,
            OUT_G=g_out is not None, ACCUM=accum, POST=post is not None, **self._common(),
        )
        return s1, s2t

    # ----------------------------------------------------------------- vectors
    def log2a(self) -> torch.Tensor:
        return _log2w(self.a)

    def log2b(self) -> torch.Tensor:
        return _log2w(self.b)

    def masked(self, v: torch.Tensor, rows: bool, fill: float = -1.0e30) -> torch.Tensor:
        """``v`` at valid positions of non-empty problems, ``fill`` elsewhere (contiguous)."""
        valid = (self.rows.valid if rows else self.cols.valid) & self.nonempty[:, None]
        return torch.where(valid, v, fill).contiguous()


# ============================================================================ forward
def _row_err(
    prob: _Problem, f: torch.Tensor, L: torch.Tensor, eps: float, rho: float | None
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


def _solve(prob: _Problem, cfg: SolverConfig) -> SolverOut:
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
    prob: _Problem, f: torch.Tensor, g: torch.Tensor, eps: float, rho: float | None
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


def _empty_out(B: int, n: int, m: int, dtype: torch.dtype, device: torch.device,
               cfg: SolverConfig) -> SolverOut:
    z = torch.zeros(B, dtype=dtype, device=device)
    hist = None
    if cfg.grad == "unrolled":
        hist = (torch.zeros(cfg.max_iter, B, n, dtype=dtype, device=device),
                torch.zeros(cfg.max_iter, B, m, dtype=dtype, device=device))
    return SolverOut(torch.zeros(B, n, dtype=dtype, device=device),
                     torch.zeros(B, m, dtype=dtype, device=device), z, z.clone(),
                     torch.zeros(B, dtype=torch.int32, device=device), z.clone(), hist)


def _check_weights(a: torch.Tensor, b: torch.Tensor, n: int, m: int, B: int) -> None:
    if a.dim() != 2 or tuple(a.shape) != (B, n):
        raise ValueError(f"a must have shape ({B}, {n}), got {tuple(a.shape)}")
    if b.dim() != 2 or tuple(b.shape) != (B, m):
        raise ValueError(f"b must have shape ({B}, {m}), got {tuple(b.shape)}")


def forward(
    C: torch.Tensor, a: torch.Tensor, b: torch.Tensor, cfg: SolverConfig,
    tiles: Tiles | None = None,
) -> SolverOut:
    """Solve on a given cost C [B, n, m] (read tile-wise, never copied), a [B, n], b [B, m]."""
    if C.dim() != 3:
        raise ValueError(f"C must have shape (B, n, m), got {tuple(C.shape)}")
    B, n, m = C.shape
    _check_weights(a, b, n, m, B)
    dt = torch.float64 if (C.dtype == torch.float64 or a.dtype == torch.float64) \
        else torch.float32
    if B == 0 or n == 0 or m == 0:
        return _empty_out(B, n, m, dt, C.device, cfg)
    return _solve(_Problem(a, b, C=C, tiles=tiles), cfg)


def forward_sample(
    x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor, cost: str,
    cfg: SolverConfig, tiles: Tiles | None = None,
) -> SolverOut:
    """Solve with the cost fused from x [B, n, d], y [B, m, d]; memory O(B·(n+m)·d)."""
    _check_points(x, y)
    B, n, _ = x.shape
    m = y.shape[1]
    _check_weights(a, b, n, m, B)
    if cost not in COST_CODES:
        raise ValueError(f"cost must be one of {tuple(COST_CODES)}, got {cost!r}")
    dt = torch.float64 if (x.dtype == torch.float64 or a.dtype == torch.float64) \
        else torch.float32
    if B == 0 or n == 0 or m == 0:
        return _empty_out(B, n, m, dt, x.device, cfg)
    return _solve(_Problem(a, b, x=x, y=y, cost=cost, tiles=tiles), cfg)


def _check_points(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.dim() != 3 or y.dim() != 3:
        raise ValueError(f"x and y must be [B, n, d] and [B, m, d], got {tuple(x.shape)} "
                         f"and {tuple(y.shape)}")
    if x.shape[0] != y.shape[0] or x.shape[2] != y.shape[2]:
        raise ValueError(f"x {tuple(x.shape)} and y {tuple(y.shape)} must share B and d")
    if x.dtype != y.dtype:
        raise TypeError(f"x and y must have the same dtype, got {x.dtype} and {y.dtype}")


# ============================================================================ backward
class _Sink:
    """Where G = ∂L/∂C goes: a dense dC (given C) or the point gradients dx [, dy]."""

    def __init__(self, prob: _Problem, need_dy: bool) -> None:
        dt, dev = prob.dtype, prob.device
        self.dense = prob.code == 0
        if self.dense:
            self.dC = torch.zeros(prob.B, prob.n, prob.m, dtype=dt, device=dev)
        else:
            self.dx = torch.zeros(prob.B, prob.n, prob.d, dtype=dt, device=dev)
            self.dy = torch.zeros(prob.B, prob.m, prob.d, dtype=dt, device=dev) \
                if need_dy else None
        self.emitted = False  # accumulate after the first emission

    def targets(self, rows: bool, designated: bool) -> dict:
        """Kernel outputs of a pass in orientation ``rows``."""
        if self.dense:
            return {"g_out": self.dC} if designated else {}
        out = self.dx if rows else self.dy
        return {"grad_out": out} if out is not None else {}


def _term(
    prob: _Problem,
    sink: _Sink,
    p: torch.Tensor,
    q: torch.Tensor,
    K: float,
    *,
    alpha: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    gamma: torch.Tensor | None = None,
    act: torch.Tensor | None = None,
    thr: int = 1,
    sum_rows: bool = False,
    sum_cols: bool = False,
    s2: int = 0,
    emit: bool = True,
) -> tuple:
    """Apply one G term (row orientation given) in the fewest passes.

    Returns ``((s1_rows, s2_rows), (s1_cols, s2_cols))`` (None where not asked). The dense
    G is emitted by exactly one pass; point gradients by the row pass (dx) and the column
    pass (dy, when needed).
    """
    accum = sink.emitted
    need_row = sum_rows or (emit and (not sink.dense or not sum_cols))
    need_col = sum_cols or (emit and not sink.dense and sink.dy is not None)
    res_r = res_c = (None, None)
    common = dict(gamma=gamma, act=act, thr=thr, accum=accum, s2=s2)
    if need_row:
        tgt = sink.targets(True, designated=True) if emit else {}
        res_r = prob.plan(True, p, q, K, alpha=alpha, beta=beta, sums=sum_rows, **tgt,
                          **common)
    if need_col:
        tgt = sink.targets(False, designated=not need_row) if emit else {}
        res_c = prob.plan(False, q, p, K, alpha=beta, beta=alpha, sums=sum_cols, **tgt,
                          **common)
    if emit:
        sink.emitted = True
    return res_r, res_c


def _plan_pq(prob: _Problem, f: torch.Tensor, g: torch.Tensor, eps: float):
    """Row/column exponents of P: p = log2 a + f K, q = log2 b + g K (NEG where invalid)."""
    K = LOG2E / eps
    p = prob.masked(prob.log2a() + f * K, True)
    q = prob.masked(prob.log2b() + g * K, False)
    return p, q, K


def _bcast(v: torch.Tensor, L: int) -> torch.Tensor:
    return v[:, None].expand(-1, L).contiguous()


def _implicit_uv(prob: _Problem, p, q, K, cfg: SolverConfig):
    """Jacobi-PCG on H [u; v] = [(P∘C)1; (P∘C)ᵀ1] with streamed matvecs; scalars on device.

    H = [[κ diag(r), P], [Pᵀ, κ diag(c)]] with κ = 1 + ε/ρ for unbalanced problems (1 when
    balanced), as in :func:`optical_kernels.backends.torch.implicit_linear_grad`.
    """
    dt = prob.dtype
    r, rhs_u = prob.plan(True, p, q, K, sums=True, s2=1)
    c, rhs_v = prob.plan(False, q, p, K, sums=True, s2=1)
    va = prob.rows.valid & prob.nonempty[:, None]
    vb = prob.cols.valid & prob.nonempty[:, None]
    rhs_u = torch.where(va, rhs_u, 0.0)
    rhs_v = torch.where(vb, rhs_v, 0.0)
    tiny = torch.finfo(dt).tiny
    extra = 0.0 if cfg.rho is None else cfg.eps / cfg.rho  # κ − 1
    du = torch.where(va & (r > tiny), (1.0 + extra) * r, 1.0)
    dv = torch.where(vb & (c > tiny), (1.0 + extra) * c, 1.0)

    def dot(x1, y1, x2, y2):
        return (x1 * x2).sum(1) + (y1 * y2).sum(1)

    max_iter, tol = cfg.cg_limits(prob.n, prob.m, dt, streamed=True)
    u, v = torch.zeros_like(rhs_u), torch.zeros_like(rhs_v)
    ru, rv = rhs_u.clone(), rhs_v.clone()
    zu, zv = ru / du, rv / dv
    pu, pv = zu.clone(), zv.clone()
    rz = dot(ru, rv, zu, zv)
    bnorm = dot(rhs_u, rhs_v, rhs_u, rhs_v).sqrt()
    done = (bnorm == 0) | ~prob.nonempty
    for it in range(max_iter):
        cg_act = (~done).to(torch.int32)
        hu, _ = prob.plan(True, p, q, K, alpha=pu, beta=pv, sums=True, act=cg_act)
        hv, _ = prob.plan(False, q, p, K, alpha=pv, beta=pu, sums=True, act=cg_act)
        if extra:
            hu = hu + extra * torch.where(va, r, 0.0) * pu
            hv = hv + extra * torch.where(vb, c, 0.0) * pv
        php = dot(pu, pv, hu, hv)
        alpha = torch.where(done | (php <= 0), 0.0, rz / torch.where(php > 0, php, 1.0))
        u = u + alpha[:, None] * pu
        v = v + alpha[:, None] * pv
        ru = ru - alpha[:, None] * hu
        rv = rv - alpha[:, None] * hv
        done = done | (dot(ru, rv, ru, rv).sqrt() <= tol * bnorm) | (php <= 0)
        if CG_SYNC_EVERY and it % CG_SYNC_EVERY == CG_SYNC_EVERY - 1 and bool(done.all()):
            break
        zu, zv = ru / du, rv / dv
        rz_new = dot(ru, rv, zu, zv)
        beta = torch.where(done, 0.0, rz_new / torch.where(rz != 0, rz, 1.0))
        pu = (zu + beta[:, None] * pu).contiguous()
        pv = (zv + beta[:, None] * pv).contiguous()
        rz = rz_new
    return u.contiguous(), v.contiguous()


def _backward(
    prob: _Problem,
    out: SolverOut,
    grad_value: torch.Tensor,
    grad_value_linear: torch.Tensor,
    cfg: SolverConfig,
    need_dy: bool,
) -> _Sink:
    """G = ∂L/∂C per ``cfg.grad`` streamed into a :class:`_Sink` (docs/design.md §3)."""
    dt = prob.dtype
    B, n = prob.B, prob.n
    gv = grad_value.to(dt).reshape(B)
    gl = grad_value_linear.to(dt).reshape(B)
    f, g = out.f.to(dt).contiguous(), out.g.to(dt).contiguous()
    eps = cfg.eps
    sink = _Sink(prob, need_dy)
    p, q, K = _plan_pq(prob, f, g, eps)
    if cfg.grad == "envelope":
        _term(prob, sink, p, q, K, alpha=_bcast(gv + gl, n))
        return sink
    if cfg.grad == "implicit":
        u, v = _implicit_uv(prob, p, q, K, cfg)
        w = gl / eps
        _term(prob, sink, p, q, K, alpha=(_bcast(gv + gl, n) + w[:, None] * u).contiguous(),
              beta=(w[:, None] * v).contiguous(), gamma=(-w).contiguous())
        return sink
    _unrolled(prob, sink, out, f, g, p, q, K, gv, gl, cfg)
    return sink


def _unrolled(prob, sink, out, f, g, p, q, K, gv, gl, cfg) -> None:  # noqa: ANN001
    """Reverse pass over the stored potentials (memory O(B·T·(n+m)), no [B, n, m] per step).

    Direct part of ``L = gv·value + gl·value_linear`` at fixed (f, g), with
    ``D_ij = d_i + e_j``, ``d = f + ρ log(r/a)``, ``e = g + ρ log(c/b)`` (ρ terms if unbalanced)::

        G0 = P∘((gv+gl) − gv D/ε − gl C/ε),   f̄ = (gv+gl) r − G0 1,   ḡ = (gv+gl) c − G0ᵀ 1

    then for t = T..1 (problems with t ≤ n_iters): σ = softmax_i weights of the g-update,
    π = softmax_j weights of the f-update, recomputed from f_t, g_t, g_{t−1}::

        G += λσ∘ḡ_j,  f̄ −= λ σ ḡ,  ḡ ← 0;   G += λπ∘f̄_i,  ḡ −= λ πᵀ f̄,  f̄ ← 0

    Given C: 2 passes per step (G accumulated into dC). Points: 4 passes per step (σ columns
    [+dy], σ rows + dx, π rows + dx, π columns [+dy]), σ and π renormalised in-pass.
    """
    eps, rho = cfg.eps, cfg.rho
    dt = prob.dtype
    va = prob.rows.valid & prob.nonempty[:, None]
    vb = prob.cols.valid & prob.nonempty[:, None]
    d_vec, e_vec = f, g
    if rho is not None:
        L = torch.zeros_like(f)
        Lc = torch.zeros_like(g)
        prob.lse(True, g, L, eps, stats=True)
        prob.lse(False, f, Lc, eps, stats=True)
        d_vec = torch.where(va, f + rho * (f / eps + L), 0.0)  # log(r/a) = f/ε + L
        e_vec = torch.where(vb, g + rho * (g / eps + Lc), 0.0)
    s = gv + gl
    alpha = (s[:, None] - gv[:, None] * d_vec / eps).contiguous()
    beta = (-gv[:, None] * e_vec / eps).contiguous()
    (g0r, r), (g0c, c) = _term(prob, sink, p, q, K, alpha=alpha, beta=beta,
                               gamma=(-gl / eps).contiguous(), sum_rows=True, sum_cols=True,
                               s2=2)
    fbar = torch.where(va, s[:, None] * r - g0r, 0.0)
    gbar = torch.where(vb, s[:, None] * c - g0c, 0.0)
    if out.history is None:
        return
    hist_f, hist_g = out.history
    hist_f = hist_f.to(dt)
    hist_g = hist_g.to(dt)
    la2, lb2 = prob.log2a(), prob.log2b()
    n_iters = out.n_iters.to(torch.int32).contiguous()
    zeros_g = torch.zeros_like(g)
    for t in range(hist_f.shape[0], 0, -1):
        act = (n_iters >= t)[:, None]
        eps_t = cfg.eps_at(t)
        lam = cfg.damping(eps_t)
        Kt = LOG2E / eps_t
        f_t, g_t = hist_f[t - 1], hist_g[t - 1]
        g_prev = hist_g[t - 2] if t >= 2 else zeros_g
        # g-update weights σ_ij = a_i exp((f_i + g_j/λ − C_ij)/ε_t)  (softmax over i)
        ps = prob.masked(la2 + f_t * Kt, True)
        qs = prob.masked(g_t * (Kt / lam), False)
        # f-update weights π_ij = b_j exp((f_i/λ + g_prev_j − C_ij)/ε_t)  (softmax over j)
        pp = prob.masked(f_t * (Kt / lam), True)
        qp = prob.masked(lb2 + g_prev * Kt, False)
        if sink.dense:
            (sr, _), _ = _term(prob, sink, ps, qs, Kt, beta=(lam * gbar).contiguous(),
                               act=n_iters, thr=t, sum_rows=True)
            fbar = torch.where(act, fbar - sr, fbar)
            gbar = torch.where(act, 0.0, gbar)
            _, (sc, _) = _term(prob, sink, pp, qp, Kt, alpha=(lam * fbar).contiguous(),
                               act=n_iters, thr=t, sum_cols=True)
            gbar = torch.where(act, gbar - sc, gbar)
            fbar = torch.where(act, 0.0, fbar)
            continue
        # points: each softmax is renormalised along its own axis in the pass that owns that
        # axis (POST), so the per-step gradients, which largely cancel across steps, stay
        # consistent with the reference's softmax to fp32 rounding
        kw = dict(act=n_iters, thr=t, accum=True)
        dyo = {"grad_out": sink.dy} if sink.dy is not None else {}
        _, colsum = prob.plan(False, qs, ps, Kt, post=(lam * gbar).contiguous(), **dyo, **kw)
        w = torch.where(colsum > 0, lam * gbar / torch.where(colsum > 0, colsum, 1.0), 0.0)
        sr, _ = prob.plan(True, ps, qs, Kt, beta=w.contiguous(), sums=True,
                          grad_out=sink.dx, **kw)
        fbar = torch.where(act, fbar - sr, fbar)
        gbar = torch.where(act, 0.0, gbar)
        _, rowsum = prob.plan(True, pp, qp, Kt, post=(lam * fbar).contiguous(),
                              grad_out=sink.dx, **kw)
        w = torch.where(rowsum > 0, lam * fbar / torch.where(rowsum > 0, rowsum, 1.0), 0.0)
        sc, _ = prob.plan(False, qp, pp, Kt, beta=w.contiguous(), sums=True, **dyo, **kw)
        gbar = torch.where(act, gbar - sc, gbar)
        fbar = torch.where(act, 0.0, fbar)


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
    _backward_checks(cfg)
    if C.dim() != 3:
        raise ValueError(f"C must have shape (B, n, m), got {tuple(C.shape)}")
    B, n, m = C.shape
    _check_weights(a, b, n, m, B)
    if B == 0 or n == 0 or m == 0:
        dt = torch.float64 if (C.dtype == torch.float64 or a.dtype == torch.float64) \
            else torch.float32
        return torch.zeros(B, n, m, dtype=dt, device=C.device)
    prob = _Problem(a, b, C=C, tiles=tiles)
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
    _backward_checks(cfg)
    _check_points(x, y)
    B, n, _ = x.shape
    m = y.shape[1]
    _check_weights(a, b, n, m, B)
    if cost not in COST_CODES:
        raise ValueError(f"cost must be one of {tuple(COST_CODES)}, got {cost!r}")
    if B == 0 or n == 0 or m == 0:
        return torch.zeros_like(x), (torch.zeros_like(y) if need_dy else None)
    prob = _Problem(a, b, x=x, y=y, cost=cost, tiles=tiles)
    sink = _backward(prob, out, grad_value, grad_value_linear, cfg, need_dy)
    dx = sink.dx.to(x.dtype)
    dy = sink.dy.to(y.dtype) if need_dy else None
    return dx, dy


def _backward_checks(cfg: SolverConfig) -> None:
    if cfg.grad not in ("envelope", "implicit", "unrolled"):
        raise ValueError(f"grad must be one of envelope, implicit, unrolled; got {cfg.grad!r}")


def is_available() -> tuple[bool, str]:
    """Triton importable (GPU use additionally needs CUDA tensors or TRITON_INTERPRET=1)."""
    return True, f"triton {triton.__version__}"


__all__ = [
    "Tiles",
    "DEFAULT_TILES",
    "forward",
    "backward",
    "forward_sample",
    "backward_sample",
    "is_available",
]
