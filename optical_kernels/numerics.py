"""Numerical guards of the public API: exact shifts of the cost, and the checks that turn an
unrepresentable problem into a clear error instead of a NaN (issue 9).

* :func:`dot_shift` — balanced OT is unchanged by a constant shift of C (the iterates only
  move ``f`` by the constant): for ``cost="dot"`` the points are centred on their common mean
  μ and augmented so that the solver sees ``C' = C + |μ|²`` computed without cancellation::

      x' = [x − μ, μ·(x − μ), 1],   y' = [y − μ, 1, μ·(y − μ)],   −x'·y' = −x·y + |μ|²

  (exactly, for any μ), and the API adds ``−|μ|²`` back to ``value``/``value_linear`` (the
  plan has mass 1) and to ``f``. The iteration map, the plan, ``n_iters``, ``err`` and every
  gradient mode are those of the original problem; only the fp32 cancellation of the large
  constant ``|μ|²`` (and the ``mass error × |C|`` term of ``<P, C>``) is gone.
* :func:`constant_shift` — the same invariance for a given cost matrix (``solve``): the
  mid-range of the valid entries of each problem is subtracted.
* :func:`check_eps` — ε must be a normal number of the working dtype (≤ max/16) and
  ``ε ≥ eps_dtype² · max|C|``: the rounding error of ``(f + g − C)/ε``, about
  ``eps_dtype · max|C| / ε``, then stays below ``1/eps_dtype`` (far inside the range of the
  log-domain arithmetic; ε = 1e-300 gave NaN). The accuracy promise itself is the much
  narrower ``ε ≥ 1e-4 × cost range``.
* :func:`check_unbalanced_mass` — with negative costs (``dot``) the unbalanced optimal mass
  grows like ``exp(−min C/(ε + 2ρ))`` (exact for a constant cost and unit masses); a problem
  whose bound exceeds half the exponent range of the working dtype is rejected (every backend
  and dtype alike) rather than returning ±Inf/NaN.
"""

from __future__ import annotations

import math

import torch

from .config import SolverConfig, SolverOut


def dot_shift(
    x: torch.Tensor, y: torch.Tensor, x_valid: torch.Tensor, y_valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x' [B, n, d+2], y' [B, m, d+2], k [B] float64)`` with ``−x'·y' = −x·y − k``.

    μ is the detached mean of the valid points of both sets; ``k = −|μ|²`` (float64). x', y'
    are differentiable in x, y (0 at padded rows).
    """
    with torch.no_grad():
        wx, wy = x_valid.to(x.dtype), y_valid.to(y.dtype)
        total = (wx.sum(-1) + wy.sum(-1)).clamp_min(1.0)
        mean = (torch.einsum("bn,bnd->bd", wx, x) + torch.einsum("bm,bmd->bd", wy, y)) / total[
            :, None
        ]
        k = -(mean.double() ** 2).sum(-1)
    mu = mean[:, None, :]
    xc = torch.where(x_valid[..., None], x - mu, 0.0)
    yc = torch.where(y_valid[..., None], y - mu, 0.0)
    ones_x, ones_y = x_valid[..., None].to(x.dtype), y_valid[..., None].to(y.dtype)
    xa = torch.cat([xc, (xc * mu).sum(-1, keepdim=True), ones_x], dim=-1)
    ya = torch.cat([yc, ones_y, (yc * mu).sum(-1, keepdim=True)], dim=-1)
    return xa, ya, k


def constant_shift(C: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per-problem mid-range ``(max + min)/2`` of the valid entries of C [B, n, m] -> [B]
    float64 (0 for empty problems); detached."""
    with torch.no_grad():
        if C.numel() == 0:
            return torch.zeros(C.shape[0], dtype=torch.float64, device=C.device)
        hi = torch.where(valid, C, float("-inf")).amax((1, 2))
        lo = torch.where(valid, C, float("inf")).amin((1, 2))
        mid = (hi.double() + lo.double()) / 2
        return torch.where(torch.isfinite(mid), mid, 0.0)


def unshift(
    out: SolverOut, k: torch.Tensor, x_valid: torch.Tensor, y_valid: torch.Tensor
) -> SolverOut:
    """Undo a constant shift ``C' = C − k`` of a balanced solve: values and f move by k
    (empty problems keep their zeros)."""
    work = out.value.dtype

    def add(v: torch.Tensor) -> torch.Tensor:
        return (v.double() + k).to(work) if k.numel() else v

    nonempty = x_valid.any(1) & y_valid.any(1)
    value = torch.where(nonempty, add(out.value), out.value)
    value_linear = torch.where(nonempty, add(out.value_linear), out.value_linear)
    keep = x_valid & nonempty[:, None]
    f = torch.where(keep, (out.f.double() + k[:, None]).to(out.f.dtype), out.f)
    return out._replace(value=value, value_linear=value_linear, f=f)


