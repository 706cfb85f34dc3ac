"""Shared test helpers: random (ragged, masked) problem batches, padding, and small utilities.

Reusable by every backend's tests::

    from tests.helpers import random_problem
    x, y, x_mask, y_mask = random_problem(B=4, n=7, m=5, d=3, seed=0, empty_rows=(2,))

Padded positions always hold *finite garbage* (large values), never zeros, so that any leak of a
masked entry into a result shows up as a wrong value instead of passing silently.

:func:`use_fused_reference` installs, for the duration of one test, a backend that exposes
``forward_sample``/``backward_sample`` built from the reference solver and
:func:`optical_kernels.costs.cost_vjp`, so the fused-cost code path of the API and the
``optical_kernels::sinkhorn_sample`` custom op can be tested before any compiled backend exists.
"""

from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Sequence

import torch

from optical_kernels.backends import torch as reference
from optical_kernels.config import SolverConfig, SolverOut
from optical_kernels.costs import cost_matrix, cost_vjp

COSTS = ("cosine", "sqeuclidean", "dot")
OBJECTIVES = ("linear", "entropic", "divergence")
GRAD_MODES = ("envelope", "implicit", "unrolled")
GARBAGE = 1e3  # scale of the finite garbage written at padded positions


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def random_lengths(
    B: int, k: int, seed: int, ragged: bool = True, min_len: int = 1
) -> torch.Tensor:
    """Valid lengths [B] int64 in ``[min_len, k]`` (all ``k`` when not ``ragged``)."""
    if not ragged or k == 0:
        return torch.full((B,), k, dtype=torch.int64)
    return torch.randint(min(min_len, k), k + 1, (B,), generator=_generator(seed))


def random_mask(
    B: int, k: int, seed: int, ragged: bool = True, scatter: bool = False, min_len: int = 1
) -> torch.Tensor:
    """Validity mask [B, k] bool with random lengths.

    ``scatter=False``: valid entries first, padding at the end (the usual layout);
    ``scatter=True``: the valid positions are a random subset (padding interleaved).
    """
    lengths = random_lengths(B, k, seed, ragged, min_len)
    mask = torch.arange(k)[None, :] < lengths[:, None]
    if scatter and k > 0:
        gen = _generator(seed + 7919)
        perms = torch.stack([torch.randperm(k, generator=gen) for _ in range(B)])
        mask = torch.gather(mask, 1, perms)
    return mask


