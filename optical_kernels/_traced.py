"""Backend look-ups marked constant for ``torch.compile`` tracing.

Imported only while Dynamo traces (:func:`torch.compiler.is_compiling`), because
:func:`torch.compiler.assume_constant_result` imports ``torch._dynamo`` (about 1 s): a plain
``import optical_kernels`` must not pay for it. Both look-ups depend only on strings and a
dtype (never on a SymInt size), so one compiled graph serves every sequence length; routing
that depends on the sizes happens inside the custom ops (:func:`optical_kernels.backends.route`).
"""

from __future__ import annotations

import torch

# not `from . import backends`: the package attribute of that name is the function backends()
from .backends import fuses_cost as _fuses_cost
from .backends import resolve_name as _resolve_name


@torch.compiler.assume_constant_result
def resolve_name(backend: str, device_type: str, dtype: torch.dtype) -> str:
    """:func:`optical_kernels.backends.resolve_name`, a constant for tracing."""
    return _resolve_name(backend, device_type, dtype)


@torch.compiler.assume_constant_result
def fuses_cost(name: str) -> bool:
    """:func:`optical_kernels.backends.fuses_cost`, a constant for tracing."""
    return _fuses_cost(name)
