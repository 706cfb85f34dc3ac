"""Resident backward kernel: ``G = ∂L/∂C`` on chip, then the cost chain rule with ``tl.dot``.

One program per problem. It rebuilds the cost tile (given, or fused from x, y exactly as the
forward did), the plan ``P = a⊗b·exp((f⊕g − C)/ε)`` from the returned potentials, and forms
``G = gv·∂value/∂C + gl·∂value_linear/∂C`` by the mode of docs/design.md §3 (constexpr ``MODE``,
the codes of :class:`optical_kernels.constants.GradMode`):

* 0 ``envelope``: ``G = (gv + gl)·P``.
* 1 ``implicit``: ``G = gv·P + gl·P∘(1 + (u_i + v_j − C_ij)/ε)`` with ``[u; v]`` solving
  ``[[κ diag(r), P], [Pᵀ, κ diag(c)]] [u; v] = [(P∘C)1; (P∘C)ᵀ1]`` by Jacobi-preconditioned
  CG on chip (``r = P1``, ``c = Pᵀ1``, ``κ = 1`` balanced; ``κ = 1 + ε/ρ`` unbalanced, the
  Jacobian of the unbalanced fixed point, where the torch reference raises instead).
  Invalid coordinates are decoupled (identity rows, zero right-hand side), as in the
  reference; the CG cap and tolerance arrive resolved (:meth:`SolverConfig.cg_limits`).
* 2 ``unrolled``: seeds ``∂/∂(C, f_T, g_T)`` of the value formulas, then the reverse pass
  over the stored potentials ``hist_f[t-1], hist_g[t-1]`` (t = n_iters..1), recomputing the
  softmax weights of each half-step (``Q^g`` over i with f_t, ``Q^f`` over j with g_{t-1})::

      Ḡ += λ_t Q^g∘ḡ,  f̄ −= λ_t Q^g ḡ,   Ḡ += λ_t Q^f∘f̄,  ḡ = −λ_t Q^fᵀ f̄,  f̄ = 0

Cost chain rule (docs/design.md §3, as :func:`optical_kernels.costs.cost_vjp`), per d-chunk, with
``G·y`` and ``Gᵀ·x`` on tensor cores (fp32 operands unless ``LOWP``):

* cosine: ``∂L/∂x_i = (−Σ_j G_ij ŷ_j + s_i x̂_i)/max(‖x_i‖, 1e-8)`` with
  ``s_i = Σ_j G_ij (1 − C_ij)`` (no projection where ‖x_i‖ < 1e-8);
* sqeuclidean: ``2(r_i x_i − Σ_j G_ij y_j)``;  dot: ``−Σ_j G_ij y_j``; and symmetrically y.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ...config import resolve_cg
from ...constants import GradMode, cost_code, grad_code
from . import launch
from .resident import (
    _TL,
    COSINE,
    GIVEN,
    SQEUCLIDEAN,
    _cost_tile,
    _eps_at,
    _pair,
    _weights,
    acc_dtype,
    problem_dims,
    schedule_args,
    split_f64,
)

# the codes of constants.GradMode as the kernel compares them (MODE is a tl.constexpr argument)
ENVELOPE = tl.constexpr(int(GradMode.ENVELOPE))
IMPLICIT = tl.constexpr(int(GradMode.IMPLICIT))


@triton.jit
def _softmax_rows(z):
    """Row-wise softmax (base 2) of z [BN, BM]."""
    e = tl.exp2(z - tl.max(z, axis=1)[:, None])
    return e / tl.sum(e, axis=1)[:, None]


@triton.jit
def _softmax_cols(z):
    """Column-wise softmax (base 2) of z [BN, BM]."""
    e = tl.exp2(z - tl.max(z, axis=0)[None, :])
    return e / tl.sum(e, axis=0)[None, :]


@triton.jit
def resident_backward_kernel(
    C_ptr, x_ptr, y_ptr, a_ptr, b_ptr, f_ptr, g_ptr, gv_ptr, gl_ptr, nit_ptr, hf_ptr, hg_ptr,
    G_ptr, dx_ptr, dy_ptr,
    B, n, m, d,
    s_cb, s_cn, s_cm, s_xb, s_xn, s_xd, s_yb, s_ym, s_yd, s_ab, s_an, s_bb, s_bm,
    s_Gb, s_Gn, s_Gm, s_dxb, s_dxn, s_dxd, s_dyb, s_dym, s_dyd,
    eps_hi, eps_lo, rho_hi, rho_lo, st_hi, st_lo, lf_hi, lf_lo,
    t_eps, cg_max_iter, cg_tol,
    COST: tl.constexpr, BALANCED: tl.constexpr, MODE: tl.constexpr, NEED_DY: tl.constexpr,
    ACC: tl.constexpr, TINY: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr,
    BD: tl.constexpr, PREC: tl.constexpr, LOWP: tl.constexpr, UPCAST: tl.constexpr,
):
    """Gradient of problem ``program_id(0)`` (see the module docstring)."""
    pid = tl.program_id(0)
    pid64 = pid.to(tl.int64)
    offs_n = tl.arange(0, BN)
    offs_m = tl.arange(0, BM)

    a, va, la2, n_k, sa = _weights(a_ptr + pid64 * s_ab, s_an, n, BN, ACC)
    b, vb, lb2, m_k, sb = _weights(b_ptr + pid64 * s_bb, s_bm, m, BM, ACC)
    C, xx, yy = _cost_tile(C_ptr, x_ptr, y_ptr, pid, n_k, m_k, d,
                           s_cb, s_cn, s_cm, s_xb, s_xn, s_xd, s_yb, s_ym, s_yd,
                           COST, ACC, BN, BM, BD, PREC, UPCAST)
    mask = va[:, None] & vb[None, :]
    C = tl.where(mask, C, 0.0)

    LN2 = tl.log(tl.full([], 2.0, ACC))
    LOG2E = 1.0 / LN2
    eps = _pair(eps_hi, eps_lo, ACC)
    rho = _pair(rho_hi, rho_lo, ACC)
    k_eps = LOG2E / eps
    f = tl.load(f_ptr + pid64 * n + offs_n, mask=offs_n < n, other=0.0).to(ACC)
    g = tl.load(g_ptr + pid64 * m + offs_m, mask=offs_m < m, other=0.0).to(ACC)
    f = tl.where(va, f, 0.0)
    g = tl.where(vb, g, 0.0)
    gv = tl.load(gv_ptr + pid).to(ACC)
    gl = tl.load(gl_ptr + pid).to(ACC)

    P = tl.exp2(la2[:, None] + lb2[None, :] + (f[:, None] + g[None, :] - C) * k_eps)

    if MODE == ENVELOPE:
        G = (gv + gl) * P
    elif MODE == IMPLICIT:
        if BALANCED:
            kappa = 1.0
        else:
            kappa = 1.0 + eps / rho
        r = kappa * tl.sum(P, axis=1)
        c = kappa * tl.sum(P, axis=0)
        PC = P * C
        bu = tl.sum(PC, axis=1)
        bv = tl.sum(PC, axis=0)
        du = tl.where(va & (r > TINY), r, 1.0)
        dv = tl.where(vb & (c > TINY), c, 1.0)
        u = tl.zeros([BN], dtype=ACC)
        v = tl.zeros([BM], dtype=ACC)
        ru = bu
        rv = bv
        pu = ru / du
        pv = rv / dv
        rz = tl.sum(ru * pu, axis=0) + tl.sum(rv * pv, axis=0)
        bnorm = tl.sqrt(tl.sum(bu * bu, axis=0) + tl.sum(bv * bv, axis=0))
        done = (bnorm == 0.0) | (gl == 0.0)
        it = 0
        while (it < cg_max_iter) & (done == 0):
            hu = tl.where(va, r * pu + tl.sum(P * pv[None, :], axis=1), pu)
            hv = tl.where(vb, c * pv + tl.sum(P * pu[:, None], axis=0), pv)
            php = tl.sum(pu * hu, axis=0) + tl.sum(pv * hv, axis=0)
            alpha = tl.where(php > 0.0, rz / tl.where(php > 0.0, php, 1.0), 0.0)
            u += alpha * pu
            v += alpha * pv
            ru -= alpha * hu
            rv -= alpha * hv
            rnorm = tl.sqrt(tl.sum(ru * ru, axis=0) + tl.sum(rv * rv, axis=0))
            done = (rnorm <= cg_tol * bnorm) | (php <= 0.0)
            zu = ru / du
            zv = rv / dv
            rz_new = tl.sum(ru * zu, axis=0) + tl.sum(rv * zv, axis=0)
            beta = tl.where(done, 0.0, rz_new / tl.where(rz != 0.0, rz, 1.0))
            pu = zu + beta * pu
            pv = zv + beta * pv
            rz = rz_new
            it += 1
        G = gv * P + gl * (P * (1.0 + (u[:, None] + v[None, :] - C) / eps))
    else:
        # seeds: W = ∂V/∂P (gv·(f ⊕ g [+ ρ log marginal ratios]) + gl·C)
        W = gv * (f[:, None] + g[None, :]) + gl * C
        if not BALANCED:
            rr = tl.sum(P, axis=1)
            cc = tl.sum(P, axis=0)
            lr = tl.where(va & (rr > 0), tl.log2(tl.where(rr > 0, rr, 1.0)) - la2, 0.0) * LN2
            lc = tl.where(vb & (cc > 0), tl.log2(tl.where(cc > 0, cc, 1.0)) - lb2, 0.0) * LN2
            W += gv * rho * (lr[:, None] + lc[None, :])
        WP = W * P / eps
        G = (gv + gl) * P - WP
        fb = tl.sum(WP, axis=1)
        gb = tl.sum(WP, axis=0)
        start = _pair(st_hi, st_lo, ACC)
        lf = _pair(lf_hi, lf_lo, ACC)
        t = tl.load(nit_ptr + pid)
        while t > 0:
            eps_t = _eps_at(t, t_eps, eps, start, lf)
            k = LOG2E / eps_t
            if BALANCED:
                lam = 1.0
            else:
                lam = rho / (rho + eps_t)
            hoff = (t - 1).to(tl.int64) * B
            f_t = tl.load(hf_ptr + (hoff + pid64) * n + offs_n, mask=va, other=0.0)
            g_p = tl.load(hg_ptr + (hoff - B + pid64) * m + offs_m, mask=vb & (t >= 2),
                          other=0.0)
            Qg = _softmax_cols((f_t[:, None] - C) * k + la2[:, None])
            QgG = Qg * gb[None, :]
            G += lam * QgG
            fb -= lam * tl.sum(QgG, axis=1)
            Qf = _softmax_rows((g_p[None, :] - C) * k + lb2[None, :])
            QfF = Qf * fb[:, None]
            G += lam * QfF
            gb = -lam * tl.sum(QfF, axis=0)
            fb = tl.zeros([BN], dtype=ACC)
            t -= 1
    G = tl.where(mask, G, 0.0)

    if COST == GIVEN:
        gptrs = G_ptr + pid64 * s_Gb + offs_n[:, None] * s_Gn + offs_m[None, :] * s_Gm
        tl.store(gptrs, G.to(G_ptr.dtype.element_ty),
                 mask=(offs_n[:, None] < n) & (offs_m[None, :] < m))
    else:
        rowG = tl.sum(G, axis=1)
        colG = tl.sum(G, axis=0)
        if COST == COSINE:
            nx = tl.sqrt(xx)
            ny = tl.sqrt(yy)
            nxc = tl.maximum(nx, 1e-8)
            nyc = tl.maximum(ny, 1e-8)
            cosv = 1.0 - C
            sx = tl.where(nx < 1e-8, 0.0, tl.sum(G * cosv, axis=1))
            sy = tl.where(ny < 1e-8, 0.0, tl.sum(G * cosv, axis=0))
            Gx = tl.where((ny < 1e-8)[None, :], 0.0, G / nyc[None, :])  # x̂ = 0 there
            Gy = tl.where((nx < 1e-8)[:, None], 0.0, G / nxc[:, None])
        else:
            Gx = G
            Gy = G
        xb = x_ptr + pid64 * s_xb
        yb = y_ptr + pid64 * s_yb
        rn = offs_n < n_k
        rm = offs_m < m_k
        for d0 in range(0, d, BD):
            offs_d = d0 + tl.arange(0, BD)
            md = offs_d < d
            xt = tl.load(xb + offs_n[:, None] * s_xn + offs_d[None, :] * s_xd,
                         mask=rn[:, None] & md[None, :], other=0.0)
            yt = tl.load(yb + offs_m[:, None] * s_ym + offs_d[None, :] * s_yd,
                         mask=rm[:, None] & md[None, :], other=0.0)
            if LOWP:
                hx = tl.dot(Gx.to(yt.dtype), yt, input_precision=PREC, out_dtype=ACC)
            else:
                hx = tl.dot(Gx, yt.to(ACC), input_precision=PREC, out_dtype=ACC)
            xf = xt.to(ACC)
            if COST == COSINE:
                dx = (sx[:, None] * xf / nxc[:, None] - hx) / nxc[:, None]
                dx = tl.where((nx < 1e-8)[:, None], 0.0, dx)
            elif COST == SQEUCLIDEAN:
                dx = 2.0 * (rowG[:, None] * xf - hx)
            else:
                dx = -hx
            dmask = (offs_n[:, None] < n) & md[None, :]
            tl.store(dx_ptr + pid64 * s_dxb + offs_n[:, None] * s_dxn + offs_d[None, :] * s_dxd,
                     dx.to(dx_ptr.dtype.element_ty), mask=dmask)
            if NEED_DY:
                if LOWP:
                    hy = tl.dot(tl.trans(Gy.to(xt.dtype)), xt, input_precision=PREC,
                                out_dtype=ACC)
                else:
                    hy = tl.dot(tl.trans(Gy), xf, input_precision=PREC, out_dtype=ACC)
                yf = yt.to(ACC)
                if COST == COSINE:
                    dy = (sy[:, None] * yf / nyc[:, None] - hy) / nyc[:, None]
                    dy = tl.where((ny < 1e-8)[:, None], 0.0, dy)
                elif COST == SQEUCLIDEAN:
                    dy = 2.0 * (colG[:, None] * yf - hy)
                else:
                    dy = -hy
                dmy = (offs_m[:, None] < m) & md[None, :]
                tl.store(dy_ptr + pid64 * s_dyb + offs_m[:, None] * s_dym
                         + offs_d[None, :] * s_dyd, dy.to(dy_ptr.dtype.element_ty), mask=dmy)


def launch_backward(
    C: Tensor | None, x: Tensor | None, y: Tensor | None, a: Tensor, b: Tensor,
    f: Tensor, g: Tensor, n_iters: Tensor, hist_f: Tensor, hist_g: Tensor,
    grad_value: Tensor, grad_value_linear: Tensor, cost: str, need_dy: bool, mode: str,
    eps: float, rho: float | None, max_iter: int, sched_start: float | None,
    sched_factor: float | None, cg_max_iter: int, cg_tol: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Resident gradient: ``(G [B,n,m] or empty, dx [B,n,d] or empty, dy [B,m,d] or empty)``.

    ``G = ∂L/∂C`` when C is given (cost="given"), else ``(∂L/∂x, ∂L/∂y if need_dy)``; one
    launch. ``hist_f`` [T, B, n], ``hist_g`` [T, B, m] (T = 0: no history).
    """
    B, n, m, d, ref = problem_dims(C, x, y)
    in_dtype = ref.dtype
    acc = acc_dtype(in_dtype)
    dev = ref.device
    if C is not None:  # distinct empty outputs (no aliasing between the three)
        G = torch.empty(B, n, m, dtype=C.dtype, device=dev)
        dx, dy = ref.new_zeros(0), ref.new_zeros(0)
    else:
        G = ref.new_zeros(0)
        dx = torch.empty_like(x)
        dy = torch.empty_like(y) if need_dy else ref.new_zeros(0)
    if B == 0:
        return G, dx, dy
    a, b, f, g = (t.to(acc).contiguous() for t in (a, b, f, g))
    gv = grad_value.to(acc).contiguous()
    gl = grad_value_linear.to(acc).contiguous()
    n_iters = n_iters.to(torch.int32).contiguous()
    unrolled = mode == "unrolled" and hist_f.shape[0] > 0
    if mode == "unrolled" and not unrolled:  # no history: direct partials only, as the reference
        n_iters = torch.zeros_like(n_iters)
    hf = hist_f.to(acc).contiguous() if unrolled else f
    hg = hist_g.to(acc).contiguous() if unrolled else g
    ls = launch.resident(n, m, d, in_dtype, kernel="backward")
    t_eps, start, lf = schedule_args(eps, max_iter, sched_start, sched_factor)
    cgi, cgt = resolve_cg(cg_max_iter or None, cg_tol or None, n, m, acc)  # 0: the defaults
    z3 = (0, 0, 0)
    resident_backward_kernel[(B,)](
        C if C is not None else ref, x if x is not None else ref, y if y is not None else ref,
        a, b, f, g, gv, gl, n_iters, hf, hg,
        G if C is not None else ref, dx if C is None else ref,
        dy if (C is None and need_dy) else ref,
        B, n, m, d,
        *(C.stride() if C is not None else z3), *(x.stride() if x is not None else z3),
        *(y.stride() if y is not None else z3), a.stride(0), a.stride(1), b.stride(0),
        b.stride(1),
        *(G.stride() if C is not None else z3), *(dx.stride() if C is None else z3),
        *(dy.stride() if (C is None and need_dy) else z3),
        *split_f64(eps), *split_f64(rho if rho is not None else 1.0),
        *split_f64(start), *split_f64(lf),
        t_eps, cgi, cgt,
        COST=cost_code(cost), BALANCED=rho is None, MODE=grad_code(mode), NEED_DY=bool(need_dy),
        ACC=_TL[acc], TINY=torch.finfo(acc).tiny, BN=ls.BN, BM=ls.BM, BD=ls.BD, PREC=ls.prec,
        LOWP=launch.lowp_backward() and in_dtype in (torch.float16, torch.bfloat16)
        and not ls.upcast_dot, UPCAST=ls.upcast_dot,
        num_warps=ls.num_warps, num_stages=ls.num_stages,
    )
    return G, dx, dy
