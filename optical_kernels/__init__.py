"""optical_kernels: fused entropic optimal transport losses between token embeddings.

Public names (docs/design.md §4): :func:`sinkhorn_loss`, :class:`SinkhornLoss`, :func:`solve`,
:func:`solve_sample`, :func:`cost_matrix`, :class:`OTResult`, :func:`backends`,
:class:`ConvergenceWarning`.
"""

from . import backends  # a callable module: backends() lists the backends
from .api import SinkhornLoss, sinkhorn_loss, solve, solve_sample
from .convergence import ConvergenceWarning
from .costs import cost_matrix
from .result import OTResult

__all__ = [
    "ConvergenceWarning",
    "OTResult",
    "SinkhornLoss",
    "backends",
    "cost_matrix",
    "sinkhorn_loss",
    "solve",
    "solve_sample",
]
__version__ = "0.1.0"
