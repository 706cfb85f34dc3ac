"""Large CPU problems: ``online`` (no [n, m] matrix) against POT's lazy solver, GeomLoss and our
dense ``cpu`` backend, time and peak memory (``bench/large.py`` runs each case in its own
process).

Opt-in (minutes per case at n = 32,768): ``pytest bench/test_large.py --bench-large 8192,16384``
(sizes n = m; d = 64, 10 iterations, squared Euclidean cost, fwd+bwd for ours and GeomLoss,
forward only for POT, which has no lazy gradient). The rows land in the run's
``bench/results/*.json`` with ``extra_info`` = the case's JSON line (seconds, peak RSS).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.large import PROVIDERS

ROOT = Path(__file__).resolve().parent.parent
# dense providers allocate several [n, m] fp32 buffers: above this n they are skipped here
DENSE_MAX_N = {"cpu": 16384, "geomloss": 16384}
CASE_TIMEOUT_S = 1800


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "large_n" in metafunc.fixturenames:
        spec = metafunc.config.getoption("--bench-large")
        sizes = [int(s) for s in spec.split(",") if s.strip()] if spec else []
        metafunc.parametrize("large_n", sizes or [pytest.param(0, marks=pytest.mark.skip(
            reason="opt-in: --bench-large 8192,16384,32768"))])


@pytest.mark.parametrize("provider", PROVIDERS)
def test_large(benchmark, provider: str, large_n: int) -> None:
    """One case per (provider, n), timed once in a fresh process (the time is the case's own
    ``seconds``; pytest-benchmark records the process wall time around it)."""
    if large_n > DENSE_MAX_N.get(provider, 1 << 30):
        pytest.skip(f"{provider} materialises [n, m] matrices; skipped above n = "
                    f"{DENSE_MAX_N[provider]} on this 24 GiB host")
    mode = "fwd" if provider == "pot_lazy" else "fwd_bwd"
    cmd = [sys.executable, "-m", "bench.large", provider, str(large_n), "--mode", mode]
    result: dict = {}

    def run() -> None:
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                             timeout=CASE_TIMEOUT_S)
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-2000:]}")
        result.update(json.loads(out.stdout.strip().splitlines()[-1]))

    benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)
    benchmark.extra_info.update(result)