def random_problem(
    B: int,
    n: int,
    m: int,
    d: int,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    ragged: bool = True,
    empty_rows: Sequence[int] = (),
    *,
    device: str | torch.device = "cpu",
    scale: float = 1.0,
    offset: float = 0.0,
    scatter: bool = False,
    requires_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A random padded batch of point-cloud problems.

    Args:
        B, n, m, d: batch size, padded lengths of x and y, feature dimension.
        dtype: dtype of x and y (generated in float64, then cast).
        seed: RNG seed (deterministic, independent of the global RNG).
        ragged: random valid lengths in [1, n] / [1, m] per problem; else all valid.
        empty_rows: indices of problems made *empty*: the i-th listed problem gets no valid
            x point (i % 3 == 0), no valid y point (i % 3 == 1) or neither (i % 3 == 2).
        device: device of the returned tensors.
        scale, offset: valid points are ``offset + scale * N(0, 1)``.
        scatter: interleave padding with valid positions instead of padding at the end.
        requires_grad: return leaf x, y that require grad.

    Returns:
        ``x`` [B, n, d], ``y`` [B, m, d] (padded positions hold finite garbage of size ~1e3),
        ``x_mask`` [B, n] bool, ``y_mask`` [B, m] bool.
    """
    gen = _generator(seed)
    x = offset + scale * torch.randn(B, n, d, generator=gen, dtype=torch.float64)
    y = offset + scale * torch.randn(B, m, d, generator=gen, dtype=torch.float64)
    x_mask = random_mask(B, n, seed + 1, ragged, scatter)
    y_mask = random_mask(B, m, seed + 2, ragged, scatter)
    for i, k in enumerate(empty_rows):
        if i % 3 in (0, 2):
            x_mask[k] = False
        if i % 3 in (1, 2):
            y_mask[k] = False
    junk_x = GARBAGE * torch.randn(x.shape, generator=gen, dtype=x.dtype)
    junk_y = GARBAGE * torch.randn(y.shape, generator=gen, dtype=y.dtype)
    x = torch.where(x_mask[..., None], x, junk_x)
    y = torch.where(y_mask[..., None], y, junk_y)
    x, y = x.to(device=device, dtype=dtype), y.to(device=device, dtype=dtype)
    if requires_grad:
        x.requires_grad_(True)
        y.requires_grad_(True)
    return x, y, x_mask.to(device), y_mask.to(device)


def random_weights(
    mask: torch.Tensor, seed: int, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """Positive random weights [B, k] (unnormalised) with positive garbage at masked positions."""
    gen = _generator(seed)
    w = 0.2 + torch.rand(mask.shape, generator=gen, dtype=torch.float64)
    w = torch.where(mask.cpu(), w, 1e3 * torch.rand(mask.shape, generator=gen, dtype=torch.float64))
    return w.to(device=mask.device, dtype=dtype)


def random_cost(
    B: int,
    n: int,
    m: int,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    *,
    scale: float = 1.0,
    requires_grad: bool = False,
) -> torch.Tensor:
    """Random cost [B, n, m] in ``[0, scale)``."""
    C = scale * torch.rand(B, n, m, generator=_generator(seed), dtype=torch.float64)
    return C.to(dtype).requires_grad_(requires_grad)


def pad_points(
    t: torch.Tensor, mask: torch.Tensor, extra: int, seed: int, front: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Append (or prepend) ``extra`` masked rows of garbage: t [B, k, d] -> [B, k+extra, d]."""
    gen = _generator(seed)
    B, _, d = t.shape
    junk = (GARBAGE * torch.randn(B, extra, d, generator=gen, dtype=torch.float64)).to(t)
    no = torch.zeros(B, extra, dtype=torch.bool, device=mask.device)
    parts = ((junk, t), (no, mask)) if front else ((t, junk), (mask, no))
    return torch.cat(parts[0], 1), torch.cat(parts[1], 1)


def pad_weights(
    w: torch.Tensor, extra: int, front: bool = False, fill: float = 7.0
) -> torch.Tensor:
    """Append (or prepend) ``extra`` garbage weights: w [B, k] -> [B, k+extra]."""
    junk = torch.full((w.shape[0], extra), fill, dtype=w.dtype, device=w.device)
    return torch.cat((junk, w) if front else (w, junk), 1)


def pad_cost(
    C: torch.Tensor, extra_n: int, extra_m: int, seed: int
) -> torch.Tensor:
    """Append garbage rows and columns to C [B, n, m] -> [B, n+extra_n, m+extra_m]."""
    gen = _generator(seed)
    B, n, m = C.shape
    out = (GARBAGE * torch.randn(B, n + extra_n, m + extra_m, generator=gen, dtype=torch.float64))
    out = out.to(C)
    out[:, :n, :m] = C
    return out


def grads(
    outputs: torch.Tensor, inputs: Sequence[torch.Tensor], weights: torch.Tensor | None = None
) -> list[torch.Tensor]:
    """Gradients of ``Σ_k w_k outputs_k`` (``w`` = 1 by default) w.r.t. ``inputs``."""
    total = outputs.sum() if weights is None else (weights * outputs).sum()
    return list(torch.autograd.grad(total, list(inputs), allow_unused=False))


def assert_finite(*tensors: torch.Tensor) -> None:
    """Every tensor is free of NaN and Inf."""
    for i, t in enumerate(tensors):
        assert torch.isfinite(t.float()).all(), f"tensor #{i} has non-finite entries: {t}"


# --------------------------------------------------------------------------- fused backend
def _fused_forward_sample(
    x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor, cost: str,
    cfg: SolverConfig,
) -> SolverOut:
    va, vb = a > 0, b > 0
    C = cost_matrix(x, y, cost, va, vb).to(a.dtype)
    C = torch.where(va[:, :, None] & vb[:, None, :], C, 0.0).contiguous()
    return reference.forward(C, a, b, cfg)


def _fused_backward_sample(
    x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor, cost: str,
    out: SolverOut, grad_value: torch.Tensor, grad_value_linear: torch.Tensor,
    cfg: SolverConfig, need_dy: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    va, vb = a > 0, b > 0
    xw, yw = x.to(a.dtype), y.to(a.dtype)
    C = cost_matrix(xw, yw, cost, va, vb)
    C = torch.where(va[:, :, None] & vb[:, None, :], C, 0.0).contiguous()
    G = reference.backward(C, a, b, out, grad_value, grad_value_linear, cfg)
    dx, dy = cost_vjp(G, xw, yw, cost, need_dy)
    return dx.to(x.dtype), (None if dy is None else dy.to(y.dtype))


def fused_reference_module(name: str = "_optical_kernels_test_fused_reference") -> types.ModuleType:
    """A backend module (contract of :mod:`optical_kernels.config`) with fused-cost entry points
    built from the reference solver: ``forward``, ``backward``, ``forward_sample``,
    ``backward_sample``, ``is_available``."""
    mod = types.ModuleType(name)
    mod.forward = reference.forward
    mod.backward = reference.backward
    mod.forward_sample = _fused_forward_sample
    mod.backward_sample = _fused_backward_sample
    mod.is_available = lambda: (True, "test double: reference solver with fused-cost entry points")
    mod.supports = lambda device, dtype: True
    return mod


def use_fused_reference(monkeypatch: object, slot: str = "cpu") -> str:
    """Register :func:`fused_reference_module` under the backend name ``slot`` for one test
    (pytest ``monkeypatch``); returns the backend name to pass as ``backend=``."""
    # the package re-exports a *function* named ``backends``: fetch the registry module itself
    registry = importlib.import_module("optical_kernels.backends")
    mod = fused_reference_module()
    monkeypatch.setitem(sys.modules, mod.__name__, mod)  # type: ignore[attr-defined]
    monkeypatch.setitem(registry._MODULES, slot, mod.__name__)  # type: ignore[attr-defined]
    return slot
