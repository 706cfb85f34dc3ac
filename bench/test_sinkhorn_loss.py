"""Benchmarks of the OPTICAL loss ``sinkhorn_loss`` (docs/design.md §7) against POT and peers.

Each case times one provider (bench/providers.py) on one shape and feature dimension, either
the forward pass (``fwd``: per-problem losses, inputs without gradient) or forward+backward
(``fwd_bwd``: gradient of the mean loss w.r.t. ``x``; the teacher side ``y`` needs none).
Every provider runs exactly ``n_iter`` iterations (``tol = 0``).

Run with ``pytest bench/`` (or ``make bench``); see bench/conftest.py for the options.
"""

from __future__ import annotations

import math
import time

import pytest
import torch

from bench.conftest import isa_info
from bench.providers import PROVIDERS, PeerError
from bench.shapes import make_problem


def case_flops(B: int, n: int, m: int, d: int, n_iter: int, mode: str) -> int:
    """The useful FLOPs of one case, the same for every provider: the cost GEMM ``x·yᵀ``
    (``2·B·n·m·d``), ``n_iter`` iterations of two matrix-vector products (``4·B·n·m`` each)
    and, for ``fwd_bwd``, the gradient GEMM ``G·y`` (``2·B·n·m·d``; ``y`` has no gradient).
    Divided by the time and the host's sgemm rate it gives the "% of sgemm" column."""
    gemm = 2 * B * n * m * d
    return gemm + n_iter * 4 * B * n * m + (gemm if mode != "fwd" else 0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _row_isa(provider: str) -> str:
    """The instruction set a row ran on: our cpu variant for ``cpu*``, torch's otherwise."""
    info = isa_info()
    if provider.startswith("cpu"):
        return str(info.get("ok_cpu_variant"))
    return str(info["torch_cpu_capability"]).lower()


def test_sinkhorn_loss(benchmark, bench_settings, bench_case, mode, provider) -> None:
    shape, d = bench_case
    prov = PROVIDERS[provider]
    device = torch.device(shape.device)
    ok, why = prov.available(device, shape.cost)
    if not ok:
        pytest.skip(why)
    if mode == "fwd" and not prov.forward_differs:
        pytest.skip(f"{provider}: forward identical to its base provider")

    x, y, x_mask, y_mask = make_problem(
        shape.B, shape.n, shape.m, d, dtype=shape.dtype, device=device, ragged=shape.ragged
    )
    kw = dict(eps=shape.eps, n_iter=shape.n_iter, cost=shape.cost)

    if mode == "fwd":

        def fn():
            with torch.no_grad():
                out = prov(x, y, x_mask, y_mask, **kw)
            _sync(device)
            return out

    else:
        x.requires_grad_(True)

        def fn():
            out = prov(x, y, x_mask, y_mask, **kw)
            (gx,) = torch.autograd.grad(out.mean(), x)
            _sync(device)
            return out.detach(), gx

    # untimed calls: the first pays for imports/compilation; if it was short, a second one
    # sizes the number of timed rounds (slow providers get min_rounds straight away)
    t0 = time.perf_counter()
    try:
        res = fn()
    except PeerError as exc:
        pytest.skip(f"{provider}: {exc}")
    t1 = time.perf_counter() - t0
    if t1 < bench_settings["max_time"] / bench_settings["min_rounds"]:
        t0 = time.perf_counter()
        res = fn()
        t1 = time.perf_counter() - t0
    rounds = math.ceil(bench_settings["max_time"] / max(t1, 1e-9))
    rounds = int(min(max(rounds, bench_settings["min_rounds"]), bench_settings["max_rounds"]))

    loss = res if mode == "fwd" else res[0]
    if not bool(torch.isfinite(loss).all()):
        pytest.fail(f"{provider}: non-finite loss")
    benchmark.group = f"{shape.name} d={d} {mode}"
    benchmark.extra_info.update(
        provider=provider,
        description=prov.description,
        objective=prov.objective,
        shape=shape.name,
        case=shape.describe(d),
        d=d,
        mode=mode,
        B=shape.B,
        n=shape.n,
        m=shape.m,
        dtype=str(shape.dtype).removeprefix("torch."),
        device=str(device),
        cost=shape.cost,
        eps=shape.eps,
        n_iter=shape.n_iter,
        loss_mean=float(loss.double().mean()),
        isa=_row_isa(provider),
        flops=case_flops(shape.B, shape.n, shape.m, d, shape.n_iter, mode),
    )
    benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=0)
