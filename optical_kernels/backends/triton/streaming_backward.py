"""Gradients of the streaming solve (docs/design.md §3) over the passes of :mod:`.streaming_passes`.

``G = ∂L/∂C`` is never materialised for points: each term of G is applied in the pass that
streams its tile (:func:`_term`), into a :class:`_Sink` — the dense ``dC`` [B, n, m] for a given
C, or ``dx`` [B, n, d] (and ``dy`` [B, m, d]) through the cost chain rule. Modes:

* envelope: 1 pass (dx or dC), +1 for dy;
* implicit: 2 (P1, (P∘C)1 and transposed) + 2 per CG step (Jacobi PCG, at most
  ``cfg.cg_limits(n, m, dtype, streamed=True)`` steps: ``cg_max_iter``, by default
  min(4(n+m)+50, ``config.CG_STREAMED_CAP`` = 1000); a host check every
  ``CG_SYNC_EVERY`` steps ends the loop once every problem is done) + the G pass(es);
* unrolled: 2 direct (+2 LSE when unbalanced) + per stored iteration 2 (given C, G accumulated
  into dC) or 4 (points; each softmax renormalised in-pass, dy carried along).

The public entry points (``backward``, ``backward_sample``) are in :mod:`.streaming`.
"""

from __future__ import annotations

import torch

from ...config import SolverConfig, SolverOut
from .. import contract
from .streaming_passes import LOG2E, Problem

CG_SYNC_EVERY = 10  # implicit backward: host check "all CG problems done" every k steps (0: never)


class _Sink:
    """Where G = ∂L/∂C goes: a dense dC (given C) or the point gradients dx [, dy]."""

    def __init__(self, prob: Problem, need_dy: bool) -> None:
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
    prob: Problem,
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


def _plan_pq(prob: Problem, f: torch.Tensor, g: torch.Tensor, eps: float):
    """Row/column exponents of P: p = log2 a + f K, q = log2 b + g K (NEG where invalid)."""
    K = LOG2E / eps
    p = prob.masked(prob.log2a() + f * K, True)
    q = prob.masked(prob.log2b() + g * K, False)
    return p, q, K


def _bcast(v: torch.Tensor, L: int) -> torch.Tensor:
    return v[:, None].expand(-1, L).contiguous()


def _implicit_uv(prob: Problem, p, q, K, cfg: SolverConfig):
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

    def matvec(pu: torch.Tensor, pv: torch.Tensor, done: torch.Tensor):
        cg_act = (~done).to(torch.int32)
        hu, _ = prob.plan(True, p, q, K, alpha=pu, beta=pv, sums=True, act=cg_act)
        hv, _ = prob.plan(False, q, p, K, alpha=pv, beta=pu, sums=True, act=cg_act)
        if extra:
            hu = hu + extra * torch.where(va, r, 0.0) * pu
            hv = hv + extra * torch.where(vb, c, 0.0) * pv
        return hu, hv

    max_iter, tol = cfg.cg_limits(prob.n, prob.m, dt, streamed=True)
    return contract.jacobi_pcg(matvec, rhs_u, rhs_v, du, dv, ~prob.nonempty, max_iter, tol,
                               sync_every=CG_SYNC_EVERY)


def _backward(
    prob: Problem,
    out: SolverOut,
    grad_value: torch.Tensor,
    grad_value_linear: torch.Tensor,
    cfg: SolverConfig,
    need_dy: bool,
) -> _Sink:
    """G = ∂L/∂C per ``cfg.grad`` streamed into a :class:`_Sink` (docs/design.md §3)."""
    dt = prob.dtype
    B, n = prob.B, prob.n
    gv, gl = contract.grad_weights(grad_value, grad_value_linear, B, dt, prob.device)
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
    hist = contract.history(out, cfg, prob.B, prob.n, prob.m, dt)
    if hist is None:
        return
    hist_f, hist_g = hist
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
