"""The ``torch`` backend: the reference solver and every gradient mode (the oracle).

Readable batched PyTorch, float32 and float64, CPU or GPU. It implements the backend
contract of :mod:`optical_kernels.backends.contract` exactly; every other backend is tested
against it, and it is itself tested against POT in float64.

* :func:`forward`  — log-domain Sinkhorn (docs/design.md §2) with per-problem convergence.
* :func:`backward` — ``∂L/∂C`` for ``envelope``, ``implicit`` (batched preconditioned CG on
  the docs/design.md §3 system, restricted to valid entries) and ``unrolled`` (reverse pass over the
  stored potentials, recomputing the softmax weights: memory O(B·T·(n+m)) plus one
  [B, n, m] work buffer, never [B, n, m] per iteration). No autograd graph of the loop is
  ever built.
"""

from __future__ import annotations

import torch

from ..config import SolverConfig, SolverOut
from . import contract

NEG_INF = float("-inf")


# --------------------------------------------------------------------------- helpers
def _masks(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Valid rows [B, n], valid columns [B, m], non-empty problems [B]."""
    va, vb = a > 0, b > 0
    nonempty = va.any(1) & vb.any(1)
    return va, vb, nonempty


def _log_weights(w: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """log w at valid positions, −inf elsewhere."""
    return torch.where(valid, w.clamp_min(torch.finfo(w.dtype).tiny).log(), NEG_INF)


def _safe_log_weights(w: torch.Tensor, nonempty: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Like :func:`_log_weights`, but empty problems get 0 everywhere (keeps LSE finite)."""
    return torch.where(nonempty[:, None], _log_weights(w, valid), 0.0)


def _lse_rows(C: torch.Tensor, lb: torch.Tensor, g: torch.Tensor, eps: float) -> torch.Tensor:
    """LSE_j [ log b_j + (g_j − C_ij)/ε ] -> [B, n]."""
    return torch.logsumexp(lb[:, None, :] + (g[:, None, :] - C) / eps, dim=2)


def _lse_cols(C: torch.Tensor, la: torch.Tensor, f: torch.Tensor, eps: float) -> torch.Tensor:
    """LSE_i [ log a_i + (f_i − C_ij)/ε ] -> [B, m]."""
    return torch.logsumexp(la[:, :, None] + (f[:, :, None] - C) / eps, dim=1)


def marginal_error(
    C: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    f: torch.Tensor,
    g: torch.Tensor,
    eps: float,
    rho: float | None,
) -> torch.Tensor:
    """L1 row-marginal error ``Σ_i |Σ_j P_ij − a_i exp(−f_i/ρ)|`` -> [B]; for unbalanced
    problems relative to the mass, divided by ``max(Σ_ij P_ij, Σ_i a_i exp(−f_i/ρ))`` (0 when
    both are 0), so that a problem transporting little mass is not stopped far from its fixed
    point (:mod:`optical_kernels.config`)."""
    va, vb, nonempty = _masks(a, b)
    la = _safe_log_weights(a, nonempty, va)
    lb = _safe_log_weights(b, nonempty, vb)
    log_r = la + f / eps + _lse_rows(C, lb, g, eps)
    target = a if rho is None else a * torch.exp(-f / rho)
    keep = va & nonempty[:, None]
    r = torch.where(keep, log_r.exp(), 0.0)
    err = torch.where(keep, (r - target).abs(), 0.0).sum(1)
    if rho is None:
        return err
    denom = torch.maximum(r.sum(1), torch.where(keep, target, 0.0).sum(1))
    return torch.where(denom > 0, err / torch.where(denom > 0, denom, 1.0), 0.0)


def log_plan(
    C: torch.Tensor, a: torch.Tensor, b: torch.Tensor, f: torch.Tensor, g: torch.Tensor, eps: float
) -> torch.Tensor:
    """``log P_ij = log a_i + log b_j + (f_i + g_j − C_ij)/ε``, −inf at padded entries."""
    va, vb, _ = _masks(a, b)
    mask = va[:, :, None] & vb[:, None, :]
    z = (f[:, :, None] + g[:, None, :] - C) / eps
    la = torch.where(va, a.clamp_min(torch.finfo(a.dtype).tiny).log(), 0.0)
    lb = torch.where(vb, b.clamp_min(torch.finfo(b.dtype).tiny).log(), 0.0)
    return torch.where(mask, la[:, :, None] + lb[:, None, :] + z, NEG_INF)


def plan(
    C: torch.Tensor, a: torch.Tensor, b: torch.Tensor, f: torch.Tensor, g: torch.Tensor, eps: float
) -> torch.Tensor:
    """Transport plan ``P = a ⊗ b · exp((f ⊕ g − C)/ε)`` [B, n, m], 0 at padded entries."""
    return log_plan(C, a, b, f, g, eps).exp()


def values(
    C: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    f: torch.Tensor,
    g: torch.Tensor,
    eps: float,
    rho: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(value, value_linear)`` [B] from potentials; differentiable in C, f, g (no NaN grads).

    ``value = <P, C> + ε KL(P ‖ a⊗b) [+ ρ KL(P1 ‖ a) + ρ KL(Pᵀ1 ‖ b)]`` (generalised KL).
    """
    va, vb, nonempty = _masks(a, b)
    lp = log_plan(C, a, b, f, g, eps)
    P = lp.exp()
    value_linear = (P * C).sum((1, 2))
    mass = P.sum((1, 2))
    kl = (P * (f[:, :, None] + g[:, None, :] - C)).sum((1, 2)) / eps - mass + a.sum(1) * b.sum(1)
    value = value_linear + eps * kl
    if rho is not None:
        for dim, w, valid in ((2, a, va), (1, b, vb)):
            keep = valid & nonempty[:, None]
            lp_safe = torch.where(keep.unsqueeze(dim), lp, 0.0)
            log_marg = torch.logsumexp(lp_safe, dim=dim)
            lw = torch.where(keep, w.clamp_min(torch.finfo(w.dtype).tiny).log(), 0.0)
            marg = log_marg.exp()
            kl_m = torch.where(keep, marg * (log_marg - lw) - marg + w, 0.0).sum(1)
            value = value + rho * kl_m
    zero = torch.zeros_like(value)
    return torch.where(nonempty, value, zero), torch.where(nonempty, value_linear, zero)


def values_vjp(
    C: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    f: torch.Tensor,
    g: torch.Tensor,
    eps: float,
    rho: float | None,
    grad_value: torch.Tensor,
    grad_value_linear: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Partials of ``L = Σ_k gv_k value_k + gvl_k value_linear_k`` in (C, f, g) at fixed
    potentials (no autograd: custom-op implementations run with autograd off)::

        Q_ij = gvl·C_ij + gv·(f_i + g_j + ℓr_i + ℓc_j),  ℓr = ρ log(P1/a), ℓc = ρ log(Pᵀ1/b)
        ∂L/∂C = (gv + gvl)·P − P∘Q/ε,   ∂L/∂f = (P∘Q)1/ε,   ∂L/∂g = (P∘Q)ᵀ1/ε

    (the ℓ terms only when ``rho`` is set). Returns ``(dC [B,n,m], df [B,n], dg [B,m])``.
    """
    va, vb, nonempty = _masks(a, b)
    lp = log_plan(C, a, b, f, g, eps)
    P = lp.exp()
    gv = grad_value[:, None, None]
    gvl = grad_value_linear[:, None, None]
    S = f[:, :, None] + g[:, None, :]
    if rho is not None:
        for dim, w, valid in ((2, a, va), (1, b, vb)):
            keep = valid & nonempty[:, None]
            log_marg = torch.logsumexp(torch.where(keep.unsqueeze(dim), lp, 0.0), dim=dim)
            lw = torch.where(keep, w.clamp_min(torch.finfo(w.dtype).tiny).log(), 0.0)
            ell = torch.where(keep, rho * (log_marg - lw), 0.0)
            S = S + ell.unsqueeze(dim)
    Q = gvl * C + gv * S
    PQ = P * Q / eps
    return (gv + gvl) * P - PQ, PQ.sum(2), PQ.sum(1)


# --------------------------------------------------------------------------- forward
def forward(C: torch.Tensor, a: torch.Tensor, b: torch.Tensor, cfg: SolverConfig) -> SolverOut:
    """Solve a padded batch: C [B, n, m], a [B, n], b [B, m] -> :class:`SolverOut`.

    Implements the iteration map of :mod:`optical_kernels.config` exactly.
    """
    B, n, m = C.shape
    va, vb, nonempty = _masks(a, b)
    la = _safe_log_weights(a, nonempty, va)
    lb = _safe_log_weights(b, nonempty, vb)
    f = C.new_zeros(B, n)
    g = C.new_zeros(B, m)
    active = nonempty.clone()
    n_iters = torch.zeros(B, dtype=torch.int32, device=C.device)
    keep_history = cfg.grad == "unrolled"
    hist_f: list[torch.Tensor] = []
    hist_g: list[torch.Tensor] = []
    for t in range(1, cfg.max_iter + 1):
        eps_t = cfg.eps_at(t)
        lam = cfg.damping(eps_t)
        f_new = -lam * eps_t * _lse_rows(C, lb, g, eps_t)
        g_new = -lam * eps_t * _lse_cols(C, la, f_new, eps_t)
        f = torch.where(active[:, None], f_new, f)
        g = torch.where(active[:, None], g_new, g)
        n_iters += active.to(torch.int32)
        if keep_history:
            hist_f.append(f)
            hist_g.append(g)
        if cfg.checks_at(t):
            err = marginal_error(C, a, b, f, g, cfg.eps, cfg.rho)
            active = active & (err >= cfg.tol)
            if t % (4 * cfg.check_every) == 0 and not bool(active.any()):
                break  # reference only: one host sync every 4 checks
    f = torch.where(va & nonempty[:, None], f, 0.0)
    g = torch.where(vb & nonempty[:, None], g, 0.0)
    err = marginal_error(C, a, b, f, g, cfg.eps, cfg.rho)
    value, value_linear = values(C, a, b, f, g, cfg.eps, cfg.rho)
    hf, hg = (torch.stack(hist_f), torch.stack(hist_g)) if hist_f else (None, None)
    return contract.solver_out(f, g, value, value_linear, n_iters, err, hf, hg, cfg)


# --------------------------------------------------------------------------- backward
def backward(
    C: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    out: SolverOut,
    grad_value: torch.Tensor,
    grad_value_linear: torch.Tensor,
    cfg: SolverConfig,
) -> torch.Tensor:
    """``∂(Σ_k gv_k value_k + gvl_k value_linear_k)/∂C`` [B, n, m] for ``cfg.grad``."""
    contract.check_grad(cfg)
    if cfg.grad == "unrolled":
        return _unrolled(C, a, b, out, grad_value, grad_value_linear, cfg)
    P = plan(C, a, b, out.f, out.g, cfg.eps)
    if cfg.grad == "envelope":
        return (grad_value + grad_value_linear)[:, None, None] * P
    return grad_value[:, None, None] * P + grad_value_linear[:, None, None] * implicit_linear_grad(
        C, P, a, b, cfg
    )


def implicit_linear_grad(
    C: torch.Tensor, P: torch.Tensor, a: torch.Tensor, b: torch.Tensor, cfg: SolverConfig
) -> torch.Tensor:
    """Exact ``∂<P*(C), C>/∂C`` at the fixed point (docs/design.md §3), via batched Jacobi-PCG::

        H = [[κ diag(P1), P], [Pᵀ, κ diag(Pᵀ1)]],   H [u; v] = [(P∘C)1; (P∘C)ᵀ1]
        ∂L/∂C_ij = P_ij (1 + (u_i + v_j − C_ij)/ε)

    κ = 1 for balanced problems: H is singular (null space (1, −1)) but the right-hand side
    is orthogonal to it, so CG converges. Unbalanced problems (``rho``) differentiate the
    damped fixed point ``f = −λε LSE(·)``, λ = ρ/(ρ+ε), which gives κ = 1/λ = 1 + ε/ρ and a
    positive definite H. Invalid entries are decoupled (identity rows, zero rhs).
    """
    va, vb, _ = _masks(a, b)
    PC = P * C
    rhs_u, rhs_v = PC.sum(2), PC.sum(1)
    kappa = 1.0 if cfg.rho is None else 1.0 + cfg.eps / cfg.rho
    r, c = kappa * P.sum(2), kappa * P.sum(1)
    tiny = torch.finfo(C.dtype).tiny
    du = torch.where(va & (r > tiny), r, torch.ones_like(r))
    dv = torch.where(vb & (c > tiny), c, torch.ones_like(c))

    def matvec(u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hu = torch.where(va, r * u + torch.einsum("bij,bj->bi", P, v), u)
        hv = torch.where(vb, c * v + torch.einsum("bij,bi->bj", P, u), v)
        return hu, hv

    n, m = C.shape[1:]
    max_iter, tol = cfg.cg_limits(n, m, C.dtype)
    u, v = contract.jacobi_pcg(lambda pu, pv, _: matvec(pu, pv), rhs_u, rhs_v, du, dv,
                               torch.zeros(C.shape[0], dtype=torch.bool, device=C.device),
                               max_iter, tol)
    return P * (1.0 + (u[:, :, None] + v[:, None, :] - C) / cfg.eps)


def _unrolled(
    C: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    out: SolverOut,
    grad_value: torch.Tensor,
    grad_value_linear: torch.Tensor,
    cfg: SolverConfig,
) -> torch.Tensor:
    """Reverse pass through the iterations actually run (exact derivative of the map)."""
    dC, fbar, gbar = values_vjp(
        C, a, b, out.f, out.g, cfg.eps, cfg.rho, grad_value, grad_value_linear
    )
    if out.history is None:
        return dC
    hist_f, hist_g = out.history
    va, vb, nonempty = _masks(a, b)
    la = _safe_log_weights(a, nonempty, va)
    lb = _safe_log_weights(b, nonempty, vb)
    n_iters = out.n_iters
    last = min(hist_f.shape[0], int(n_iters.max())) if n_iters.numel() else 0
    for t in range(last, 0, -1):
        act = (n_iters >= t)[:, None]
        eps_t = cfg.eps_at(t)
        lam = cfg.damping(eps_t)
        f_t = hist_f[t - 1]
        g_prev = hist_g[t - 2] if t >= 2 else torch.zeros_like(hist_g[0])
        # g_t = −λε LSE_i[la_i + (f_t,i − C_ij)/ε]  ->  weights T (softmax over i)
        Tw = torch.softmax(la[:, :, None] + (f_t[:, :, None] - C) / eps_t, dim=1)
        gb = torch.where(act, gbar, 0.0)
        dC = dC + lam * Tw * gb[:, None, :]
        fbar = fbar - lam * torch.einsum("bij,bj->bi", Tw, gb)
        gbar = torch.where(act, 0.0, gbar)
        # f_t = −λε LSE_j[lb_j + (g_{t−1},j − C_ij)/ε]  ->  weights S (softmax over j)
        Sw = torch.softmax(lb[:, None, :] + (g_prev[:, None, :] - C) / eps_t, dim=2)
        fb = torch.where(act, fbar, 0.0)
        dC = dC + lam * Sw * fb[:, :, None]
        gbar = gbar - lam * torch.einsum("bij,bi->bj", Sw, fb)
        fbar = torch.where(act, 0.0, fbar)
    mask = (va & nonempty[:, None])[:, :, None] & vb[:, None, :]
    return torch.where(mask, dC, 0.0)


def is_available() -> tuple[bool, str]:
    """The reference backend is always available."""
    return True, "pure PyTorch"
