"""The ``backend`` fixture of the contract suite (tests/backends/): every backend of the run.

Parametrised over ``torch`` (the oracle), ``cpu``, ``online``, ``triton`` (under
``TRITON_INTERPRET=1`` on CPU, compiled on a GPU), ``cuda-emu`` (the CUDA kernel sources
through the CPU fiber emulator, built by ``tests/test_cuda.py::_emu_build``) and ``cuda`` (the
real device, ``@pytest.mark.gpu``).
Unavailable backends are skipped with their reason. The capability table, the tolerance table
and the problem/solve helpers live in :mod:`tests.backends.contract` (a module, so that every
test file imports the one copy).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

import optical_kernels as ok
from optical_kernels.backends import cuda as ok_cuda
from tests.backends.contract import Backend

_EMU: list[object] = []


def _emulator() -> object:
    """The CPU-emulator build of csrc/cuda, built by tests/test_cuda.py's helper (cached on
    disk by source hash; loaded once per process)."""
    if not _EMU:
        from tests.test_cuda import _emu_build

        _EMU.append(_emu_build())
    return _EMU[0]


def _gpu() -> bool:
    return torch.cuda.is_available()


_BACKENDS = [
    pytest.param("torch", id="torch"),
    pytest.param("cpu", id="cpu"),
    pytest.param("triton", id="triton"),
    pytest.param("cuda-emu", id="cuda-emu"),
    pytest.param("cuda", id="cuda", marks=pytest.mark.gpu),
    pytest.param("online", id="online"),
]


@pytest.fixture(params=_BACKENDS)
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    """Every backend of the run; unavailable ones are skipped with their reason."""
    name = request.param
    if name == "cuda-emu":
        if _gpu():
            pytest.skip("a GPU is present: the cuda backend runs on it (param 'cuda')")
        ok_cuda._use_module(_emulator())
        try:
            yield Backend("cuda", "cpu", "cuda-emu")
        finally:
            ok_cuda._use_module(None)
            ok_cuda._SMEM_LIMIT = None
        return
    if name == "triton" and not _gpu() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton on CPU needs TRITON_INTERPRET=1 before triton is imported")
    info = ok.backends()[name]
    if not info["available"]:
        pytest.skip(f"backend {name!r} unavailable: {info['reason']}")
    on_gpu = name in ("triton", "cuda") and _gpu()
    kind = "triton-interp" if name == "triton" and not on_gpu else name
    yield Backend(name, "cuda" if on_gpu else "cpu", kind)
