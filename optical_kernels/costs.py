"""Ground costs between point sets and their chain rules (docs/design.md §2-§3), in one place.

``C = cost_matrix(x, y, cost)`` for x [B, n, d], y [B, m, d] (or unbatched [n, d], [m, d]):

* ``cosine``      ``C_ij = 1 − x̂_i·ŷ_j`` with ``x̂ = x / ‖x‖`` (default); a point with
  ``‖x‖ < 1e-8`` (the zero vector) has no direction: ``x̂ = 0``, so its row of C is 1 and its
  gradient is 0 in every dtype (the former ``x / 1e-8`` gave a 1e8-scale gradient, Inf in fp16);
* ``sqeuclidean`` ``C_ij = ‖x_i − y_j‖²`` (POT's ``ot.dist``, no ½), computed as
  ``‖x‖² + ‖y‖² − 2 x·y`` after centring both sets on a common mean;
* ``dot``         ``C_ij = −x_i·y_j``.

:func:`cost_vjp` gives ``(∂L/∂x, ∂L/∂y)`` from ``G = ∂L/∂C`` without autograd, for the
backends that fuse the cost into their kernels; the tests check it against autograd.
"""

from __future__ import annotations

import torch

from .constants import POINT_COSTS

COSTS = POINT_COSTS  # the public cost names, in kernel-code order (constants.Cost)
NORM_FLOOR = 1e-8


