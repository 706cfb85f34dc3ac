"""The result of a solve: :class:`OTResult`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class OTResult:
    """Entropic OT solution of a batch of problems (shapes for batched inputs).

    Unbatched inputs give the same fields without the leading batch dimension.

    Attributes:
        value: [B] objective value: ``OT_ε`` for ``objective="entropic"``, ``<P, C>`` for
            ``"linear"``, ``S_ε`` for ``"divergence"``. Differentiable.
        value_linear: [B] ``<P, C>``. Differentiable.
        potentials: ``(f [B, n], g [B, m])`` dual potentials (KL convention, 0 at padding).
        n_iters: [B] int32 Sinkhorn iterations run.
        err: [B] final L1 row-marginal error.
        converged: [B] bool, ``err < tol`` (empty problems count as converged).
        empty: [B] bool, problems with no valid point on one side (value 0, gradient 0).
        eps: the ε of the final iterations.
    """

    value: torch.Tensor
    value_linear: torch.Tensor
    potentials: tuple[torch.Tensor, torch.Tensor]
    n_iters: torch.Tensor
    err: torch.Tensor
    converged: torch.Tensor
    empty: torch.Tensor
    eps: float
    _cost: Callable[[], torch.Tensor] | None = None
    _a: torch.Tensor | None = None
    _b: torch.Tensor | None = None
    _unbatched: bool = False

    def plan(self) -> torch.Tensor:
        """Materialise the transport plan ``P = a⊗b·exp((f⊕g − C)/ε)`` [B, n, m] (or [n, m]).

        Not differentiable (use ``value``/``value_linear`` for gradients).
        """
        from .backends.torch import plan as _plan

        if self._cost is None or self._a is None or self._b is None:
            raise RuntimeError("this OTResult holds no cost matrix; plan() is unavailable")
        f, g = self.potentials
        if self._unbatched:
            f, g = f.unsqueeze(0), g.unsqueeze(0)
        with torch.no_grad():
            C = self._cost()
            P = _plan(C, self._a, self._b, f.to(C.dtype), g.to(C.dtype), self.eps)
        return P[0] if self._unbatched else P
