"""The backend interface as code, and the helpers every backend shares (docs/design.md §5).

A backend is a module. :class:`Backend` lists what every backend module provides,
:class:`FusedBackend` what a backend that fuses the cost into the solver adds; both are
``typing.Protocol`` classes that a module satisfies structurally (``isinstance(mod, Backend)``
works at run time). :func:`check_module` is what the registry (:mod:`optical_kernels.backends`)
runs on every module it loads: a module missing a function is refused with an error that names
it. Optional members: ``supports(device, dtype) -> bool`` (which tensors the backend takes; the
registry falls back to the device type) and ``MAX_SIZE: int`` (largest padded n and m, for the
resident ``cuda`` kernels; the ``auto`` choice then routes larger problems to ``torch``).

Inputs, as the public API (:mod:`optical_kernels.api`) hands them over (shapes in brackets):

* ``C`` [B, n, m] cost, float32 or float64 (backends may take 16-bit and upcast it,
  :func:`compute_dtype`), **0 at padded entries**;
* ``a`` [B, n], ``b`` [B, m] non-negative weights of C's dtype, **0 at padded positions** (a
  zero weight *is* the mask), summing to 1 for balanced problems; a problem whose ``a`` or
  ``b`` sums to 0 is *empty*;
* ``x`` [B, n, d], ``y`` [B, m, d] points (fused backends): float16/bfloat16/float32/float64,
  one dtype, padded rows 0, centred on a common mean for ``sqeuclidean``; ``cost`` one of
  ``cosine | sqeuclidean | dot`` (:data:`optical_kernels.costs.COSTS`), ``C = cost(x, y)`` as in
  :func:`optical_kernels.costs.cost_matrix`;
* ``cfg`` a :class:`~optical_kernels.config.SolverConfig`;
* ``grad_value``, ``grad_value_linear`` [B] (or ``None``: zeros), the upstream gradients of
  ``value`` and ``value_linear``.

Every backend computes the iteration map of docs/design.md §2 (the pseudocode in
:mod:`optical_kernels.config`), per problem, with ``λ_t = ρ/(ρ+ε_t)`` (1 when balanced)::

    f_i ← −λ_t ε_t LSE_j[ log b_j + (g_j − C_ij)/ε_t ]
    g_j ← −λ_t ε_t LSE_i[ log a_i + (f_i − C_ij)/ε_t ]
    P_ij = a_i b_j exp((f_i + g_j − C_ij)/ε)

and returns a :class:`~optical_kernels.config.SolverOut` in the compute dtype
(:func:`compute_dtype`): ``f`` [B, n], ``g`` [B, m] (0 at padded positions), ``value``,
``value_linear``, ``err`` [B], ``n_iters`` [B] int32 and, for ``cfg.grad == "unrolled"``,
``history = (hist_f [T, B, n], hist_g [T, B, m])`` (potentials after iterations 1..T,
``T ≤ max_iter``), else ``None``. Empty problems give zeros and ``n_iters = 0``.

``backward`` returns ``∂L/∂C`` [B, n, m] of ``L = Σ_k gv_k value_k + gvl_k value_linear_k``
with the derivative chosen by ``cfg.grad`` (docs/design.md §3): ``envelope`` ``(gv + gvl) P``;
``implicit`` exact at the fixed point; ``unrolled`` through the iterations actually run, from
``out.history`` (without a history: the direct partials at the final potentials). The fused
``backward_sample`` returns ``(∂L/∂x [B, n, d], ∂L/∂y [B, m, d] or None)`` in the points'
dtype (``None`` unless ``need_dy``), the chain rule of
:func:`optical_kernels.costs.cost_vjp` applied to that ``∂L/∂C``.

The shared helpers below (input checks, upcasting, gradient seeds, iteration history, output
packing) are written once here; the backends call them instead of repeating them.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from ..config import GRAD_MODES, SolverConfig, SolverOut
from ..costs import COSTS

#: Functions every backend module defines.
REQUIRED = ("forward", "backward", "is_available")
#: Functions a backend that fuses the cost defines (both or neither).
FUSED = ("forward_sample", "backward_sample")
#: Functions a dense backend that computes point costs itself defines (all or none).
POINT_COST = ("supports_point_cost", "point_cost_forward", "point_cost_backward")
#: Point dtypes the fused backends read.
POINT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@runtime_checkable
class Backend(Protocol):
    """What every backend module provides (a module satisfies it structurally)."""

    def forward(self, C: Tensor, a: Tensor, b: Tensor, cfg: SolverConfig) -> SolverOut:
        """Solve ``C`` [B, n, m] with weights ``a`` [B, n], ``b`` [B, m] -> :class:`SolverOut`
        (``f`` [B, n], ``g`` [B, m], ``value``/``value_linear``/``err`` [B], ``n_iters`` [B]
        int32, ``history`` ``(hist_f [T, B, n], hist_g [T, B, m])`` for ``unrolled``)."""
        ...

    def backward(
        self,
        C: Tensor,
        a: Tensor,
        b: Tensor,
        out: SolverOut,
        grad_value: Tensor | None,
        grad_value_linear: Tensor | None,
        cfg: SolverConfig,
    ) -> Tensor:
        """``∂(Σ_k gv_k value_k + gvl_k value_linear_k)/∂C`` [B, n, m] for ``cfg.grad``, where
        ``out`` is what :meth:`forward` returned and ``grad_value``, ``grad_value_linear`` are
        [B] (``None``: zeros)."""
        ...

    def is_available(self) -> tuple[bool, str]:
        """``(available, reason)``; the reason names what to install when unavailable."""
        ...


@runtime_checkable
class FusedBackend(Backend, Protocol):
    """A backend that also computes the cost from points inside its kernels."""

    def forward_sample(
        self, x: Tensor, y: Tensor, a: Tensor, b: Tensor, cost: str, cfg: SolverConfig
    ) -> SolverOut:
        """Solve with ``C = cost(x, y)``: ``x`` [B, n, d], ``y`` [B, m, d] -> :class:`SolverOut`
        in the compute dtype of the points and weights."""
        ...

    def backward_sample(
        self,
        x: Tensor,
        y: Tensor,
        a: Tensor,
        b: Tensor,
        cost: str,
        out: SolverOut,
        grad_value: Tensor | None,
        grad_value_linear: Tensor | None,
        cfg: SolverConfig,
        need_dy: bool,
    ) -> tuple[Tensor, Tensor | None]:
        """``(∂L/∂x [B, n, d], ∂L/∂y [B, m, d] or None)`` in the points' dtype."""
        ...


