"""Streaming Triton kernels (``@triton.jit`` only; docs/design.md §5, "Streaming kernel").

The host side that launches them is :mod:`.streaming_passes` (one launcher per kernel, both
pass orientations); the orchestration of the solve and of the gradients is :mod:`.streaming`
and :mod:`.streaming_backward`. Every program handles one (row block, problem) and loops over
column tiles, recomputing the cost tile on the fly — from points (``x·yᵀ`` on ``tl.dot`` plus
per-point norms: cosine, sqeuclidean, dot) or by reading a given ``C`` tile-wise.

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
problem's programs exit at once. Padded positions are those of weight 0 (a zero weight inside a
problem is masked likewise); ``rlen``/``clen`` (last positive weight + 1) only let programs
skip trailing padding.
"""

from __future__ import annotations

import triton
import triton.language as tl

LN2 = 0.6931471805599453

_NEG = tl.constexpr(-1.0e30)  # finite "−inf": NEG − NEG = 0, never NaN
_LN2 = tl.constexpr(LN2)


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