def _batched(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    if x.dim() == 2 and y.dim() == 2:
        return x.unsqueeze(0), y.unsqueeze(0), True
    return x, y, False


def normalize(x: torch.Tensor) -> torch.Tensor:
    """``x / ‖x‖`` along the last dimension, 0 where ``‖x‖ < 1e-8``."""
    norm = x.norm(dim=-1, keepdim=True)
    return torch.where(norm < NORM_FLOOR, 0.0, x / norm.clamp_min(NORM_FLOOR))


def check_point_shapes(x: torch.Tensor, y: torch.Tensor) -> None:
    """ValueError naming the argument unless x, y are [n, d], [m, d] or [B, n, d], [B, m, d]
    with one feature dimension d and one batch size B (shared by the API and
    :func:`cost_matrix`)."""
    for name, t in (("x", x), ("y", y)):
        if t.dim() not in (2, 3):
            raise ValueError(
                f"{name} must be [n, d] or [B, n, d] points (x and y both unbatched or both "
                f"batched), got shape {tuple(t.shape)}"
            )
    if x.dim() != y.dim():
        raise ValueError(
            f"x and y must both be unbatched or both batched; got shapes {tuple(x.shape)} and "
            f"{tuple(y.shape)}"
        )
    if x.shape[-1] != y.shape[-1]:
        raise ValueError(
            f"feature dimension mismatch: x has d={x.shape[-1]}, y has d={y.shape[-1]}"
        )
    if x.dim() == 3 and x.shape[0] != y.shape[0]:
        raise ValueError(f"batch size mismatch: x has B={x.shape[0]}, y has B={y.shape[0]}")


def _check_points(x: object, y: object) -> None:
    """TypeError/ValueError naming the argument for what :func:`cost_matrix` cannot take."""
    for name, t in (("x", x), ("y", y)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")
    check_point_shapes(x, y)
    if x.dtype != y.dtype:
        raise TypeError(f"dtype mismatch: x is {x.dtype}, y is {y.dtype}")


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
    _check_points(x, y)
    xb, yb, unbatched = _batched(x, y)
    if cost == "sqeuclidean":
        xb, yb = centre(xb, yb, x_valid, y_valid)
    C = _CostFn.apply(xb, yb, cost)
    return C[0] if unbatched else C


def _inv_norm(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(1/‖p‖ [.., 1], or 0 where ‖p‖ < 1e-8; clamped [.., 1])``; one read of p."""
    norm = torch.linalg.vector_norm(p, dim=-1, keepdim=True)
    clamped = norm < NORM_FLOOR
    return norm.clamp_min(NORM_FLOOR).reciprocal_().masked_fill_(clamped, 0.0), clamped


def _cosine_grad(
    G: torch.Tensor,
    S: torch.Tensor,
    p: torch.Tensor,
    q: torch.Tensor,
    inv_p: torch.Tensor,
    clamped_p: torch.Tensor,
    inv_q: torch.Tensor,
) -> torch.Tensor:
    """``∂L/∂p_i = −(1/‖p_i‖)(I − p̂_i p̂_iᵀ) Σ_j G_ij q̂_j`` [B, n, d] on the raw points.

    With ``S_ij = p̂_i·q̂_j`` (= 1 − C_ij) the radial coefficient ``p̂_i·Σ_j G_ij q̂_j`` is
    ``Σ_j G_ij S_ij``, a reduction over the small [B, n, m] matrix, so the whole rule is one
    GEMM and one fused pass: ``(inv² Σ_j G S) p − (inv G inv_qᵀ) q`` (radial term 0 where
    ‖p‖ < 1e-8).
    """
    coef = ((G * S).sum(-1, keepdim=True) * inv_p.square()).masked_fill_(clamped_p, 0.0)
    Gs = G * (inv_p * inv_q.transpose(1, 2)).neg_()
    return torch.bmm(Gs, q).addcmul_(p, coef)


def _cosine(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """``C = 1 − diag(1/‖x‖) x yᵀ diag(1/‖y‖)``: the GEMM on raw points, scaling on C."""
    xi, xc = _inv_norm(x)
    yi, yc = _inv_norm(y)
    C = torch.bmm(x, y.transpose(1, 2)).mul_(xi).mul_(yi.transpose(1, 2))
    return C.neg_().add_(1.0), (xi, xc, yi, yc)


def _cost_forward(x: torch.Tensor, y: torch.Tensor, cost: str) -> torch.Tensor:
    """C [B, n, m] from (already centred, for sqeuclidean) x [B, n, d], y [B, m, d]."""
    if cost == "cosine":
        return _cosine(x, y)[0]
    if cost == "dot":
        return torch.bmm(x, y.transpose(1, 2)).neg_()
    C = torch.baddbmm((x * x).sum(-1)[:, :, None], x, y.transpose(1, 2), alpha=-2.0)
    return C.add_((y * y).sum(-1)[:, None, :]).clamp_min_(0.0)


class _CostFn(torch.autograd.Function):
    """C = cost(x, y) with the explicit chain rule of :func:`cost_vjp` as its backward.

    For the cosine cost the inverse norms are kept from the forward, so the backward is one
    GEMM and two fused passes per side.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, y: torch.Tensor, cost: str) -> torch.Tensor:  # noqa: ANN001
        ctx.cost = cost
        if cost != "cosine":
            ctx.save_for_backward(x, y)
            return _cost_forward(x, y, cost)
        C, norms = _cosine(x, y)
        ctx.save_for_backward(x, y, C, *norms)
        return C

    @staticmethod
    def backward(ctx, G: torch.Tensor):  # noqa: ANN001, ANN205
        need_dx, need_dy = ctx.needs_input_grad[:2]
        if ctx.cost == "cosine":
            x, y, C, xi, xc, yi, yc = ctx.saved_tensors
            return (*_cosine_vjp(G, x, y, C, (xi, xc, yi, yc), need_dx, need_dy), None)
        x, y = ctx.saved_tensors
        if not (need_dx or need_dy):
            return None, None, None
        if need_dx:
            dx, dy = cost_vjp(G, x, y, ctx.cost, need_dy=need_dy)
        else:  # only y: the same rule with the roles swapped
            dy, _ = cost_vjp(G.transpose(1, 2), y, x, ctx.cost, need_dy=False)
            dx = None
        return dx, dy, None


def cost_vjp(
    G: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    cost: str,
    need_dy: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chain rule ``G = ∂L/∂C`` [B, n, m] -> ``(∂L/∂x [B, n, d], ∂L/∂y [B, m, d] | None)``.

    * cosine: ``∂L/∂x_i = −(1/‖x_i‖)(I − x̂_i x̂_iᵀ) Σ_j G_ij ŷ_j``, 0 where ‖x_i‖ < 1e-8
      (there ``x̂ = 0`` is constant);
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

    C, norms = _cosine(x, y)
    return _cosine_vjp(G, x, y, C, norms, True, need_dy)


def _cosine_vjp(
    G: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    C: torch.Tensor,
    norms: tuple[torch.Tensor, ...],
    need_dx: bool,
    need_dy: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    xi, xc, yi, yc = norms
    S = 1.0 - C
    dx = _cosine_grad(G, S, x, y, xi, xc, yi) if need_dx else None
    Gt, St = G.transpose(1, 2), S.transpose(1, 2)
    dy = _cosine_grad(Gt, St, y, x, yi, yc, xi) if need_dy else None
    return dx, dy
