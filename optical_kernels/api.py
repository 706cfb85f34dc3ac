"""Public API (docs/design.md §4): argument checking, weight/mask normalisation, backend dispatch.

Conventions (docs/design.md §2, KL convention as GeomLoss and OTT). For problem k with points
x [n, d], y [m, d], weights a [n], b [m] (uniform over valid points by default, renormalised to
sum 1 for balanced problems) and cost ``C``, the entropic problem is::

    OT_ε = min_{P ∈ U(a, b)} <P, C> + ε KL(P ‖ a⊗b),   P_ij = a_i b_j exp((f_i + g_j − C_ij)/ε)

solved by log-domain Sinkhorn. With ``rho`` the marginal constraints are relaxed to
``ρ KL(P1 ‖ a) + ρ KL(Pᵀ1 ‖ b)`` (unbalanced; weights used as given).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Sequence
from numbers import Integral, Real
from typing import NamedTuple

import torch

from . import backends as _backends
from . import numerics as _num
from .config import GRAD_MODES, SolverConfig, SolverOut
from .convergence import warn_if_unconverged
from .costs import COSTS, centre, check_point_shapes, cost_matrix
from .ops import point_cost, run
from .result import OTResult

OBJECTIVES = ("linear", "entropic", "divergence")
GRADS = ("auto",) + GRAD_MODES
REDUCTIONS = ("mean", "sum", "none")
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# --------------------------------------------------------------------------- checks
def _check_finite_enabled(t: torch.Tensor) -> bool:
    """Finite/negativity checks sync with the device: on CUDA they can be switched off with
    ``OPTICAL_KERNELS_CHECK_INPUTS=0`` (documented opt-out); on CPU they always run."""
    if torch.compiler.is_compiling():  # a traced graph cannot branch on tensor data
        return False
    return t.device.type == "cpu" or os.environ.get("OPTICAL_KERNELS_CHECK_INPUTS", "1") != "0"


def _all_finite(t: torch.Tensor) -> bool:
    """One reduction (NaN/Inf propagate through a sum); the exact test only if it overflows."""
    acc = torch.float64 if t.dtype == torch.float64 else torch.float32
    with torch.no_grad():
        return bool(torch.isfinite(t.sum(dtype=acc))) or bool(torch.isfinite(t).all())


def _tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def _float_tensor(name: str, t: object, check_finite: bool = True) -> torch.Tensor:
    t = _tensor(name, t)
    if name in ("x", "y", "C") and t.device.type == "meta":  # a solve reads values
        raise ValueError(f"{name} is a meta tensor (no data); pass CPU or CUDA tensors")
    if t.dtype not in _FLOATS:
        raise TypeError(
            f"{name} must be a floating tensor (float16/bfloat16/float32/float64), got {t.dtype}"
        )
    if check_finite and _check_finite_enabled(t) and t.numel() and not _all_finite(t):
        raise ValueError(f"{name} contains NaN or Inf values")
    return t


def _check_cost_finite(C: torch.Tensor, points: tuple[tuple[str, torch.Tensor], ...]) -> None:
    """Non-finite points always give a non-finite row or column of C (a NaN or Inf coordinate
    makes the norm / dot product non-finite), so one reduction over the small C [B, n, m]
    replaces two over x, y [B, ·, d]; the exact per-argument test runs only on failure."""
    if not _check_finite_enabled(C) or C.numel() == 0 or _all_finite(C):
        return
    _raise_cost_nonfinite(C.dtype, points)


def _raise_cost_nonfinite(
    dtype: torch.dtype, points: tuple[tuple[str, torch.Tensor], ...]
) -> None:
    """The error for a non-finite cost: the argument that holds NaN/Inf, else an overflow."""
    for name, t in points:
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} contains NaN or Inf values")
    raise ValueError(
        f"the cost matrix overflows: {' and '.join(n for n, _ in points)} are finite but too "
        f"large for {dtype}; rescale them"
    )


def _positive(name: str, v: object, allow_zero: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, Real):
        raise TypeError(f"{name} must be a real number, got {type(v).__name__}")
    v = float(v)
    # not math.isfinite(v): under torch.compile(dynamic=True) a default float is a SymFloat
    if not (-math.inf < v < math.inf) or v < 0 or (v == 0 and not allow_zero):
        cmp = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be finite and {cmp}, got {v}")
    return v


def _int_at_least_1(name: str, v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, Integral):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if v < 1:
        raise ValueError(f"{name} must be >= 1, got {v}")
    return int(v)


def _choice(name: str, v: object, options: Sequence[str]) -> str:
    if not isinstance(v, str) or v not in options:
        raise ValueError(f"{name} must be one of {tuple(options)}, got {v!r}")
    return v


def _config(
    *,
    eps: object,
    objective: object,
    grad: object,
    rho: object,
    max_iter: object,
    tol: object,
    check_every: object,
    eps_schedule: object,
    backend: object,
    cg_max_iter: object = None,
    cg_tol: object = None,
    allowed_objectives: Sequence[str] = OBJECTIVES,
) -> tuple[SolverConfig, str]:
    eps_f = _positive("eps", eps)
    objective = _choice("objective", objective, allowed_objectives)
    grad = _choice("grad", grad, GRADS)
    rho_f = None if rho is None else _positive("rho", rho)
    max_iter_i = _int_at_least_1("max_iter", max_iter)
    tol_f = _positive("tol", tol, allow_zero=True)
    check_i = _int_at_least_1("check_every", check_every)
    cg_max_iter_i = None if cg_max_iter is None else _int_at_least_1("cg_max_iter", cg_max_iter)
    cg_tol_f = None if cg_tol is None else _positive("cg_tol", cg_tol)
    _choice("backend", backend, ("auto",) + _backends.BACKENDS)
    schedule = None
    if eps_schedule is not None:
        if not isinstance(eps_schedule, (tuple, list)) or len(eps_schedule) != 2:
            raise ValueError(f"eps_schedule must be a (start, factor) pair, got {eps_schedule!r}")
        start = _positive("eps_schedule[0] (start)", eps_schedule[0])
        factor = _positive("eps_schedule[1] (factor)", eps_schedule[1])
        if not factor < 1:
            raise ValueError(f"eps_schedule[1] (factor) must be in (0, 1), got {factor}")
        schedule = (start, factor)
    if grad == "auto":
        grad = "implicit" if objective == "linear" else "envelope"
    if grad == "implicit" and objective != "linear":
        grad = "envelope"  # Danskin: P is the exact gradient of OT_ε at the fixed point
    cfg = SolverConfig(
        eps_f, rho_f, max_iter_i, tol_f, check_i, schedule, grad, cg_max_iter_i, cg_tol_f
    )
    return cfg, objective


def _mask(
    name: str, mask: object, shape: tuple[int, ...], device: torch.device
) -> torch.Tensor | None:
    """Checked validity mask -> bool [B, k]. Accepts what tokenizers and users produce: bool,
    any integer dtype (a Hugging Face ``attention_mask`` is int64) or a 0/1 floating tensor;
    nonzero = valid. Integer/float masks must hold only 0 and 1 (checked where input checks
    run, see :func:`_check_finite_enabled`)."""
    if mask is None:
        return None
    mask = _tensor(name, mask)
    if mask.dtype.is_complex:
        raise TypeError(f"{name} must be a bool, integer or 0/1 float tensor, got {mask.dtype}")
    if tuple(mask.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"{name} is on {mask.device} but the points are on {device}")
    if mask.dtype == torch.bool:
        return mask
    if _check_finite_enabled(mask) and mask.numel() and bool(((mask != 0) & (mask != 1)).any()):
        bad = mask[(mask != 0) & (mask != 1)].flatten()[0].item()
        raise ValueError(
            f"{name} must hold only 0/1 (or True/False; nonzero = valid point), found {bad!r}"
        )
    return mask != 0


def _weights(
    name: str,
    w: object,
    mask: torch.Tensor | None,
    shape: tuple[int, ...],
    device: torch.device,
    dtype: torch.dtype,
    balanced: bool,
) -> torch.Tensor:
    """Weights [B, k] in ``dtype``: 0 at masked positions, renormalised if balanced."""
    if w is None:  # uniform over valid points: 1/k, or mask / (number valid); 0 if none valid
        if mask is None:
            return torch.full(shape, 1.0, dtype=dtype, device=device).div_(max(shape[-1], 1))
        ones = mask.to(dtype)  # a count of 0/1 values is >= 1 when not 0: the same quotient
        return ones.div_(ones.sum(-1, keepdim=True).clamp_min_(1.0))
    w = _float_tensor(name, w)
    if tuple(w.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(w.shape)}")
    if w.device != device:
        raise ValueError(f"{name} is on {w.device} but the points are on {device}")
    if _check_finite_enabled(w) and bool((w < 0).any()):
        raise ValueError(f"{name} must be non-negative")
    valid = torch.ones(shape, dtype=torch.bool, device=device) if mask is None else mask
    w = torch.where(valid, w.detach().to(dtype), 0.0)
    if balanced:  # renormalised to probability vectors
        total = w.sum(-1, keepdim=True)
        w = torch.where(total > 0, w / torch.where(total > 0, total, 1.0), 0.0)
    return w


def _points(x: object, y: object) -> tuple[torch.Tensor, torch.Tensor, bool]:
    x = _float_tensor("x", x, check_finite=False)  # checked through C (or below, if fused)
    y = _float_tensor("y", y, check_finite=False)
    check_point_shapes(x, y)
    if x.device != y.device:
        raise ValueError(f"device mismatch: x is on {x.device}, y is on {y.device}")
    if x.dtype != y.dtype:  # promote like torch losses (F.mse_loss); .to keeps each grad's dtype
        dtype = torch.promote_types(x.dtype, y.dtype)  # = result_type for these >= 2-D tensors
        x, y = x.to(dtype), y.to(dtype)
    unbatched = x.dim() == 2
    if unbatched:
        x, y = x.unsqueeze(0), y.unsqueeze(0)
    return x, y, unbatched


def _marginals(
    x_mask: object,
    y_mask: object,
    a: object,
    b: object,
    shape: tuple[int, int, int],
    device: torch.device,
    work: torch.dtype,
    cfg: SolverConfig,
    unbatched: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Checked masks and weights -> ``(a [B, n], b [B, m])`` in ``work`` dtype, 0 at padding."""
    if unbatched:
        for name, t, k in (("x_mask", x_mask, shape[1]), ("y_mask", y_mask, shape[2]),
                           ("a", a, shape[1]), ("b", b, shape[2])):  # fmt: skip
            if t is not None and _tensor(name, t).dim() != 1:
                raise ValueError(
                    f"{name} must be [{k}] for unbatched inputs, got shape {tuple(t.shape)} "
                    "(for a batch pass the points as [B, n, d], [B, m, d])"
                )
        x_mask, y_mask, a, b = (
            None if t is None else t.unsqueeze(0) for t in (x_mask, y_mask, a, b)
        )
    B, n, m = shape
    for name, w, kw in (("a", a, "x_mask"), ("b", b, "y_mask")):
        if isinstance(w, torch.Tensor) and not (w.dtype.is_floating_point or w.dtype.is_complex):
            raise TypeError(
                f"{name} must be a floating weight tensor, got {w.dtype}. Weights come third "
                f"and fourth, as in POT (solve_sample(x, y, a, b)); masks are keyword-only: "
                f"pass {kw}=..."
            )
    xm = _mask("x_mask", x_mask, (B, n), device)
    ym = _mask("y_mask", y_mask, (B, m), device)
    balanced = cfg.rho is None
    aw = _weights("a", a, xm, (B, n), device, work, balanced)
    bw = _weights("b", b, ym, (B, m), device, work, balanced)
    return aw, bw


