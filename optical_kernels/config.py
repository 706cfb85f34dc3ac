"""Solver configuration and the contract every backend implements.

Every backend (``torch``, ``cpu``, ``triton``, ``cuda``) computes the *same* function of a
padded batch of problems. The public API (:mod:`optical_kernels.api`) normalises the inputs
and hands each backend:

* ``C``  [B, n, m] cost, float32 or float64, **0 at padded entries**;
* ``a``  [B, n], ``b`` [B, m] non-negative weights of the same dtype, **0 at padded
  positions** (a zero weight *is* the mask), already renormalised to sum 1 for balanced
  problems; a problem whose ``a`` or ``b`` sums to 0 is *empty*;
* a :class:`SolverConfig`.

The iteration map (docs/design.md §2) that all backends compute, per problem, with
``λ_t = ρ/(ρ+ε_t)`` (``λ_t = 1`` when ``rho is None``)::

    f = 0, g = 0, active = not empty
    for t in 1..max_iter:
        ε_t = max(eps, start * factor**(t-1))   if eps_schedule = (start, factor) else eps
        f_i ← −λ_t ε_t LSE_{j valid}[ log b_j + (g_j − C_ij)/ε_t ]
        g_j ← −λ_t ε_t LSE_{i valid}[ log a_i + (f_i − C_ij)/ε_t ]
        (inactive problems keep f, g unchanged; n_iters counts the updates applied)
        if t % check_every == 0 and ε_t == eps:
            active &= err >= tol

    P_ij = a_i b_j exp((f_i + g_j − C_ij)/ε)
    err  = Σ_i |Σ_j P_ij − a_i exp(−f_i/ρ)|       (exp(−f_i/ρ) ≡ 1 when balanced)

``err`` is the L1 row-marginal error: the row marginal of the unbalanced fixed point is
``a_i exp(−f_i/ρ)``, so the same rule serves both. For unbalanced problems it is relative
to the mass: ``err = Σ_i |r_i − t_i| / max(Σ_i r_i, Σ_i t_i)`` with ``r = P1``,
``t_i = a_i exp(−f_i/ρ)`` (0 when both masses are 0); balanced weights sum to 1, so there the
absolute and relative errors coincide. An absolute rule stopped a problem that transports
little mass at its first check, 4–85% away from its fixed point (issue 9). ``err`` is
reported for the final potentials. Outputs at padded positions are 0 (``f``, ``g``,
gradients); empty problems give ``f = g = 0``, ``value = value_linear = 0``,
``n_iters = 0``, ``err = 0``.

Values (over valid entries)::

    value_linear = Σ_ij P_ij C_ij
    value        = value_linear + ε KL(P ‖ a⊗b) [+ ρ KL(P1 ‖ a) + ρ KL(Pᵀ1 ‖ b) if rho]
    KL(p ‖ q)    = Σ p log(p/q) − p + q     (generalised KL)

Backend functions (the contract as code, with shapes and dtypes:
:mod:`optical_kernels.backends.contract`; the oracle: :mod:`optical_kernels.backends.torch`)::

    forward(C, a, b, cfg)  -> SolverOut
    backward(C, a, b, out, grad_value, grad_value_linear, cfg) -> dL/dC  [B, n, m]

``backward`` returns ``grad_value[k] * ∂value_k/∂C + grad_value_linear[k] *
∂value_linear_k/∂C`` with the derivative chosen by ``cfg.grad`` (docs/design.md §3): ``envelope``
uses ``P`` for both, ``implicit`` is exact at the fixed point (for ``value`` this is ``P`` by
Danskin's theorem), ``unrolled`` differentiates the iterations actually run, from
``out.history``.

Backends that fuse the cost into the solver (Triton, CUDA, online; the CPU backend does not,
it implements the given-cost functions only) may also provide::

    forward_sample(x, y, a, b, cost, cfg) -> SolverOut
    backward_sample(x, y, a, b, cost, out, grad_value, grad_value_linear, cfg, need_dy)
        -> (dx [B, n, d], dy [B, m, d] or None)

with ``x`` [B, n, d], ``y`` [B, m, d] (padded rows are 0; for ``sqeuclidean`` both are
already centred on a common mean), ``cost`` in ``cosine | sqeuclidean | dot``, computing the
same map with ``C = cost(x, y)`` as in :mod:`optical_kernels.costs`. The API uses them when
present and falls back to ``forward``/``backward`` on the materialised ``C`` otherwise.
A backend module also exposes ``is_available() -> (bool, reason)``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .constants import GRAD_MODES

__all__ = [
    "CG_STREAMED_CAP",
    "CG_TOL_DEFAULT",
    "GRAD_MODES",
    "EpsSchedule",
    "SolverConfig",
    "SolverOut",
    "default_cg_max_iter",
    "resolve_cg",
]

#: Relative CG residual of the implicit gradient when ``cg_tol`` is not given, by the working
#: dtype (float64, else float32; float16/bfloat16 problems are solved in float32).
CG_TOL_DEFAULT = {torch.float64: 1e-13, torch.float32: 1e-6}
#: Cap of the *default* CG iteration count in the streaming Triton kernel (n or m > 128):
#: each CG step there streams the plan twice from the points (two passes over the n×m tile
#: grid), so ``4(n+m)+50`` steps at n = m = 4096 would cost ~33k passes; Jacobi-PCG on these
#: systems converges in far fewer steps (tests/test_triton_streaming.py). Set when the
#: streaming kernel was introduced (commit 56fb18f) as a bound on that cost; an explicit
#: ``cg_max_iter`` is never capped.
CG_STREAMED_CAP = 1000


def default_cg_max_iter(n: int, m: int) -> int:
    """Default CG cap ``4(n+m)+50`` for a padded problem of n rows and m columns.

    The system has n+m unknowns, so exact-arithmetic CG ends in at most n+m steps; the factor
    4 absorbs the loss of conjugacy in floating point on ill-conditioned plans (small ε), and
    the +50 covers tiny problems. This is the oracle's formula
    (:func:`optical_kernels.backends.torch.implicit_linear_grad`); every backend gets it
    through :meth:`SolverConfig.cg_limits`.
    """
    return 4 * (int(n) + int(m)) + 50


def resolve_cg(
    cg_max_iter: int | None,
    cg_tol: float | None,
    n: int,
    m: int,
    dtype: torch.dtype,
    *,
    streamed: bool = False,
) -> tuple[int, float]:
    """``(cap, tol)`` of the implicit gradient's CG: the given values, or for ``None`` the
    defaults :func:`default_cg_max_iter` (at most :data:`CG_STREAMED_CAP` when ``streamed``)
    and :data:`CG_TOL_DEFAULT` of ``dtype``. The only place these defaults are chosen
    (:meth:`SolverConfig.cg_limits` calls it)."""
    if cg_max_iter is not None:
        cap = int(cg_max_iter)
    else:
        cap = default_cg_max_iter(n, m)
        if streamed:
            cap = min(cap, CG_STREAMED_CAP)
    tol = cg_tol
    if tol is None:
        tol = CG_TOL_DEFAULT[torch.float64 if dtype == torch.float64 else torch.float32]
    return cap, float(tol)


class EpsSchedule(NamedTuple):
    """The ε-schedule of a :class:`SolverConfig`, resolved once (:attr:`SolverConfig.schedule`).

    ``ε_t = max(eps, start·factor^(t−1))`` for ``t < t_eps`` and ``ε_t = eps`` for
    ``t ≥ t_eps``, where ``t_eps`` is the first iteration at which that expression equals
    ``eps`` exactly (``max_iter + 1`` if it never does within ``max_iter``). Constant ε:
    ``start = eps``, ``factor = 1``, ``t_eps = 1``. ``table`` holds ``ε_1 .. ε_L``,
    ``L = min(t_eps, max_iter)``: the schedule up to and including the first ``eps`` (empty for
    constant ε; never ``max_iter`` entries once ε reaches ``eps``, issue 9). Every backend
    reads this form: the torch oracle and the streaming Triton host loop through
    :meth:`SolverConfig.eps_at`, the CPU kernels the ``table``, the resident Triton and CUDA
    kernels ``(start, factor, t_eps)``.
    """

    start: float
    factor: float
    t_eps: int
    table: tuple[float, ...]


@functools.lru_cache(maxsize=256)
def _resolve_schedule(
    eps: float, schedule: tuple[float, float] | None, max_iter: int
) -> EpsSchedule:
    if schedule is None:
        return EpsSchedule(eps, 1.0, 1, ())
    start, factor = float(schedule[0]), float(schedule[1])

    def at(t: int) -> float:
        return max(eps, start * factor ** (t - 1))

    if at(1) == eps:
        t_eps = 1
    elif factor >= 1.0 or factor <= 0.0:
        t_eps = max_iter + 1 if factor > 0.0 else 2
    else:  # start·factor^(t−1) ≤ eps from t ≈ 1 + log(eps/start)/log(factor); walk to exact
        guess = 1 + max(0, math.ceil(math.log(eps / start) / math.log(factor)))
        t_eps = max(2, guess - 2)
        while t_eps > 2 and at(t_eps - 1) == eps:
            t_eps -= 1
        while t_eps <= max_iter and at(t_eps) != eps:
            t_eps += 1
    t_eps = min(t_eps, max_iter + 1)
    table = tuple(at(t) for t in range(1, min(t_eps, max_iter) + 1))
    return EpsSchedule(start, factor, t_eps, table)


@dataclass(frozen=True)
class SolverConfig:
    """Resolved solver options shared by every backend.

    Attributes:
        eps: entropic regularisation ε > 0, absolute, in cost units.
        rho: KL marginal relaxation ρ > 0, or ``None`` for balanced problems.
        max_iter: maximum number of Sinkhorn iterations (one f- and one g-update each).
        tol: stopping threshold on the L1 row-marginal error; ``0`` runs ``max_iter``.
        check_every: test convergence every this many iterations.
        eps_schedule: ``(start, factor)`` for ε-scaling, ``ε_t = max(eps, start·factor^(t-1))``,
            or ``None``.
        grad: resolved gradient mode, one of ``envelope``, ``implicit``, ``unrolled``.
        cg_max_iter: iteration cap (>= 1) of the conjugate-gradient solve of the implicit
            gradient, or ``None``: :func:`default_cg_max_iter` (see :meth:`cg_limits`).
        cg_tol: relative residual (> 0) at which CG stops, or ``None``: by dtype,
            :data:`CG_TOL_DEFAULT`.

    What kernels need is resolved here once, never by a backend: :attr:`schedule` (the
    ε-schedule), :meth:`checks_at` (the stopping rule) and :meth:`cg_limits` (CG cap and
    tolerance for the concrete problem size and dtype).
    """

    eps: float
    rho: float | None = None
    max_iter: int = 100
    tol: float = 1e-4
    check_every: int = 10
    eps_schedule: tuple[float, float] | None = None
    grad: str = "envelope"
    cg_max_iter: int | None = None
    cg_tol: float | None = None

    @property
    def schedule(self) -> EpsSchedule:
        """The ε-schedule resolved for ``max_iter`` iterations (cached per configuration)."""
        return _resolve_schedule(float(self.eps), self.eps_schedule, int(self.max_iter))

    def eps_at(self, t: int) -> float:
        """ε used at iteration ``t`` (1-based): ``max(eps, start·factor^(t−1))`` before
        ``schedule.t_eps``, ``eps`` from there on."""
        s = self.schedule
        if t < s.t_eps:
            return s.table[t - 1]
        if t <= self.max_iter or self.eps_schedule is None:
            return self.eps
        return max(self.eps, s.start * s.factor ** (t - 1))  # past max_iter: never run

    def checks_at(self, t: int) -> bool:
        """The stopping rule: iteration ``t`` (1-based) tests ``err < tol`` when ``tol > 0``,
        ``t`` is a multiple of ``check_every`` and ε has reached ``eps`` (``t ≥ t_eps``)."""
        return self.tol > 0 and t % self.check_every == 0 and t >= self.schedule.t_eps

    def cg_limits(
        self, n: int, m: int, dtype: torch.dtype, *, streamed: bool = False
    ) -> tuple[int, float]:
        """``(cap, tol)`` of the implicit gradient's CG for a padded n × m problem solved in
        ``dtype``: ``cg_max_iter`` or :func:`default_cg_max_iter` (``4(n+m)+50``; at most
        :data:`CG_STREAMED_CAP` when ``streamed``, the streaming Triton kernel), ``cg_tol``
        or :data:`CG_TOL_DEFAULT` of the dtype (:func:`resolve_cg`)."""
        return resolve_cg(self.cg_max_iter, self.cg_tol, n, m, dtype, streamed=streamed)

    def damping(self, eps_t: float) -> float:
        """λ = ρ/(ρ+ε) for unbalanced problems, 1 for balanced ones."""
        return 1.0 if self.rho is None else self.rho / (self.rho + eps_t)


class SolverOut(NamedTuple):
    """What a backend's ``forward`` returns (shapes in brackets).

    Attributes:
        f: [B, n] row potential, 0 at padded rows.
        g: [B, m] column potential, 0 at padded columns.
        value: [B] entropic objective (see module docstring).
        value_linear: [B] ``<P, C>``.
        n_iters: [B] int32, iterations applied.
        err: [B] L1 row-marginal error of the returned potentials.
        history: for ``grad="unrolled"``: ``(hist_f [T, B, n], hist_g [T, B, m])``, the
            potentials after each iteration ``t = 1..T`` (``T ≤ max_iter``; entries past
            ``n_iters[k]`` are unspecified; the ops layer pads T to ``max_iter``), else
            ``None``.
    """

    f: torch.Tensor
    g: torch.Tensor
    value: torch.Tensor
    value_linear: torch.Tensor
    n_iters: torch.Tensor
    err: torch.Tensor
    history: object = None