@runtime_checkable
class PointCostBackend(Backend, Protocol):
    """A dense backend that also computes the cost matrix from points itself: the api then
    solves on that C instead of the torch cost of :func:`optical_kernels.costs.cost_matrix`
    (:func:`optical_kernels.ops.point_cost` wraps the pair for autograd and tracing)."""

    def supports_point_cost(self, cost: str, *tensors: Tensor) -> bool:
        """Whether :meth:`point_cost_forward` takes these points (cost, device, dtype, no
        tracing)."""
        ...

    def point_cost_forward(
        self, x: Tensor, y: Tensor, x_valid: Tensor, y_valid: Tensor, cost: str
    ) -> tuple[Tensor, tuple[Tensor, Tensor], bool]:
        """``(C [B, n, m], saved, finite)`` from contiguous x [B, n, d], y [B, m, d] and bool
        masks [B, n], [B, m]: C is 0 at padded entries; ``saved`` ([B, n], [B, m] in x's
        dtype) is handed back to :meth:`point_cost_backward`; ``finite`` is False when the
        unmasked cost had a NaN or Inf entry."""
        ...

    def point_cost_backward(
        self,
        G: Tensor,
        x: Tensor,
        y: Tensor,
        x_valid: Tensor,
        y_valid: Tensor,
        C: Tensor,
        saved: tuple[Tensor, Tensor],
        cost: str,
        need_dx: bool,
        need_dy: bool,
    ) -> tuple[Tensor | None, Tensor | None]:
        """``(∂L/∂x or None, ∂L/∂y or None)`` from ``G = ∂L/∂C`` [B, n, m]."""
        ...


def check_module(mod: ModuleType, name: str) -> None:
    """Raise ``TypeError`` naming what ``mod`` (backend module ``name``) lacks or gets wrong:
    a missing required function, only part of the fused pair or of the point-cost functions,
    a ``supports`` that is not callable, a ``MAX_SIZE`` that is not a positive int."""
    problems = [f"missing {f}()" for f in REQUIRED if not callable(getattr(mod, f, None))]
    for group, what in ((FUSED, "the fused pair"), (POINT_COST, "the point-cost functions")):
        have = [f for f in group if callable(getattr(mod, f, None))]
        if have and len(have) < len(group):
            missing = ", ".join(f"{f}()" for f in group if f not in have)
            problems.append(f"defines {have[0]}() but not {missing} ({what} belong together)")
    if hasattr(mod, "supports") and not callable(mod.supports):
        problems.append("supports is not callable")
    limit = getattr(mod, "MAX_SIZE", None)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        problems.append(f"MAX_SIZE must be a positive int or None, got {limit!r}")
    if problems:
        raise TypeError(
            f"backend module {name} does not implement the backend contract "
            f"(optical_kernels.backends.contract): {'; '.join(problems)}"
        )


