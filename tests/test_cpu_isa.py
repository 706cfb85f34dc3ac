"""Runtime ISA dispatch of the ``cpu`` backend (setup.py builds one module per ISA).

Every variant that is built and that this CPU can run must agree with the ``torch``
reference, forward and implicit backward (vector width 4, 8 and 16 floats exercise different
padding and blocking); the automatic choice is the best supported variant, an unknown or
unsupported one is refused, and ``backends()`` names the variant in use.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest
import torch

import optical_kernels as ok
from optical_kernels.backends import cpu
from optical_kernels.backends import torch as ref
from optical_kernels.config import SolverConfig
from tests.test_cpu import check_forward, make_batch, rel

pytestmark = pytest.mark.skipif(not cpu.is_available()[0], reason=cpu.is_available()[1])

X86 = platform.machine().lower() in ("x86_64", "amd64")
RUNNABLE = [isa for isa in cpu.built_isas() if isa in cpu.supported_isas() or isa == "native"]


@pytest.fixture
def restore_isa():  # noqa: ANN201
    yield
    cpu.set_isa(None)


def test_one_build_holds_every_variant_this_cpu_runs() -> None:
    built = cpu.built_isas()
    assert "base" in built
    if X86:  # x86-64-v3 / v4 are built on every x86 host, whatever the build machine had
        assert {"avx2", "avx512"} <= set(built)
    want = next(v for v in cpu.ISA_VARIANTS if v in RUNNABLE)
    if not os.environ.get(cpu.ISA_ENV):
        assert cpu.ISA == want
    assert f"variant {cpu.ISA}" in ok.backends()["cpu"]["reason"]


@pytest.mark.parametrize("isa", RUNNABLE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_variant_matches_reference(isa: str, dtype: torch.dtype, restore_isa) -> None:  # noqa: ANN001
    assert cpu.set_isa(isa) == isa
    assert f"variant={isa}" in cpu._cpu.build_info()
    for n, m in ((7, 7), (33, 20), (9, 40)):
        C, a, b = make_batch(4, n, m, dtype, seed=n + 7 * m)
        cfg = SolverConfig(eps=0.05, max_iter=50, tol=0.0, grad="implicit")
        out, want = check_forward(C, a, b, cfg)
        gv, gl = torch.rand(4, dtype=dtype), torch.rand(4, dtype=dtype)
        dC = cpu.backward(C, a, b, out, gv, gl, cfg)
        dR = ref.backward(C.double(), a.double(), b.double(), want, gv.double(), gl.double(), cfg)
        assert rel(dC.double(), dR) <= (2e-5 if dtype == torch.float32 else 1e-9)


def test_unknown_or_unsupported_variant_refused(restore_isa) -> None:  # noqa: ANN001
    with pytest.raises(ValueError, match="isa must be one of"):
        cpu.set_isa("sse9")
    missing = [v for v in ("avx512", "avx2") if v not in cpu.supported_isas()]
    for isa in missing:
        with pytest.raises(ValueError, match="supports only"):
            cpu.set_isa(isa)


def test_env_var_forces_a_variant() -> None:
    code = (
        "import optical_kernels as ok; from optical_kernels.backends import cpu; "
        "print(cpu.ISA, '|', ok.backends()['cpu']['reason'])"
    )
    env = dict(os.environ, OPTICAL_KERNELS_CPU_ISA="base")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("base |")
    assert "forced by OPTICAL_KERNELS_CPU_ISA=base" in out.stdout
    env["OPTICAL_KERNELS_CPU_ISA"] = "sse9"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "expected one of" in out.stdout