def _unbatch(t: torch.Tensor | None, unbatched: bool) -> torch.Tensor | None:
    return t[0] if (unbatched and t is not None) else t


def _result(
    out: SolverOut,
    objective_value: torch.Tensor,
    cfg: SolverConfig,
    a: torch.Tensor,
    b: torch.Tensor,
    C: torch.Tensor | None,
    unbatched: bool,
) -> OTResult:
    empty = ~((a > 0).any(1) & (b > 0).any(1))
    converged = (out.err < cfg.tol) | empty
    u = lambda t: _unbatch(t, unbatched)  # noqa: E731
    return OTResult(
        value=u(objective_value),
        value_linear=u(out.value_linear),
        potentials=(u(out.f), u(out.g)),
        n_iters=u(out.n_iters),
        err=u(out.err),
        converged=u(converged),
        empty=u(empty),
        eps=cfg.eps,
        _cost=None if C is None else (lambda: C.detach()),
        _a=a,
        _b=b,
        _unbatched=unbatched,
    )


# --------------------------------------------------------------------------- dispatch
def _backend_name(backend: str, device: torch.device, dtype: torch.dtype) -> tuple[str, bool]:
    """``(backend or route name, fuses the cost)``, independent of the problem size.

    While Dynamo traces, the look-ups go through :mod:`optical_kernels._traced` (marked
    constant; imported only then, so ``import optical_kernels`` does not load ``torch._dynamo``).
    Size-dependent routing happens inside the custom ops, where sizes are concrete.
    """
    if torch.compiler.is_compiling():
        from . import _traced

        name = _traced.resolve_name(backend, device.type, dtype)
        return name, _traced.fuses_cost(name)
    name = _backends.resolve_name(backend, device.type, dtype)
    return name, _backends.fuses_cost(name)