# ----------------------------------------------------------------------------- tracing
def tracing() -> bool:
    """Whether the call is being traced: Dynamo, or a functorch transform (vmap, grad, ...).
    Kernels that read raw pointers cannot run there (ops.py then takes its custom ops)."""
    if torch.compiler.is_compiling():
        return True
    try:
        return torch._C._functorch.peek_interpreter_stack() is not None
    except AttributeError:  # pragma: no cover - older torch without the functorch C API
        return True


# ----------------------------------------------------------------------------- dtypes
def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The dtype a backend computes in for inputs of ``dtypes``: float64 if any is float64,
    else float32 (float16/bfloat16 are upcast)."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def upcast(t: Tensor) -> Tensor:
    """``t`` in float32 when it is float16/bfloat16, else unchanged."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


# ----------------------------------------------------------------------------- input checks
def check_type(name: str, t: object) -> None:
    """``TypeError`` unless ``t`` is a tensor."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def check_floating(name: str, t: Tensor) -> None:
    """``TypeError`` unless ``t`` has a floating dtype."""
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")


def check_cost_matrix(C: Tensor) -> None:
    """``ValueError`` unless ``C`` is [B, n, m]."""
    if C.dim() != 3:
        raise ValueError(f"C must have shape [B, n, m], got {tuple(C.shape)}")


def check_weights(a: Tensor, b: Tensor, B: int, n: int, m: int) -> None:
    """``ValueError`` unless ``a`` is [B, n] and ``b`` is [B, m]."""
    if tuple(a.shape) != (B, n):
        raise ValueError(f"a must have shape {(B, n)}, got {tuple(a.shape)}")
    if tuple(b.shape) != (B, m):
        raise ValueError(f"b must have shape {(B, m)}, got {tuple(b.shape)}")


def check_points(x: Tensor, y: Tensor) -> None:
    """``x`` [B, n, d] and ``y`` [B, m, d] of one dtype (``ValueError`` / ``TypeError``)."""
    if x.dim() != 3 or y.dim() != 3:
        raise ValueError(
            f"x, y must be [B, n, d], [B, m, d]; got {tuple(x.shape)}, {tuple(y.shape)}"
        )
    if x.shape[0] != y.shape[0] or x.shape[2] != y.shape[2]:
        raise ValueError(f"x {tuple(x.shape)} and y {tuple(y.shape)} disagree on B or d")
    if x.dtype != y.dtype:
        raise TypeError(f"x and y must have the same dtype, got {x.dtype} and {y.dtype}")


def check_cost(cost: str) -> None:
    """``ValueError`` unless ``cost`` is one of :data:`optical_kernels.costs.COSTS`."""
    if cost not in COSTS:
        raise ValueError(f"cost must be one of {COSTS}, got {cost!r}")


def check_grad(cfg: SolverConfig) -> None:
    """``ValueError`` unless ``cfg.grad`` is one of the gradient modes."""
    if cfg.grad not in GRAD_MODES:
        raise ValueError(f"grad must be one of {GRAD_MODES}, got {cfg.grad!r}")


