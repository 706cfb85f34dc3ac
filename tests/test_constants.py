"""One source for every solver constant (issue 8, item 3; docs/design.md §5 "Solver constants").

* The Python IntEnums of :mod:`optical_kernels.constants` == the enums of
  csrc/common/okc_constants.h (parsed here) == the ``CONSTANTS`` dict every compiled module
  exports (each built CPU variant, the CUDA-kernel CPU emulator build, ``_cuda`` if built).
* No other source file defines the codes again (the six cost tables and four grad-mode
  tables this replaced).
* The public ``cg_max_iter`` / ``cg_tol`` reach the kernels (a 1-step CG changes the implicit
  gradient; the default equals the documented formula) and bad values raise naming them.
* The CPU module's Params boundary rejects what the kernels cannot take.
"""

from __future__ import annotations

import importlib
import math
import re
from pathlib import Path

import pytest
import torch

import optical_kernels as ok
from optical_kernels import constants
from optical_kernels.backends import cpu
from optical_kernels.config import (
    CG_STREAMED_CAP,
    SolverConfig,
    default_cg_max_iter,
)
from optical_kernels.constants import Cost, DType, GradMode

ROOT = Path(__file__).resolve().parents[1]
HEADER = ROOT / "csrc" / "common" / "okc_constants.h"
ENUMS = {"Cost": Cost, "GradMode": GradMode, "DType": DType}


def _header_enums() -> dict[str, dict[str, int]]:
    """``{"Cost": {"GIVEN": 0, ...}, ...}`` parsed from the C++ header (``kSqEuclidean`` ->
    ``SQEUCLIDEAN``)."""
    text = HEADER.read_text()
    found: dict[str, dict[str, int]] = {}
    for name, body in re.findall(r"enum\s+(\w+)\s*:\s*int\s*\{([^}]*)\}", text):
        members = re.findall(r"\bk(\w+)\s*=\s*(\d+)", body)
        found[name] = {m.upper(): int(v) for m, v in members}
    return found


def _header_exports() -> dict[str, int]:
    """The ``f("Enum.MEMBER", kMember)`` list the modules' CONSTANTS dict is built from,
    with each ``kMember`` replaced by its value in the header's enums."""
    text = HEADER.read_text()
    values = {f"k{m}".upper(): v for e in _header_enums().values() for m, v in e.items()}
    values |= {k.upper(): int(v) for k, v in re.findall(r"constexpr int (k\w+) = (\d+);", text)}
    pairs = re.findall(r'f\("([\w.]+)",\s*(k\w+)\)', text)
    return {key: values[sym.upper()] for key, sym in pairs}


def test_header_enums_equal_python_enums() -> None:
    parsed = _header_enums()
    assert set(parsed) == set(ENUMS)
    for name, enum in ENUMS.items():
        assert parsed[name] == {m.name: int(m) for m in enum}, name


def test_header_export_list_is_complete() -> None:
    assert _header_exports() == constants.as_dict()


def test_cuda_size_limit_has_one_source() -> None:
    from optical_kernels.backends import cuda

    assert "constexpr int kMaxSize = kCudaMaxSize;" in (
        ROOT / "csrc" / "cuda" / "okc_params.h"
    ).read_text()
    assert cuda.MAX_SIZE == constants.CUDA_MAX_SIZE == _header_exports()["CUDA_MAX_SIZE"]


def test_public_names_follow_the_codes() -> None:
    assert constants.POINT_COSTS == ("cosine", "sqeuclidean", "dot")
    assert constants.GRAD_MODES == ("envelope", "implicit", "unrolled")
    assert ok.api.GRADS == ("auto", *constants.GRAD_MODES)
    assert ok.costs.COSTS == constants.POINT_COSTS
    assert [constants.cost_code(c) for c in ("given", *constants.POINT_COSTS)] == [0, 1, 2, 3]
    assert [constants.grad_code(g) for g in constants.GRAD_MODES] == [0, 1, 2]
    with pytest.raises(ValueError, match="cost"):
        constants.cost_code("matrix")
    with pytest.raises(ValueError, match="grad"):
        constants.grad_code("auto")


@pytest.mark.skipif(not cpu.built_isas(), reason="no _cpu_<isa> module built")
@pytest.mark.parametrize("isa", ["base", "avx2", "avx512", "native"])
def test_cpu_modules_export_the_header(isa: str) -> None:
    if isa not in cpu.built_isas():
        pytest.skip(f"_cpu_{isa} is not built")
    if isa != "native" and isa not in cpu.supported_isas():
        pytest.skip(f"this CPU cannot load _cpu_{isa}")
    mod = importlib.import_module(f"optical_kernels._cpu_{isa}")
    assert mod.CONSTANTS == constants.as_dict()


def test_cuda_emulator_build_exports_the_header() -> None:
    from tests.test_cuda import _emu_build

    assert _emu_build().CONSTANTS == constants.as_dict()