def _no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast off inside the solver: the cost, weights and potentials are computed in the
    working dtype (float32/float64) whatever autocast would pick for the matmuls; the inputs
    were already promoted by :func:`_points` and their gradients keep their own dtype."""
    if device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


# --------------------------------------------------------------------------- solvers
def _solve_points(
    backend_name: str,
    fused: bool,
    x: torch.Tensor,
    y: torch.Tensor,
    x_valid: torch.Tensor,
    y_valid: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    cost: str,
    cfg: SolverConfig,
) -> tuple[SolverOut, torch.Tensor | None]:
    """One OT solve between point sets; returns the output and C when it was materialised.

    A balanced ``dot`` problem is solved on centred, augmented points (``C + |μ|²``, an exact
    reformulation, see :mod:`optical_kernels.numerics`) and the constant is added back to the
    values and ``f``.
    """
    shift = None
    if cost == "dot" and cfg.rho is None:
        work = torch.float64 if x.dtype == torch.float64 else torch.float32
        x, y, shift = _num.dot_shift(x.to(work), y.to(work), x_valid, y_valid)
    out, C = _solve_points_raw(backend_name, fused, x, y, x_valid, y_valid, a, b, cost, cfg)
    if shift is None:
        return out, C
    return _num.unshift(out, shift, x_valid, y_valid), None  # C is C + |μ|²: plan() recomputes it


def _solve_points_raw(
    backend_name: str,
    fused: bool,
    x: torch.Tensor,
    y: torch.Tensor,
    x_valid: torch.Tensor,
    y_valid: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    cost: str,
    cfg: SolverConfig,
) -> tuple[SolverOut, torch.Tensor | None]:
    if fused:
        for name, t in (("x", x), ("y", y)):
            if _check_finite_enabled(t) and t.numel() and not _all_finite(t):
                raise ValueError(f"{name} contains NaN or Inf values")
        xs = torch.where(x_valid[..., None], x, 0.0)
        ys = torch.where(y_valid[..., None], y, 0.0)
        if cost == "sqeuclidean":
            xs, ys = centre(xs, ys, x_valid, y_valid)
            xs = torch.where(x_valid[..., None], xs, 0.0)
            ys = torch.where(y_valid[..., None], ys, 0.0)
        return run(backend_name, cfg, x=xs, y=ys, cost=cost, a=a, b=b), None
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    C = _masked_cost(x, y, x_valid, y_valid, cost, work, backend_name)
    if cost == "cosine":  # C ∈ [0, 2] already: no shift needed
        return run(backend_name, cfg, C=C, a=a, b=b), C
    valid = x_valid[:, :, None] & y_valid[:, None, :]
    return _run_shifted(backend_name, cfg, C, a, b, valid), C


def _run_shifted(
    backend_name: str,
    cfg: SolverConfig,
    C: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    valid: torch.Tensor,
    check: bool = False,
) -> SolverOut:
    """Solve on a given cost C [B, n, m] (0 at padded entries). Balanced problems are solved on
    ``C − k``, ``k`` the per-problem mid-range (an exact invariance, see
    :func:`optical_kernels.numerics.constant_shift`; the solver then sees |C| ≤ R/2, so
    ε ≥ 1e-4 R is never below the rounding of the costs) and ``k`` is added back. ``check``:
    the ε / unbalanced-mass checks of :func:`optical_kernels.numerics.check_cost_problem` on
    the cost as solved."""
    k = _num.constant_shift(C, valid).to(C.dtype) if cfg.rho is None else None
    Cs = C if k is None else torch.where(valid, C - k[:, None, None], 0.0)
    if check and _check_finite_enabled(C):
        _num.check_cost_problem(Cs, valid, cfg)
    out = run(backend_name, cfg, C=Cs.contiguous(), a=a, b=b)
    return out if k is None else _num.unshift(out, k.double(), a > 0, b > 0)


def _masked_cost(
    x: torch.Tensor,
    y: torch.Tensor,
    x_valid: torch.Tensor,
    y_valid: torch.Tensor,
    cost: str,
    work: torch.dtype,
    backend: str = "torch",
) -> torch.Tensor:
    """Differentiable C [B, n, m] in the working dtype, 0 at padded entries (x, y checked
    for NaN/Inf through C). A backend that computes point costs itself (the ``cpu`` one,
    :class:`~optical_kernels.backends.contract.PointCostBackend`) does it in one pass."""
    xw, yw = x.to(work), y.to(work)
    mod = None if torch.compiler.is_compiling() else _backends.point_cost_backend(backend)
    if mod is not None and mod.supports_point_cost(cost, xw, yw):
        C, finite = point_cost(backend.partition(">")[0], xw, yw, cost, x_valid, y_valid)
        if _check_finite_enabled(C) and not bool(finite):
            _raise_cost_nonfinite(C.dtype, (("x", x), ("y", y)))
        return C
    C = cost_matrix(xw, yw, cost, x_valid, y_valid)
    _check_cost_finite(C.detach(), (("x", x), ("y", y)))
    if _all_valid_cpu(C, x_valid, y_valid):  # the masking below would be the identity
        return C.contiguous()
    return torch.where(x_valid[:, :, None] & y_valid[:, None, :], C, 0.0).contiguous()


def _divergence(
    out: SolverOut,
    out_xx: SolverOut,
    out_yy: SolverOut,
    a: torch.Tensor,
    b: torch.Tensor,
    cfg: SolverConfig,
) -> torch.Tensor:
    """``S_ε = OT_ε(x,y) − ½OT_ε(x,x) − ½OT_ε(y,y) + ε/2 (|a| − |b|)²`` [B].

    The last term (0 for balanced problems) is the peers' definition (OTT-JAX
    ``sinkhorn_divergence``, GeomLoss): it cancels the mass constant ``ε(|a||b| − ½|a|² −
    ½|b|²) = −ε/2 (|a| − |b|)²`` of the generalised KL, so that unequal masses give S ≥ 0.
    """
    value = out.value - 0.5 * (out_xx.value + out_yy.value)
    if cfg.rho is not None:
        value = value + 0.5 * cfg.eps * (a.sum(1) - b.sum(1)).square()
    return value


def _all_valid_cpu(C: torch.Tensor, x_valid: torch.Tensor, y_valid: torch.Tensor) -> bool:
    """Every point valid, tested on CPU tensors only (a host sync elsewhere) and never while
    tracing. Saves the masking ``where`` and its backward (with the mask's ``&``: ~6% of the
    instructions of an S1 forward+backward on the cpu backend, bench/ issue 13)."""
    if C.device.type != "cpu" or torch.compiler.is_compiling():
        return False
    return bool(x_valid.all()) and bool(y_valid.all())


def solve_sample(
    x: torch.Tensor,
    y: torch.Tensor,
    a: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
    *,
    x_mask: torch.Tensor | None = None,
    y_mask: torch.Tensor | None = None,
    cost: str = "cosine",
    eps: float = 0.05,
    objective: str = "linear",
    grad: str = "auto",
    rho: float | None = None,
    max_iter: int = 100,
    tol: float = 1e-4,
    check_every: int = 10,
    eps_schedule: tuple[float, float] | None = None,
    backend: str = "auto",
    cg_max_iter: int | None = None,
    cg_tol: float | None = None,
) -> OTResult:
    """Entropic OT between point clouds x [B, n, d] and y [B, m, d] (or [n, d], [m, d]).

    Argument order as POT's ``ot.solve_sample(X_a, X_b, a, b)``: points, then weights; masks
    are keyword-only (the same in :func:`solve` and :func:`sinkhorn_loss`).

    Args:
        x: [B, n, d] source points (the student's token embeddings in OPTICAL).
        y: [B, m, d] target points (the teacher's token embeddings). If x and y have
            different floating dtypes both are promoted to ``torch.result_type(x, y)``, as
            torch losses do (autocast is switched off inside the solver); each gradient comes
            back in its input's dtype.
        a: [B, n] non-negative weights. Default: uniform over valid points.
        b: [B, m] non-negative weights. Default: uniform over valid points.
        x_mask: [B, n] validity mask, keyword-only: bool, integer (a tokenizer's
            ``attention_mask``) or 0/1 float; nonzero = valid point. Default: all valid.
        y_mask: [B, m] validity mask, as ``x_mask``.
        cost: ``"cosine"`` (default, ``1 − x̂·ŷ``), ``"sqeuclidean"`` (``‖x−y‖²``) or
            ``"dot"`` (``−x·y``).
        eps: ε > 0, absolute, in cost units. Default 0.05.
        objective: ``"linear"`` (``<P, C>``, default), ``"entropic"`` (``OT_ε``) or
            ``"divergence"`` (``OT_ε(x,y) − ½OT_ε(x,x) − ½OT_ε(y,y) [+ ε/2 (Σa − Σb)²]``,
            the bracket for unbalanced problems, see :func:`_divergence`; ``n_iters``,
            ``err``, ``converged`` report the worst of the three solves).
        grad: ``"auto"`` (implicit for linear, envelope otherwise), ``"envelope"`` (∂L/∂C = P;
            exact for entropic/divergence, an approximation for linear), ``"implicit"`` (exact
            at the fixed point) or ``"unrolled"`` (derivative of the iterations run).
        rho: KL marginal relaxation ρ > 0 (unbalanced OT), or ``None`` (balanced, default).
        max_iter: iteration cap, default 100.
        tol: stop a problem when its L1 row-marginal error < tol (checked every
            ``check_every`` iterations); 0 runs every problem for ``max_iter`` iterations.
        check_every: convergence test period, default 10.
        eps_schedule: ``(start, factor)``: ε-scaling ``ε_t = max(eps, start·factor^(t−1))``;
            ``None`` (default) uses ``eps`` throughout.
        backend: ``"auto"`` (default), ``"torch"``, ``"cpu"``, ``"triton"``, ``"cuda"`` or
            ``"online"`` (no [n, m] matrix: row tiles of the cost recomputed from the points).
        cg_max_iter: iteration cap (int >= 1) of the conjugate-gradient solve behind
            ``grad="implicit"`` (the exact gradient of ``<P, C>``, docs/design.md §3).
            ``None`` (default): ``4(n+m)+50`` for padded sizes n, m, at most 1000 on the
            streaming Triton kernel (n or m > 128; each CG step streams the plan twice).
            Unused by the other gradient modes and by the cpu backend's direct solve
            (``min(n, m) <= 384``).
        cg_tol: relative residual (> 0) at which that CG stops; ``None`` (default): 1e-13
            in float64, 1e-6 otherwise.

    Returns:
        :class:`OTResult` with ``value`` [B] the objective selected by ``objective``
        (differentiable w.r.t. x and y; ``value_linear`` is always ``<P, C>``). Weights are
        treated as constants (no gradient flows to ``a``, ``b``).

    A solve that stops at ``max_iter`` with an error ``>= tol`` emits a
    :class:`~optical_kernels.ConvergenceWarning` (once per call site; see
    :func:`optical_kernels.convergence.warn_if_unconverged`), unless ``tol=0``.
    """
    cfg, objective = _config(
        eps=eps,
        objective=objective,
        grad=grad,
        rho=rho,
        max_iter=max_iter,
        tol=tol,
        check_every=check_every,
        eps_schedule=eps_schedule,
        backend=backend,
        cg_max_iter=cg_max_iter,
        cg_tol=cg_tol,
    )
    s = _solve_sample(x, y, a, b, x_mask, y_mask, cost, cfg, objective, backend)
    res = _result(s.out, s.value, cfg, s.a, s.b, s.C, s.unbatched)
    if s.C is None:  # fused backend: plan() recomputes C on demand
        xd, yd, xv, yv, work = s.x.detach(), s.y.detach(), s.a > 0, s.b > 0, s.a.dtype
        res._cost = lambda: _masked_cost(xd, yd, xv, yv, s.cost, work)
    return res


class _Solved(NamedTuple):
    """What :func:`_solve_sample` hands to :func:`solve_sample` / :func:`sinkhorn_loss`."""

    value: torch.Tensor  # [B] the objective (differentiable)
    out: SolverOut
    a: torch.Tensor  # [B, n] weights as solved
    b: torch.Tensor
    C: torch.Tensor | None  # the cost solved on, when materialised
    unbatched: bool
    x: torch.Tensor  # the points as solved (batched, promoted)
    y: torch.Tensor
    cost: str


def _solve_sample(
    x: object,
    y: object,
    a: object,
    b: object,
    x_mask: object,
    y_mask: object,
    cost: object,
    cfg: SolverConfig,
    objective: str,
    backend: str,
) -> _Solved:
    """The checked solve behind :func:`solve_sample` and :func:`sinkhorn_loss` (the loss
    needs only the value: it skips building an :class:`OTResult`)."""
    cost = _choice("cost", cost, COSTS)
    x, y, unbatched = _points(x, y)
    with _no_autocast(x.device):
        B, n, _ = x.shape
        m = y.shape[1]
        work = torch.float64 if x.dtype == torch.float64 else torch.float32
        aw, bw = _marginals(x_mask, y_mask, a, b, (B, n, m), x.device, work, cfg, unbatched)
        xv, yv = aw > 0, bw > 0
        if _check_finite_enabled(x):
            _num.check_point_problem(x, y, xv, yv, cost, cfg, work, objective == "divergence")
        name, fused = _backend_name(backend, x.device, x.dtype)
        out, C = _solve_points(name, fused, x, y, xv, yv, aw, bw, cost, cfg)
        value = out.value_linear if objective == "linear" else out.value
        errs = [out.err]
        if objective == "divergence":
            out_xx, _ = _solve_points(name, fused, x, x, xv, xv, aw, aw, cost, cfg)
            out_yy, _ = _solve_points(name, fused, y, y, yv, yv, bw, bw, cost, cfg)
            nonempty = xv.any(1) & yv.any(1)
            value = _divergence(out, out_xx, out_yy, aw, bw, cfg)
            value = torch.where(nonempty, value, 0.0)  # empty: 0, no gradient
            # report the worst of the three solves (the self-solves can converge far slower);
            # an empty problem reports n_iters = 0, err = 0 even if one self-solve had points
            errs = [torch.where(nonempty, e, 0.0) for e in (out.err, out_xx.err, out_yy.err)]
            iters = torch.stack([o.n_iters for o in (out, out_xx, out_yy)]).amax(0)
            out = out._replace(n_iters=torch.where(nonempty, iters, 0),
                               err=torch.stack(errs).amax(0))  # fmt: skip
    warn_if_unconverged(errs, cfg, cost)
    return _Solved(value, out, aw, bw, C, unbatched, x, y, cost)


def solve(
    C: torch.Tensor,
    a: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
    *,
    x_mask: torch.Tensor | None = None,
    y_mask: torch.Tensor | None = None,
    eps: float = 0.05,
    objective: str = "linear",
    grad: str = "auto",
    rho: float | None = None,
    max_iter: int = 100,
    tol: float = 1e-4,
    check_every: int = 10,
    eps_schedule: tuple[float, float] | None = None,
    backend: str = "auto",
    cg_max_iter: int | None = None,
    cg_tol: float | None = None,
) -> OTResult:
    """Entropic OT on a precomputed cost C [B, n, m] (or [n, m]); differentiable in C.

    Argument order as POT's ``ot.solve(M, a, b)``: ``a``, ``b`` are the row / column weights;
    the keyword-only ``x_mask`` [B, n] / ``y_mask`` [B, m] mark valid rows / columns of C
    (bool, integer or 0/1 float; nonzero = valid). ``objective`` is ``"linear"`` or
    ``"entropic"`` (``"divergence"`` needs points: use :func:`solve_sample`); ``value``
    follows it. Other arguments as in :func:`solve_sample`.
    """
    cfg, objective = _config(
        eps=eps,
        objective=objective,
        grad=grad,
        rho=rho,
        max_iter=max_iter,
        tol=tol,
        check_every=check_every,
        eps_schedule=eps_schedule,
        backend=backend,
        cg_max_iter=cg_max_iter,
        cg_tol=cg_tol,
        allowed_objectives=("linear", "entropic"),
    )
    C = _float_tensor("C", C)
    if C.dim() not in (2, 3):
        raise ValueError(f"C must be [n, m] or [B, n, m], got shape {tuple(C.shape)}")
    unbatched = C.dim() == 2
    if unbatched:
        C = C.unsqueeze(0)
    B, n, m = C.shape
    work = torch.float64 if C.dtype == torch.float64 else torch.float32
    with _no_autocast(C.device):
        aw, bw = _marginals(x_mask, y_mask, a, b, (B, n, m), C.device, work, cfg, unbatched)
        name, _ = _backend_name(backend, C.device, C.dtype)
        valid = (aw > 0)[:, :, None] & (bw > 0)[:, None, :]
        Cw = torch.where(valid, C.to(work), 0.0).contiguous()
        out = _run_shifted(name, cfg, Cw, aw, bw, valid, check=True)
        value = out.value_linear if objective == "linear" else out.value
    warn_if_unconverged([out.err], cfg, None)
    return _result(out, value, cfg, aw, bw, Cw, unbatched)


def sinkhorn_loss(
    x: torch.Tensor,
    y: torch.Tensor,
    a: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
    *,
    x_mask: torch.Tensor | None = None,
    y_mask: torch.Tensor | None = None,
    cost: str = "cosine",
    eps: float = 0.05,
    objective: str = "linear",
    grad: str = "auto",
    rho: float | None = None,
    max_iter: int = 100,
    tol: float = 1e-4,
    check_every: int = 10,
    reduction: str = "mean",
    eps_schedule: tuple[float, float] | None = None,
    backend: str = "auto",
    cg_max_iter: int | None = None,
    cg_tol: float | None = None,
) -> torch.Tensor:
    """OT loss between token embeddings x [B, n, d] and y [B, m, d] (the OPTICAL loss).

    Returns the objective of :func:`solve_sample` (default ``<P, C>`` with the implicit
    gradient), reduced over the batch: ``reduction="mean"`` (default, sum / B; empty problems
    count as 0), ``"sum"`` or ``"none"`` ([B]; a scalar for unbatched inputs). Every other
    argument is documented in :func:`solve_sample`; as there, the masks are keyword-only::

        loss = sinkhorn_loss(student_tokens, teacher_tokens,
                             x_mask=student_attention_mask, y_mask=teacher_attention_mask)
    """
    reduction = _choice("reduction", reduction, REDUCTIONS)
    cfg, objective = _config(
        eps=eps,
        objective=objective,
        grad=grad,
        rho=rho,
        max_iter=max_iter,
        tol=tol,
        check_every=check_every,
        eps_schedule=eps_schedule,
        backend=backend,
        cg_max_iter=cg_max_iter,
        cg_tol=cg_tol,
    )
    s = _solve_sample(x, y, a, b, x_mask, y_mask, cost, cfg, objective, backend)
    value = _unbatch(s.value, s.unbatched)
    if reduction == "none":
        return value
    if reduction == "sum" or value.dim() == 0:
        return value.sum()
    return value.sum() / max(value.shape[0], 1)  # B = 0 gives 0, not NaN


class SinkhornLoss(torch.nn.Module):
    """``nn.Module`` form of :func:`sinkhorn_loss`; keywords as there, fixed at construction.

    Example::

        loss_fn = SinkhornLoss(eps=0.05, cost="cosine")
        loss = loss_fn(student_tokens, teacher_tokens, x_mask=student_mask, y_mask=teacher_mask)
    """

    def __init__(
        self,
        *,
        cost: str = "cosine",
        eps: float = 0.05,
        objective: str = "linear",
        grad: str = "auto",
        rho: float | None = None,
        max_iter: int = 100,
        tol: float = 1e-4,
        check_every: int = 10,
        reduction: str = "mean",
        eps_schedule: tuple[float, float] | None = None,
        backend: str = "auto",
        cg_max_iter: int | None = None,
        cg_tol: float | None = None,
    ) -> None:
        super().__init__()
        self.kwargs = dict(
            cost=cost,
            eps=eps,
            objective=objective,
            grad=grad,
            rho=rho,
            max_iter=max_iter,
            tol=tol,
            check_every=check_every,
            reduction=reduction,
            eps_schedule=eps_schedule,
            backend=backend,
            cg_max_iter=cg_max_iter,
            cg_tol=cg_tol,
        )
        # validate now, so a bad keyword fails at construction
        _config(
            eps=eps,
            objective=objective,
            grad=grad,
            rho=rho,
            max_iter=max_iter,
            tol=tol,
            check_every=check_every,
            eps_schedule=eps_schedule,
            backend=backend,
            cg_max_iter=cg_max_iter,
            cg_tol=cg_tol,
        )
        _choice("cost", cost, COSTS)
        _choice("reduction", reduction, REDUCTIONS)

    def forward(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        a: torch.Tensor | None = None,
        b: torch.Tensor | None = None,
        *,
        x_mask: torch.Tensor | None = None,
        y_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Loss between x [B, n, d] and y [B, m, d]; see :func:`sinkhorn_loss`."""
        return sinkhorn_loss(x, y, a, b, x_mask=x_mask, y_mask=y_mask, **self.kwargs)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