# ----------------------------------------------------------------------------- backward seeds
def grad_weights(
    grad_value: Tensor | None,
    grad_value_linear: Tensor | None,
    B: int,
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[Tensor, Tensor]:
    """The upstream gradients as contiguous [B] tensors of ``dtype`` (``None``: zeros)."""

    def one(t: Tensor | None) -> Tensor:
        if t is None:
            return torch.zeros(B, dtype=dtype, device=device)
        return t.detach().to(dtype).reshape(B).contiguous()

    return one(grad_value), one(grad_value_linear)


# ----------------------------------------------------------------------------- history
def history(
    out: SolverOut, cfg: SolverConfig, B: int, n: int, m: int, dtype: torch.dtype
) -> tuple[Tensor, Tensor] | None:
    """``out.history`` as contiguous ``(hist_f [T, B, n], hist_g [T, B, m])`` of ``dtype`` for
    ``cfg.grad == "unrolled"``; ``None`` for the other modes or when there is none.
    ``ValueError`` for a history of the wrong shape."""
    if cfg.grad != "unrolled" or out.history is None:
        return None
    hf, hg = out.history
    hf = hf.detach().to(dtype).contiguous()
    hg = hg.detach().to(dtype).contiguous()
    T = int(hf.shape[0]) if hf.dim() > 0 else -1
    if tuple(hf.shape) != (T, B, n) or tuple(hg.shape) != (T, B, m):
        raise ValueError(
            f"out.history must be (hist_f [T, {B}, {n}], hist_g [T, {B}, {m}]), got "
            f"{tuple(hf.shape)}, {tuple(hg.shape)}"
        )
    return hf, hg


def new_history(
    cfg: SolverConfig, B: int, n: int, m: int, dtype: torch.dtype, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Zeroed ``(hist_f [T, B, n], hist_g [T, B, m])`` with ``T = max_iter`` for ``unrolled``,
    ``T = 0`` otherwise (what a forward fills in)."""
    T = cfg.max_iter if cfg.grad == "unrolled" else 0
    return (
        torch.zeros(T, B, n, dtype=dtype, device=device),
        torch.zeros(T, B, m, dtype=dtype, device=device),
    )


# ----------------------------------------------------------------------------- outputs
def solver_out(
    f: Tensor,
    g: Tensor,
    value: Tensor,
    value_linear: Tensor,
    n_iters: Tensor,
    err: Tensor,
    hist_f: Tensor | None,
    hist_g: Tensor | None,
    cfg: SolverConfig,
) -> SolverOut:
    """Pack kernel outputs into a :class:`SolverOut`; the history is kept for ``unrolled``."""
    keep = cfg.grad == "unrolled" and hist_f is not None and hist_g is not None
    return SolverOut(f, g, value, value_linear, n_iters, err, (hist_f, hist_g) if keep else None)


def empty_out(
    B: int, n: int, m: int, dtype: torch.dtype, device: torch.device, cfg: SolverConfig
) -> SolverOut:
    """The result of a batch without work (B, n or m = 0): zeros, ``n_iters = 0``, and a zeroed
    ``max_iter``-long history for ``unrolled``."""

    def z(*shape: int) -> Tensor:
        return torch.zeros(*shape, dtype=dtype, device=device)

    hf, hg = new_history(cfg, B, n, m, dtype, device)
    return solver_out(
        z(B, n), z(B, m), z(B), z(B), torch.zeros(B, dtype=torch.int32, device=device), z(B),
        hf, hg, cfg,
    )


def jacobi_pcg(
    matvec: Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]],
    rhs_u: Tensor, rhs_v: Tensor, du: Tensor, dv: Tensor, done: Tensor,
    max_iter: int, tol: float, sync_every: int = 10,
) -> tuple[Tensor, Tensor]:
    """Batched Jacobi-preconditioned CG on the implicit-gradient system (docs/design.md §3),
    the one recurrence every backend that solves it on the host runs::

        H [u; v] = [rhs_u; rhs_v],   H = [[κ diag(P1), P], [Pᵀ, κ diag(Pᵀ1)]]

    ``matvec(pu, pv, done) -> (hu, hv)`` applies H (``done`` [B] bool: problems already
    converged, which a streamed matvec may skip); ``du`` [B, n], ``dv`` [B, m] the Jacobi
    diagonal (1 at decoupled coordinates); ``done`` [B] the problems to leave at 0 from the
    start (besides those with a zero right-hand side). A problem stops when its residual
    ``‖r‖ ≤ tol·‖rhs‖`` or on a non-positive curvature; the loop ends after ``max_iter``
    steps or, checked every ``sync_every`` steps (one host sync; 0: never), once every
    problem has stopped. Returns ``(u [B, n], v [B, m])``, contiguous.
    """

    def dot(x1: Tensor, y1: Tensor, x2: Tensor, y2: Tensor) -> Tensor:
        return (x1 * x2).sum(1) + (y1 * y2).sum(1)

    u, v = torch.zeros_like(rhs_u), torch.zeros_like(rhs_v)
    ru, rv = rhs_u.clone(), rhs_v.clone()
    zu, zv = ru / du, rv / dv
    pu, pv = zu.contiguous(), zv.contiguous()
    rz = dot(ru, rv, zu, zv)
    bnorm = dot(rhs_u, rhs_v, rhs_u, rhs_v).sqrt()
    done = done | (bnorm == 0)
    for it in range(max_iter):
        hu, hv = matvec(pu, pv, done)
        php = dot(pu, pv, hu, hv)
        alpha = torch.where(done | (php <= 0), 0.0, rz / torch.where(php > 0, php, 1.0))
        u, v = u + alpha[:, None] * pu, v + alpha[:, None] * pv
        ru, rv = ru - alpha[:, None] * hu, rv - alpha[:, None] * hv
        done = done | (dot(ru, rv, ru, rv).sqrt() <= tol * bnorm) | (php <= 0)
        if sync_every and it % sync_every == sync_every - 1 and bool(done.all()):
            break
        zu, zv = ru / du, rv / dv
        rz_new = dot(ru, rv, zu, zv)
        beta = torch.where(done, 0.0, rz_new / torch.where(rz != 0, rz, 1.0))
        pu = (zu + beta[:, None] * pu).contiguous()
        pv = (zv + beta[:, None] * pv).contiguous()
        rz = rz_new
    return u.contiguous(), v.contiguous()
