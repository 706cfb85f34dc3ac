"""Ground costs between point sets and their chain rules (DESIGN §2-§3), in one place.

``C = cost_matrix(x, y, cost)`` for x [B, n, d], y [B, m, d] (or unbatched [n, d], [m, d]):

* ``cosine``      ``C_ij = 1 − x̂_i·ŷ_j`` with ``x̂ = x / max(‖x‖, 1e-8)`` (default);
* ``sqeuclidean`` ``C_ij = ‖x_i − y_j‖²`` (POT's ``ot.dist``, no ½), computed as
  ``‖x‖² + ‖y‖² − 2 x·y`` after centring both sets on a common mean;
* ``dot``         ``C_ij = −x_i·y_j``.

:func:`cost_vjp` gives ``(∂L/∂x, ∂L/∂y)`` from ``G = ∂L/∂C`` without autograd, for the
backends that fuse the cost into their kernels; the tests check it against autograd.
"""

from __future__ import annotations

import torch

COSTS = ("cosine", "sqeuclidean", "dot")
NORM_FLOOR = 1e-8


def _batched(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    if x.dim() == 2 and y.dim() == 2:
        return x.unsqueeze(0), y.unsqueeze(0), True
    return x, y, False


def normalize(x: torch.Tensor) -> torch.Tensor:
    """``x / max(‖x‖, 1e-8)`` along the last dimension."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(NORM_FLOOR)


def centre(
    x: torch.Tensor,
    y: torch.Tensor,
    x_valid: torch.Tensor | None = None,
    y_valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shift x [B, n, d] and y [B, m, d] by the (detached) mean of their valid points.

    ``‖x_i − y_j‖²`` is translation invariant, so the shift changes neither the cost nor its
    gradient; it only removes the fp32 cancellation of ``‖x‖² + ‖y‖² − 2x·y`` far from 0.
    """
    with torch.no_grad():
        wx = x.new_ones(x.shape[:-1]) if x_valid is None else x_valid.to(x.dtype)
        wy = y.new_ones(y.shape[:-1]) if y_valid is None else y_valid.to(y.dtype)
        total = (wx.sum(-1) + wy.sum(-1)).clamp_min(1.0)
        mean = (torch.einsum("bn,bnd->bd", wx, x) + torch.einsum("bm,bmd->bd", wy, y)) / total[
            :, None
        ]
    return x - mean[:, None, :], y - mean[:, None, :]


def cost_matrix(
    x: torch.Tensor,
    y: torch.Tensor,
    cost: str = "cosine",
    x_valid: torch.Tensor | None = None,
    y_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Differentiable cost matrix between x [B, n, d] and y [B, m, d] -> [B, n, m].

    Unbatched inputs [n, d], [m, d] give [n, m]. ``x_valid``/``y_valid`` ([B, n]/[B, m] bool)
    only select the points used for the centring of ``sqeuclidean``.
    """
    if cost not in COSTS:
        raise ValueError(f"cost must be one of {COSTS}, got {cost!r}")
    xb, yb, unbatched = _batched(x, y)
    if cost == "cosine":
        C = 1.0 - torch.bmm(normalize(xb), normalize(yb).transpose(1, 2))
    elif cost == "dot":
        C = -torch.bmm(xb, yb.transpose(1, 2))
    else:
        xc, yc = centre(xb, yb, x_valid, y_valid)
        C = (
            (xc * xc).sum(-1)[:, :, None]
            + (yc * yc).sum(-1)[:, None, :]
            - 2.0 * torch.bmm(xc, yc.transpose(1, 2))
        ).clamp_min(0.0)
    return C[0] if unbatched else C


def cost_vjp(
    G: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    cost: str,
    need_dy: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chain rule ``G = ∂L/∂C`` [B, n, m] -> ``(∂L/∂x [B, n, d], ∂L/∂y [B, m, d] | None)``.

    * cosine: ``∂L/∂x_i = −(1/‖x_i‖)(I − x̂_i x̂_iᵀ) Σ_j G_ij ŷ_j`` (0 where ‖x_i‖ < 1e-8 is
      clamped: there the normalisation is linear, ``∂x̂/∂x = I/1e-8``);
    * sqeuclidean: ``∂L/∂x_i = 2(r_i x_i − Σ_j G_ij y_j)`` with ``r = G1``;
    * dot: ``∂L/∂x_i = −Σ_j G_ij y_j``.
    """
    if cost == "dot":
        dx = -torch.bmm(G, y)
        dy = -torch.bmm(G.transpose(1, 2), x) if need_dy else None
        return dx, dy
    if cost == "sqeuclidean":
        dx = 2.0 * (G.sum(2)[..., None] * x - torch.bmm(G, y))
        dy = 2.0 * (G.sum(1)[..., None] * y - torch.bmm(G.transpose(1, 2), x)) if need_dy else None
        return dx, dy
    if cost != "cosine":
        raise ValueError(f"cost must be one of {COSTS}, got {cost!r}")

    def side(p: torch.Tensor, q_hat: torch.Tensor, Gs: torch.Tensor) -> torch.Tensor:
        norm = p.norm(dim=-1, keepdim=True)
        clamped = norm < NORM_FLOOR
        p_hat = p / norm.clamp_min(NORM_FLOOR)
        s = -torch.bmm(Gs, q_hat)  # ∂L/∂p̂
        proj = torch.where(clamped, s, s - (s * p_hat).sum(-1, keepdim=True) * p_hat)
        return proj / norm.clamp_min(NORM_FLOOR)

    x_hat, y_hat = normalize(x), normalize(y)
    dx = side(x, y_hat, G)
    dy = side(y, x_hat, G.transpose(1, 2)) if need_dy else None
    return dx, dy
