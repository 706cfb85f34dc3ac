"""Integrations of optical_kernels with training libraries.

Importing this package is free: each integration module imports its library only when it is
imported itself (``optical_kernels.integrations.sentence_transformers`` needs the optional
``sentence-transformers`` dependency, ``pip install 'optical-kernels[distill]'``).

Names (resolved lazily): :class:`OPTICALLoss`, :class:`TeacherKDLoss`, :class:`SoftMaxSimLoss`,
:func:`content_mask`
from :mod:`optical_kernels.integrations.sentence_transformers`.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "OPTICALLoss": "sentence_transformers",
    "TeacherKDLoss": "sentence_transformers",
    "SoftMaxSimLoss": "sentence_transformers",
    "content_mask": "sentence_transformers",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