def test_cuda_module_exports_the_header() -> None:
    try:
        from optical_kernels import _cuda  # type: ignore[attr-defined]
    except ImportError as exc:
        pytest.skip(f"optical_kernels._cuda is not built ({exc})")
    assert _cuda.CONSTANTS == constants.as_dict()


# Tables that spelled the codes out again before issue 8 (cost: costs.py, triton/__init__.py,
# resident.py COST_IDS, streaming.py COST_CODES, cuda.py, okc_params.h kMatrix; grad modes:
# cpu.py, cuda.py, triton/backward.py MODES, common.h/backward.cpp literals).
_PY_TABLE = re.compile(r'"(given|cosine|sqeuclidean|dot|envelope|implicit|unrolled)"\s*:\s*\d')
_CPP_ENUM = re.compile(r"enum\s+(Cost|GradMode|DType)\b|\bkMatrix\b|A\.mode\s*[=!]=\s*\d")


def test_no_second_definition_of_the_codes() -> None:
    offenders = []
    for path in sorted((ROOT / "optical_kernels").rglob("*.py")):
        if path.name != "constants.py" and _PY_TABLE.search(path.read_text()):
            offenders.append(str(path.relative_to(ROOT)))
    for path in sorted((ROOT / "csrc").rglob("*")):
        if path.suffix in (".h", ".cuh", ".cpp", ".cu") and path != HEADER:
            if _CPP_ENUM.search(path.read_text()):
                offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []


# --------------------------------------------------------------------------- CG options
def test_cg_defaults_are_resolved_once() -> None:
    cfg = SolverConfig(eps=0.1)
    assert cfg.cg_limits(7, 5, torch.float64) == (4 * 12 + 50, 1e-13)
    assert cfg.cg_limits(7, 5, torch.float32) == (98, 1e-6)
    assert cfg.cg_limits(7, 5, torch.bfloat16) == (98, 1e-6)
    assert cfg.cg_limits(4096, 4096, torch.float32, streamed=True) == (CG_STREAMED_CAP, 1e-6)
    assert cfg.cg_limits(100, 100, torch.float32, streamed=True) == (850, 1e-6)
    given = SolverConfig(eps=0.1, cg_max_iter=5000, cg_tol=1e-3)
    assert given.cg_limits(4096, 4096, torch.float64, streamed=True) == (5000, 1e-3)
    assert default_cg_max_iter(3, 4) == 78


def _implicit_grad(backend: str, **cg: object) -> torch.Tensor:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 9, 4, dtype=torch.float64, generator=gen).requires_grad_(True)
    y = torch.randn(2, 7, 4, dtype=torch.float64, generator=gen)
    loss = ok.sinkhorn_loss(x, y, eps=0.05, grad="implicit", tol=1e-10, max_iter=500,
                            backend=backend, **cg)  # fmt: skip
    (gx,) = torch.autograd.grad(loss, x)
    return gx