def _max_norm(t: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """max ‖t_i‖ over the valid rows of each problem [B] (float64)."""
    norms = torch.linalg.vector_norm(t.detach(), dim=-1, dtype=torch.float64)
    return torch.where(valid, norms, 0.0).amax(-1) if norms.shape[-1] else norms.new_zeros(0)


def point_cost_scale(
    x: torch.Tensor,
    y: torch.Tensor,
    x_valid: torch.Tensor,
    y_valid: torch.Tensor,
    cost: str,
    self_solves: bool = False,
) -> tuple[float, float, float]:
    """``(bound on max|C|, bound on −min C, max point norm)`` over the batch for the points
    the solver gets (cheap Cauchy–Schwarz bounds, O(B·(n+m)·d); sqeuclidean points already
    centred; for dot the first bound also covers the shifted ``C + |μ|²`` of
    :func:`dot_shift`, and with ``self_solves`` (divergence) −min C covers OT(x,x), OT(y,y))."""
    if x.numel() == 0 or y.numel() == 0 or x.shape[0] == 0:
        return 0.0, 0.0, 0.0
    if cost == "cosine":  # C ∈ [0, 2] whatever the points: no pass over x, y (the S1 hot path)
        return 2.0, 0.0, 0.0
    nx, ny = _max_norm(x, x_valid), _max_norm(y, y_valid)
    top = float(torch.maximum(nx, ny).max())
    if cost == "sqeuclidean":
        return float(((nx + ny) ** 2).max()), 0.0, top
    prod = float((torch.maximum(nx, ny).square() if self_solves else nx * ny).max())
    return 2 * top**2, prod, top  # −min C ≤ max x·y;  |C + |μ|²| ≤ 2 max‖·‖²


def check_eps(eps: float, work: torch.dtype, scale: float) -> None:
    """ValueError unless ε is a normal number of ``work`` and ``ε ≥ eps_dtype² · scale``."""
    fi = torch.finfo(work)
    if not fi.tiny <= eps <= fi.max / 16:
        raise ValueError(
            f"eps={eps:g} is not representable for {work} inputs: eps must lie in "
            f"[{fi.tiny:.3g}, {fi.max / 16:.3g}]"
        )
    floor = fi.eps**2 * scale
    if scale > 0 and eps < floor:
        raise ValueError(
            f"eps={eps:g} is too small for costs up to {scale:.3g} in {work}: eps must be >= "
            f"{floor:.3g} (results are only promised for eps >= 1e-4 × the cost range)"
        )


def check_unbalanced_mass(
    cfg: SolverConfig,
    neg_min_cost: float,
    work: torch.dtype,
    cost: str,
    grad_dtype: torch.dtype | None = None,
    point_norm: float = 0.0,
) -> None:
    """ValueError when the unbalanced mass bound ``exp(−min C/(ε+2ρ))`` is not representable
    (within half the exponent range of ``work``; with ``grad_dtype``, e.g. float16 points, the
    gradient ``~ mass · ‖point‖`` must also fit that dtype)."""
    if cfg.rho is None or neg_min_cost <= 0:
        return
    log_mass = neg_min_cost / (cfg.eps + 2 * cfg.rho)
    limit = 0.5 * math.log(torch.finfo(work).max)
    if grad_dtype is not None:
        limit = min(limit, 0.5 * math.log(torch.finfo(grad_dtype).max) - math.log1p(point_norm))
    if log_mass > limit:
        raise ValueError(
            f"rho={cfg.rho:g} with cost={cost!r}: the costs reach {-neg_min_cost:.3g} < 0, and "
            f"the unbalanced transported mass grows like exp(−min C/(eps + 2·rho)) = "
            f"exp({log_mass:.3g}), beyond what {work} represents safely (exp({limit:.3g})); use "
            "a larger rho or eps, a non-negative cost ('cosine', 'sqeuclidean'), or rho=None"
        )


def check_point_problem(
    x: torch.Tensor,
    y: torch.Tensor,
    x_valid: torch.Tensor,
    y_valid: torch.Tensor,
    cost: str,
    cfg: SolverConfig,
    work: torch.dtype,
    self_solves: bool = False,
) -> None:
    """:func:`check_eps` and :func:`check_unbalanced_mass` for a point problem, on the points
    the solver will see (centred for sqeuclidean); ``self_solves`` for the divergence."""
    from .costs import centre

    with torch.no_grad():
        if cost == "sqeuclidean":
            x, y = centre(x, y, x_valid, y_valid)
        scale, neg_min, top = point_cost_scale(x, y, x_valid, y_valid, cost, self_solves)
    if not (math.isfinite(scale) and math.isfinite(neg_min)):
        return  # NaN/Inf points: reported by the finite checks, naming the argument
    check_eps(cfg.eps, work, scale)
    check_unbalanced_mass(cfg, neg_min, work, cost, x.dtype, top)


def check_cost_problem(C: torch.Tensor, valid: torch.Tensor, cfg: SolverConfig) -> None:
    """:func:`check_eps` (on C as solved) and :func:`check_unbalanced_mass` for a given cost."""
    if C.numel() == 0:
        return
    with torch.no_grad():
        Cv = torch.where(valid, C, 0.0)
        hi, lo = float(Cv.abs().amax()), float(Cv.amin())
    if not (math.isfinite(hi) and math.isfinite(lo)):
        return
    check_eps(cfg.eps, C.dtype, hi)
    check_unbalanced_mass(cfg, -lo, C.dtype, "given C")
