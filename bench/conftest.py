"""pytest configuration of the benchmark suite (``pytest bench/``).

* Every run that times something writes ``bench/results/<date>-<host>-<isa>.json`` (unless
  ``--benchmark-json`` is given), with machine info (CPU model, cores, GPU), library versions
  (torch, POT, numpy, triton, python, optical_kernels) and the date added to pytest-benchmark's
  ``machine_info``, and the instruction sets used (:func:`isa_info`: the CPU's, our ``cpu``
  variant, torch's capability). To reproduce an AVX2 host on an AVX-512 one, lower them all::

      OPTICAL_KERNELS_CPU_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 \
      DNNL_MAX_CPU_ISA=AVX2 XLA_FLAGS=--xla_cpu_max_isa=AVX2 pytest bench/

  ``python bench/make_table.py`` turns such a file into the README table.
* Options: ``--bench-shapes S1,S3`` (default S1), ``--bench-providers torch,pot_batch``
  (default: all registered), ``--bench-modes fwd,fwd_bwd``, ``--bench-max-time`` (seconds of
  timed rounds per case, default 1.0), ``--bench-min-rounds`` (3), ``--bench-max-rounds`` (50).
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import os
import platform
import re
from pathlib import Path

import pytest

RESULTS_DIR = Path(__file__).resolve().parent / "results"
_STARTED = _dt.datetime.now().astimezone()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("optical_kernels bench")
    group.addoption("--bench-shapes", default="S1", help="comma-separated shapes (bench/shapes.py)")
    group.addoption("--bench-providers", default="", help="comma-separated providers (default all)")
    group.addoption("--bench-modes", default="fwd,fwd_bwd", help="fwd and/or fwd_bwd")
    group.addoption("--bench-max-time", type=float, default=1.0, help="timed seconds per case")
    group.addoption("--bench-min-rounds", type=int, default=3, help="minimum timed rounds")
    group.addoption("--bench-max-rounds", type=int, default=50, help="maximum timed rounds")
    group.addoption("--bench-large", default="", help="n = m sizes of bench/test_large.py "
                    "(opt-in, e.g. 8192,16384,32768)")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _gpu_name() -> str | None:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except Exception:
        pass
    return None


def _slug(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-")


def host_kind() -> str:
    """Short machine id for result file names: ``cpu2c-amd-epyc`` or ``nvidia-h100-80gb-hbm3``."""
    gpu = _gpu_name()
    if gpu:
        return _slug(gpu)
    return f"cpu{_cores()}c-{_slug(_cpu_model())}"[:60]


#: Environment variables that lower the ISA a run uses (to reproduce an AVX2 host on an
#: AVX-512 one): ours, torch's own kernels, MKL, oneDNN, XLA (OTT-JAX).
ISA_ENV_VARS = (
    "OPTICAL_KERNELS_CPU_ISA",
    "ATEN_CPU_CAPABILITY",
    "MKL_ENABLE_INSTRUCTIONS",
    "DNNL_MAX_CPU_ISA",
    "XLA_FLAGS",
)


def isa_info() -> dict[str, object]:
    """Which instruction sets this run uses: the CPU's best (``avx512``/``avx2``/``base``), the
    variant of our ``cpu`` backend, torch's kernel capability, and any ISA-lowering variables."""
    import torch

    info: dict[str, object] = {"torch_cpu_capability": torch.backends.cpu.get_cpu_capability()}
    try:
        from optical_kernels.backends import cpu

        info["cpu_supports"] = list(cpu.supported_isas())
        info["ok_cpu_variant"] = cpu.ISA or None
    except Exception as exc:  # the bench also runs without our package built
        info["ok_cpu_variant"] = f"unavailable ({type(exc).__name__})"
    info["isa_env"] = {k: os.environ[k] for k in ISA_ENV_VARS if os.environ.get(k)}
    return info