@pytest.fixture
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """A backend name for the public API; ``cuda`` runs through the CPU emulator build."""
    name = request.param
    if name == "cpu":
        if not cpu.is_available()[0]:
            pytest.skip(cpu.is_available()[1])
        monkeypatch.setattr(cpu, "DIRECT_MAX", 0)  # force the cpu backend's CG path
    if name == "triton":
        from optical_kernels.backends import triton as ok_triton

        if not ok_triton.is_available()[0]:
            pytest.skip(ok_triton.is_available()[1])
    if name == "cuda":
        from optical_kernels.backends import cuda as ok_cuda
        from tests.test_cuda import _emu_build

        ok_cuda._use_module(_emu_build())
        request.addfinalizer(lambda: ok_cuda._use_module(None))
    return name


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton", "cuda"], indirect=True)
def test_cg_options_reach_the_kernels(backend: str) -> None:
    """cg_max_iter=1 / a loose cg_tol change the implicit gradient; the default equals the
    documented formula given explicitly (the cpu backend's CG runs past DIRECT_MAX; cuda is
    the CPU emulator build of its kernels, triton the interpreter)."""
    default = _implicit_grad(backend)
    explicit = _implicit_grad(backend, cg_max_iter=default_cg_max_iter(9, 7), cg_tol=1e-13)
    one_step = _implicit_grad(backend, cg_max_iter=1)
    loose = _implicit_grad(backend, cg_tol=0.5)
    torch.testing.assert_close(explicit, default, rtol=0, atol=1e-12)
    scale = default.abs().max().item()
    assert (one_step - default).abs().max().item() > 1e-3 * scale
    assert (loose - default).abs().max().item() > 1e-3 * scale
    many = _implicit_grad(backend, cg_max_iter=10_000)
    torch.testing.assert_close(many, default, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("backend", ["cpu", "triton", "cuda"], indirect=True)
@pytest.mark.parametrize("cg", [{}, {"cg_max_iter": 1}, {"cg_max_iter": 3, "cg_tol": 1e-3}])
def test_cg_options_match_the_oracle(backend: str, cg: dict) -> None:
    """Same CG cap and tolerance as the torch oracle: same implicit gradient, truncated too."""
    torch.testing.assert_close(_implicit_grad(backend, **cg), _implicit_grad("torch", **cg),
                               rtol=1e-7, atol=1e-10)  # fmt: skip


_BAD_CG = [
    ({"cg_max_iter": 0}, ValueError, "cg_max_iter"),
    ({"cg_max_iter": -3}, ValueError, "cg_max_iter"),
    ({"cg_max_iter": 2.5}, TypeError, "cg_max_iter"),
    ({"cg_max_iter": True}, TypeError, "cg_max_iter"),
    ({"cg_tol": 0.0}, ValueError, "cg_tol"),
    ({"cg_tol": -1e-6}, ValueError, "cg_tol"),
    ({"cg_tol": math.nan}, ValueError, "cg_tol"),
    ({"cg_tol": math.inf}, ValueError, "cg_tol"),
    ({"cg_tol": "1e-6"}, TypeError, "cg_tol"),
]


@pytest.mark.parametrize(("kwargs", "exc", "name"), _BAD_CG)
def test_bad_cg_options_raise_naming_them(kwargs: dict, exc: type, name: str) -> None:
    x, y = torch.randn(2, 5, 3), torch.randn(2, 4, 3)
    C = torch.rand(2, 5, 4)
    for call in (
        lambda: ok.sinkhorn_loss(x, y, **kwargs),
        lambda: ok.solve_sample(x, y, **kwargs),
        lambda: ok.solve(C, **kwargs),
        lambda: ok.SinkhornLoss(**kwargs),
    ):
        with pytest.raises(exc, match=name):
            call()


def test_cg_options_are_keywords_of_the_module() -> None:
    loss_fn = ok.SinkhornLoss(cg_max_iter=3, cg_tol=1e-4)
    assert "cg_max_iter=3" in loss_fn.extra_repr() and "cg_tol=0.0001" in loss_fn.extra_repr()


# --------------------------------------------------------------------------- eps schedule
def test_eps_schedule_resolved_form() -> None:
    cfg = SolverConfig(eps=0.05, max_iter=100, eps_schedule=(1.0, 0.5))
    s = cfg.schedule
    assert (s.start, s.factor) == (1.0, 0.5)
    assert s.t_eps == 6  # 1, .5, .25, .125, .0625, then 0.05
    assert s.table == (1.0, 0.5, 0.25, 0.125, 0.0625, 0.05)
    assert [cfg.eps_at(t) for t in range(1, 8)] == [*s.table, 0.05]
    assert [t for t in range(1, 31) if SolverConfig(
        eps=0.05, max_iter=100, eps_schedule=(1.0, 0.5), tol=1e-4, check_every=2
    ).checks_at(t)] == list(range(6, 31, 2))
    const = SolverConfig(eps=0.05)
    assert (const.schedule.t_eps, const.schedule.table) == (1, ())
    never = SolverConfig(eps=0.05, max_iter=3, eps_schedule=(1.0, 0.9))
    assert never.schedule.t_eps == 4 and len(never.schedule.table) == 3


# --------------------------------------------------------------------------- cpu boundary
@pytest.mark.skipif(not cpu.is_available()[0], reason="cpu backend not built")
def test_cpu_params_boundary_checks() -> None:
    C = torch.rand(1, 3, 2, dtype=torch.float64)
    a = torch.full((1, 3), 1 / 3, dtype=torch.float64)
    b = torch.full((1, 2), 0.5, dtype=torch.float64)
    cfg = SolverConfig(eps=0.1, grad="implicit")
    p, keep = cpu._params(C, a, b, cfg)
    out = cpu.forward(C, a, b, cfg)
    dC = torch.zeros_like(C)
    p.mode = int(GradMode.IMPLICIT)
    p.f, p.g, p.n_iters = out.f.data_ptr(), out.g.data_ptr(), out.n_iters.data_ptr()
    gv = torch.ones(1, dtype=torch.float64)
    p.grad_value, p.grad_value_linear, p.dC = gv.data_ptr(), gv.data_ptr(), dC.data_ptr()
    with pytest.raises(ValueError, match="cg_max_iter"):
        cpu._cpu.backward(p)  # unresolved CG cap: the kernels have no default of their own
    p.cg_max_iter, p.cg_tol = 10, 1e-12
    cpu._cpu.backward(p)
    assert dC.abs().sum() > 0
    p.mode = 7
    with pytest.raises(ValueError, match="gradient mode"):
        cpu._cpu.backward(p)
    p.dtype = int(DType.F16)
    with pytest.raises(ValueError, match="dtype"):
        cpu._cpu.forward(p)
    del keep
