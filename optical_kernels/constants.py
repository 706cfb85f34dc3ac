"""Codes shared by the Python layer and every kernel (docs/design.md §5, "Solver constants").

One source for each code the kernels branch on: the integer values here are mirrored by
``csrc/common/okc_constants.h`` (included by both csrc/cpu and csrc/cuda) and exported by the
compiled modules (``_cpu_<isa>.CONSTANTS``, ``_cuda.CONSTANTS``); tests/test_constants.py
checks that the three agree. Triton kernels take the codes as ``tl.constexpr`` ints
(``int(Cost.COSINE)``).

* :class:`Cost` — how the kernel gets ``C``: ``GIVEN`` (a materialised [B, n, m] matrix) or
  fused from points (``COSINE``, ``SQEUCLIDEAN``, ``DOT``, see :mod:`optical_kernels.costs`).
* :class:`GradMode` — the backward formula (docs/design.md §3): ``ENVELOPE``, ``IMPLICIT``,
  ``UNROLLED``.
* :class:`DType` — element types of the CUDA launch description (``Params.dtype``).
* :data:`CUDA_MAX_SIZE` — the size limit of the CUDA resident kernels.

Member names are the upper-case strings of the public API (``cost="cosine"``,
``grad="implicit"``): ``Cost.COSINE.label == "cosine"``, ``cost_code("cosine") == 1``.
"""

from __future__ import annotations

from enum import IntEnum

import torch


class _Named(IntEnum):
    """An IntEnum whose members are named by their lower-case public API string."""

    @property
    def label(self) -> str:
        """The public API string of this member (``"sqeuclidean"``)."""
        return self.name.lower()


class Cost(_Named):
    """Ground cost kind (``COST`` in the kernels; 0 = a given cost matrix)."""

    GIVEN = 0
    COSINE = 1
    SQEUCLIDEAN = 2
    DOT = 3


class GradMode(_Named):
    """Gradient mode of the backward (``MODE`` / ``mode`` in the kernels)."""

    ENVELOPE = 0
    IMPLICIT = 1
    UNROLLED = 2


class DType(_Named):
    """Element type codes of the CUDA launch description."""

    F32 = 0
    F64 = 1
    F16 = 2
    BF16 = 3


#: Largest n and m of the CUDA resident kernels (one block per problem, rows held by warps).
CUDA_MAX_SIZE = 256

#: Costs computed from points (the public ``cost=`` choices), in code order.
POINT_COSTS: tuple[str, ...] = tuple(c.label for c in Cost if c is not Cost.GIVEN)
#: The gradient modes (the public ``grad=`` choices besides ``"auto"``), in code order.
GRAD_MODES: tuple[str, ...] = tuple(g.label for g in GradMode)
#: torch dtype -> :class:`DType`.
TORCH_DTYPES: dict[torch.dtype, DType] = {
    torch.float32: DType.F32,
    torch.float64: DType.F64,
    torch.float16: DType.F16,
    torch.bfloat16: DType.BF16,
}


def cost_code(cost: str) -> int:
    """Kernel code of a cost name (``"given"`` included); ``ValueError`` naming ``cost``."""
    if not isinstance(cost, str) or cost.upper() not in Cost.__members__:
        choices = tuple(c.label for c in Cost)
        raise ValueError(f"cost must be one of {choices}, got {cost!r}")
    return int(Cost[cost.upper()])


def grad_code(grad: str) -> int:
    """Kernel code of a gradient mode name; ``ValueError`` naming ``grad``."""
    if not isinstance(grad, str) or grad not in GRAD_MODES:
        raise ValueError(f"grad must be one of {GRAD_MODES}, got {grad!r}")
    return int(GradMode[grad.upper()])


def as_dict() -> dict[str, int]:
    """Every constant as ``{"Cost.COSINE": 1, ..., "CUDA_MAX_SIZE": 256}`` (the form the
    compiled modules export)."""
    codes = {f"{e.__name__}.{m.name}": int(m) for e in (Cost, GradMode, DType) for m in e}
    return {**codes, "CUDA_MAX_SIZE": CUDA_MAX_SIZE}