def isa_tag() -> str:
    """Short tag of the ISA a run measures our kernels on (result file names, table rows)."""
    info = isa_info()
    return str(info.get("ok_cpu_variant") or info["torch_cpu_capability"]).lower()


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def sgemm_gflops(size: int = 1024, reps: int = 5) -> float:
    """This host's fp32 GEMM rate (GFLOP/s, best of ``reps`` products of ``size``² matrices with
    torch's threads): the achievable FMA rate that the tables' "% of sgemm" column divides by."""
    import time

    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return round(2 * size**3 / best / 1e9, 1)


def bench_environment() -> dict[str, object]:
    """Machine and version facts recorded with every run."""
    import torch

    env: dict[str, object] = {
        "date": _STARTED.isoformat(timespec="seconds"),
        "host_kind": host_kind(),
        "cpu_model": _cpu_model(),
        "cores": _cores(),
        "torch_threads": torch.get_num_threads(),
        "gpu": _gpu_name(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "sgemm_gflops": sgemm_gflops(),
        **isa_info(),
    }
    for key, dist in [
        ("pot", "pot"),
        ("numpy", "numpy"),
        ("triton", "triton"),
        ("optical_kernels", "optical-kernels"),
        ("geomloss", "geomloss"),
        ("flash_sinkhorn", "flash-sinkhorn"),
        ("ott_jax", "ott-jax"),
        ("jax", "jax"),
    ]:
        env[key] = _version(dist)
    return env


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "bench: pytest-benchmark case under bench/")
    # Default JSON output: runs in the same pytest_configure pass, before pytest-benchmark's
    # (trylast) configure reads the option.
    if (
        hasattr(config.option, "benchmark_json")
        and config.option.benchmark_json is None
        and not getattr(config.option, "benchmark_disable", False)
        and not getattr(config.option, "collectonly", False)
    ):
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        stamp = _STARTED.strftime("%Y-%m-%d-%H%M")
        config.option.benchmark_json = RESULTS_DIR / f"{stamp}-{host_kind()}-{isa_tag()}.json"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).resolve().parent
    for item in items:
        if here in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.bench)


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    machine_info["optical_kernels_bench"] = bench_environment()


def pytest_benchmark_update_json(config: pytest.Config, benchmarks, output_json: dict) -> None:
    output_json["bench_settings"] = {
        "shapes": config.getoption("--bench-shapes"),
        "providers": config.getoption("--bench-providers") or "all",
        "modes": config.getoption("--bench-modes"),
        "max_time": config.getoption("--bench-max-time"),
        "min_rounds": config.getoption("--bench-min-rounds"),
        "max_rounds": config.getoption("--bench-max-rounds"),
    }


def _split(opt: str) -> list[str]:
    return [s.strip() for s in opt.split(",") if s.strip()]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize ``bench_case`` × ``mode`` × ``provider`` from the command-line selection."""
    if "bench_case" not in metafunc.fixturenames:
        return
    from bench.providers import PROVIDERS
    from bench.shapes import SHAPES

    config = metafunc.config
    shapes = _split(config.getoption("--bench-shapes"))
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        raise pytest.UsageError(f"--bench-shapes: unknown {unknown}; known: {list(SHAPES)}")
    providers = _split(config.getoption("--bench-providers")) or list(PROVIDERS)
    unknown = [p for p in providers if p not in PROVIDERS]
    if unknown:
        raise pytest.UsageError(f"--bench-providers: unknown {unknown}; known: {list(PROVIDERS)}")
    modes = _split(config.getoption("--bench-modes"))
    if not set(modes) <= {"fwd", "fwd_bwd"} or not modes:
        raise pytest.UsageError(f"--bench-modes: expected fwd and/or fwd_bwd, got {modes}")

    cases = [(SHAPES[s], d) for s in shapes for d in SHAPES[s].ds]
    metafunc.parametrize("bench_case", cases, ids=[f"{sh.name}-d{d}" for sh, d in cases])
    metafunc.parametrize("mode", modes)
    metafunc.parametrize("provider", providers)


@pytest.fixture
def bench_settings(request: pytest.FixtureRequest) -> dict[str, float]:
    cfg = request.config
    return {
        "max_time": cfg.getoption("--bench-max-time"),
        "min_rounds": cfg.getoption("--bench-min-rounds"),
        "max_rounds": cfg.getoption("--bench-max-rounds"),
    }
