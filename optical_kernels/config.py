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

Backend functions (see :mod:`optical_kernels.backends.torch` for the oracle)::

    forward(C, a, b, cfg)  -> SolverOut
    backward(C, a, b, out, grad_value, grad_value_linear, cfg) -> dL/dC  [B, n, m]

``backward`` returns ``grad_value[k] * ∂value_k/∂C + grad_value_linear[k] *
∂value_linear_k/∂C`` with the derivative chosen by ``cfg.grad`` (docs/design.md §3): ``envelope``
uses ``P`` for both, ``implicit`` is exact at the fixed point (for ``value`` this is ``P`` by
Danskin's theorem), ``unrolled`` differentiates the iterations actually run, from
``out.history``.

Backends that fuse the cost into the solver (Triton, CUDA; the CPU backend does not, it
implements the given-cost functions only) may also provide::

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

from dataclasses import dataclass
from typing import NamedTuple

import torch

GRAD_MODES = ("envelope", "implicit", "unrolled")


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
        cg_max_iter: iteration cap of the conjugate-gradient solve of the implicit gradient.
        cg_tol: relative residual at which CG stops.
    """

    eps: float
    rho: float | None = None
    max_iter: int = 100
    tol: float = 1e-4
    check_every: int = 10
    eps_schedule: tuple[float, float] | None = None
    grad: str = "envelope"
    cg_max_iter: int = 0  # 0: 2·(n+m)+10, chosen by the backend
    cg_tol: float = 0.0  # 0: dtype-dependent default

    def eps_at(self, t: int) -> float:
        """ε used at iteration ``t`` (1-based)."""
        if self.eps_schedule is None:
            return self.eps
        start, factor = self.eps_schedule
        return max(self.eps, start * factor ** (t - 1))

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
