"""GPU benchmark of docs/design.md §7 shapes S2, S3, S4: ours (backend='triton') against the peers.

A standalone, budgeted runner (``scripts/gpu_check.sh`` calls it on the device machine)::

    python bench/test_gpu.py --out bench/results/2026-05-10-h100 [--budget 240]
        [--stages stages.jsonl] [--only S2,S3] [--device cpu --tiny]   # CPU dry run

writes ``<out>.json`` (every measurement, machine info, versions, the check stages) and
``<out>.md`` (tables with speedups of ours over each peer measured in the same run, and the
fraction of the physical floor). Every case is isolated: a failure (missing package, OOM,
NotImplementedError of a kernel family) is recorded and the run goes on; cases that do not
start before the budget is spent are recorded as ``skipped (budget)``. Nothing is written that
was not measured.

Timing: one untimed warm-up call (compilation), then timed calls (CUDA-synchronised wall
clock) until ``--case-time`` seconds or ``--reps`` calls, at least 2 when the warm-up was
short; median and min are reported, with the peak CUDA memory of one call above the inputs.

Providers come from ``bench/providers.py`` (torch reference, POT ``solve_batch``, GeomLoss
tensorized, FlashSinkhorn) plus our variants: ``triton`` (defaults), ``triton[scaling]``
(scaling form of docs/design.md §5), ``triton[tf32x3]`` (fp32 dots on tensor cores),
``triton[lowp_bwd]`` (16-bit backward products) — they exist to pick defaults by measurement.
Our providers run with ``OPTICAL_KERNELS_CHECK_INPUTS=0`` (the documented opt-out of the
input finiteness check, which synchronises with the host).

Under pytest (``pytest bench/test_gpu.py``) a short S2 smoke case runs when CUDA is present.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.providers import PROVIDERS  # noqa: E402
from bench.shapes import make_problem  # noqa: E402


@dataclass(frozen=True)
class Case:
    """One benchmark problem (docs/design.md §7): cosine, ε = 0.05, 100 iterations unless stated."""

    shape: str
    B: int
    n: int
    m: int
    d: int
    dtype: str = "float32"
    cost: str = "cosine"
    ragged: tuple[int, int] | None = None
    eps: float = 0.05
    n_iter: int = 100

    def label(self) -> str:
        rag = f" ragged[{self.ragged[0]},{self.ragged[1]}]" if self.ragged else ""
        return (
            f"{self.shape} B={self.B} n={self.n} m={self.m}{rag} d={self.d} "
            f"{self.dtype} {self.cost}"
        )


CASES = [
    Case("S2", 256, 64, 64, 768),
    Case("S2", 256, 64, 64, 768, dtype="bfloat16"),
    Case("S3", 128, 128, 128, 768, ragged=(4, 128)),
    Case("S4", 1, 16384, 16384, 64, cost="sqeuclidean"),
    Case("S4", 1, 16384, 16384, 64),
    Case("S4", 1, 65536, 65536, 64, cost="sqeuclidean"),
    Case("S4", 1, 65536, 65536, 64),
]
TINY = [
    Case("S2", 8, 16, 16, 32, n_iter=10),
    Case("S3", 8, 32, 32, 32, ragged=(4, 32), n_iter=10),
]

OURS = {
    "triton": {},
    "triton[scaling]": {"form": "scaling"},
    "triton[tf32x3]": {"dot": "tf32x3"},
    "triton[lowp_bwd]": {"lowp_bwd": "1"},
}
PEERS = ["torch", "pot_batch", "geomloss", "flash_sinkhorn"]
#: providers that materialise [B, n, m] (several copies): skipped above this many entries
DENSE_MAX_ENTRIES = 1 << 26
#: a warm-up call slower than this is not repeated (status ``slow``: no timing recorded)
SLOW_WARMUP_S = 20.0
DENSE = {"torch", "pot_batch", "pot_batch_envelope", "pot_loop", "geomloss"}


def _variant_applies(name: str, case: Case) -> bool:
    if name == "triton[tf32x3]":
        return case.dtype == "float32"
    if name == "triton[lowp_bwd]":
        return case.dtype in ("bfloat16", "float16")
    if name == "triton[scaling]":
        return max(case.n, case.m) <= 128  # the scaling form is a resident-kernel option
    return True


def _call_provider(name: str) -> Callable[..., torch.Tensor]:
    if name in OURS:
        knobs = OURS[name]
        base = PROVIDERS["triton"]

        def fn(*args: object, **kw: object) -> torch.Tensor:
            from optical_kernels.backends.triton import launch

            with launch.override(**knobs) if knobs else contextlib.nullcontext():
                return base(*args, **kw)  # type: ignore[arg-type]

        return fn
    return PROVIDERS[name]


def _available(name: str, device: torch.device, case: Case) -> tuple[bool, str]:
    prov = PROVIDERS["triton" if name in OURS else name]
    if name in OURS and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        ok, why = prov.check(device) if prov.check is not None else (True, "")  # dry run
    else:
        ok, why = prov.available(device, case.cost)
    if ok and name in DENSE and case.B * case.n * case.m > DENSE_MAX_ENTRIES:
        return False, f"{name}: dense [B,n,m] = {case.B * case.n * case.m:.2e} entries (skipped)"
    return ok, why


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_case(
    fn: Callable[[], object],
    device: torch.device,
    case_time: float,
    reps: int,
) -> dict[str, object]:
    t0 = time.perf_counter()
    fn()
    _sync(device)
    warm = time.perf_counter() - t0
    if warm > SLOW_WARMUP_S:
        return {"warmup_s": round(warm, 2), "reps": 0, "slow": True}
    times: list[float] = []
    peak = None
    start = time.perf_counter()
    while len(times) < reps:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
        if device.type == "cuda" and peak is None:
            peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        spent = time.perf_counter() - start
        if spent >= case_time and len(times) >= (2 if warm < case_time else 1):
            break
    return {
        "warmup_s": round(warm, 4),
        "reps": len(times),
        "median_ms": round(statistics.median(times) * 1e3, 4),
        "min_ms": round(min(times) * 1e3, 4),
        "peak_mem_mb": None if peak is None else round(peak, 2),
    }


def run_case(
    name: str, case: Case, mode: str, device: torch.device, case_time: float, reps: int
) -> dict[str, object]:
    rec: dict[str, object] = {"case": case.label(), **asdict(case), "provider": name, "mode": mode}
    ok, why = _available(name, device, case)
    if not ok:
        return {**rec, "status": "skipped", "reason": why}
    try:
        dtype = getattr(torch, case.dtype)
        x, y, xm, ym = make_problem(
            case.B, case.n, case.m, case.d, dtype=dtype, device=device, ragged=case.ragged
        )
        prov = _call_provider(name)
        kw = dict(eps=case.eps, n_iter=case.n_iter, cost=case.cost)
        if mode == "fwd":

            def fn() -> object:
                with torch.no_grad():
                    return prov(x, y, xm, ym, **kw)
        else:
            x.requires_grad_(True)

            def fn() -> object:
                out = prov(x, y, xm, ym, **kw)
                (gx,) = torch.autograd.grad(out.float().mean(), x)
                return gx

        rec.update(_time_case(fn, device, case_time, reps))
        rec["status"] = "slow" if rec.pop("slow", False) else "ok"
        if rec["status"] == "slow":
            rec["reason"] = f"warm-up took {rec['warmup_s']} s (> {SLOW_WARMUP_S} s): not timed"
    except Exception as exc:  # recorded, never fatal
        rec.update(
            status="error",
            reason=f"{type(exc).__name__}: {exc}"[:500],
            traceback=traceback.format_exc()[-2000:],
        )
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rec


# ----------------------------------------------------------------------------- floor
def measure_rates(device: torch.device) -> dict[str, float]:
    """Rates of this GPU measured now: HBM bytes/s (copy), fp32/bf16 GEMM flop/s, exp2/s.

    The exp rate uses a Triton kernel doing 64 dependent exp2 per element in registers (MUFU
    bound); failures leave a rate out (and the floor column empty).
    """
    rates: dict[str, float] = {}
    if device.type != "cuda":
        return rates

    def best(fn: Callable[[], object], reps: int = 5) -> float:
        fn()
        torch.cuda.synchronize()
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            ts.append(time.perf_counter() - t)
        return min(ts)

    with contextlib.suppress(Exception):
        src = torch.empty(1 << 28, dtype=torch.float32, device=device)  # 1 GiB
        dst = torch.empty_like(src)
        rates["hbm_bytes_per_s"] = 2 * src.numel() * 4 / best(lambda s=src, o=dst: o.copy_(s))
    src = dst = None
    for name, dt_ in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        with contextlib.suppress(Exception):
            mat = torch.randn(8192, 8192, device=device, dtype=dt_)
            rates[f"gemm_{name}_flop_per_s"] = 2 * 8192**3 / best(lambda w=mat: w @ w)
    with contextlib.suppress(Exception):
        import triton
        import triton.language as tl

        @triton.jit
        def _exp_kernel(x_ptr, n, BLOCK: tl.constexpr):
            offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
            v = tl.load(x_ptr + offs, mask=offs < n, other=0.0)
            for _ in range(64):
                v = tl.exp2(v * -0.5)
            tl.store(x_ptr + offs, v, mask=offs < n)

        n = 1 << 26
        xe = torch.zeros(n, device=device)
        secs = best(lambda: _exp_kernel[(triton.cdiv(n, 1024),)](xe, n, BLOCK=1024))
        rates["exp2_per_s"] = 64 * n / secs
    return rates


def floor_ms(case: Case, mode: str, rates: dict[str, float]) -> float | None:
    """max(bytes/bandwidth, exps/exp-rate, flops/flop-rate) of ours for this case, in ms.

    exps: 2 half-steps per iteration over the padded tile (n·m each) plus one final plan pass,
    doubled for fwd_bwd (the backward rebuilds the plan; CG/unrolled not counted: a floor);
    flops: the cost GEMM 2·B·n·m·d (and G·y in the backward); bytes: x, y (and dx) once.
    """
    need = ("hbm_bytes_per_s", "exp2_per_s")
    if any(k not in rates for k in need):
        return None
    item = 2 if case.dtype in ("bfloat16", "float16") else 4
    gemm = rates.get("gemm_bf16_flop_per_s" if item == 2 else "gemm_fp32_flop_per_s")
    nm = case.B * case.n * case.m
    exps = nm * (2 * case.n_iter + 1)
    flops = 2.0 * nm * case.d
    byts = case.B * (case.n + case.m) * case.d * item
    if mode == "fwd_bwd":
        exps += nm
        flops *= 2
        byts += case.B * case.n * case.d * item
    parts = [byts / rates["hbm_bytes_per_s"], exps / rates["exp2_per_s"]]
    if gemm:
        parts.append(flops / gemm)
    return max(parts) * 1e3


# ----------------------------------------------------------------------------- report
def machine_info(device: torch.device) -> dict[str, object]:
    info: dict[str, object] = {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "device": str(device),
        "check_inputs": os.environ.get("OPTICAL_KERNELS_CHECK_INPUTS"),
    }
    if device.type == "cuda":
        info["cuda"] = torch.version.cuda
        try:
            info["gpu"] = torch.cuda.get_device_name(device)
        except Exception as exc:  # no usable GPU: recorded, the cases will say why
            info["gpu"] = f"unavailable ({type(exc).__name__}: {exc})"
    for mod in ("triton", "ot", "geomloss", "flash_sinkhorn", "numpy"):
        try:
            info[mod] = getattr(__import__(mod), "__version__", "?")
        except Exception:
            info[mod] = None
    return info


def markdown(
    records: list[dict],
    rates: dict[str, float],
    info: dict,
    stages: list[dict],
) -> str:
    lines = [
        f"# GPU benchmark — {info.get('gpu', info['device'])}, {info['date']}",
        "",
        f"torch {info['torch']}, triton {info.get('triton')}, POT {info.get('ot')}, "
        f"GeomLoss {info.get('geomloss')}, FlashSinkhorn {info.get('flash_sinkhorn')}; "
        "cosine unless stated, ε = 0.05, 100 iterations, tol = 0. Times: median of the "
        "timed calls (CUDA-synchronised). 'x ours' = this provider's time / ours "
        "(`triton`) in the same run (>1: ours faster).",
        "",
    ]
    if stages:
        lines += ["## Check stages", "", "| stage | status | seconds | note |", "|---|---|---|---|"]
        for s in stages:
            lines.append(
                f"| {s.get('stage')} | {s.get('status')} | {s.get('seconds', '')} | "
                f"{str(s.get('note', ''))[:120]} |"
            )
        lines.append("")
    if rates:
        lines += ["## Measured rates", ""]
        lines += [f"- {k}: {v:.3e}" for k, v in rates.items()]
        lines.append("")
    lines += [
        "## Results",
        "",
        "| case | mode | provider | median ms | min ms | peak MiB | "
        "x ours | ours / floor | status |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    ours = {
        (r["case"], r["mode"]): r
        for r in records
        if r["provider"] == "triton" and r.get("status") == "ok"
    }
    for r in records:
        o = ours.get((r["case"], r["mode"]))
        ratio = floor = ""
        if r.get("status") == "ok" and o is not None and o.get("median_ms"):
            ratio = f"{r['median_ms'] / o['median_ms']:.2f}"
        if r["provider"] == "triton" and r.get("floor_ms") and r.get("status") == "ok":
            floor = f"{r['median_ms'] / r['floor_ms']:.1f}"
        status = r.get("status", "")
        if status != "ok":
            status += f": {str(r.get('reason', ''))[:80]}"
        lines.append(
            f"| {r['case']} | {r['mode']} | {r['provider']} | "
            f"{r.get('median_ms', '')} | {r.get('min_ms', '')} | "
            f"{r.get('peak_mem_mb', '') or ''} | {ratio} | {floor} | {status} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="output path stem (adds .json and .md)")
    ap.add_argument("--budget", type=float, default=240.0, help="seconds for all cases")
    ap.add_argument("--case-time", type=float, default=0.5, help="timed seconds per case")
    ap.add_argument("--reps", type=int, default=20, help="maximum timed calls per case")
    ap.add_argument("--only", default="", help="comma-separated shapes (S2,S3,S4)")
    ap.add_argument("--providers", default="", help="comma-separated providers")
    ap.add_argument("--stages", default="", help="JSON-lines file of check stages to embed")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (CPU dry run)")
    args = ap.parse_args(argv)
    # documented opt-out of the API's input finiteness check (a host sync), for every provider
    # going through optical_kernels; set here, not at import, so `pytest bench/` is unaffected
    os.environ.setdefault("OPTICAL_KERNELS_CHECK_INPUTS", "0")

    device = torch.device(args.device)
    cases = TINY if args.tiny else CASES
    if args.only:
        keep = set(args.only.split(","))
        cases = [c for c in cases if c.shape in keep]
    names = list(OURS) + PEERS
    if args.providers:
        names = [n for n in names if n in set(args.providers.split(","))]
    stages: list[dict] = []
    if args.stages and Path(args.stages).exists():
        for line in Path(args.stages).read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                stages.append(json.loads(line))

    t_start = time.perf_counter()
    info = machine_info(device)
    rates = {}
    with contextlib.suppress(Exception):
        rates = measure_rates(device)
    records: list[dict] = []
    out_json, out_md = Path(args.out + ".json"), Path(args.out + ".md")
    out_json.parent.mkdir(parents=True, exist_ok=True)

    def flush() -> None:
        payload = {"machine": info, "rates": rates, "stages": stages, "records": records}
        out_json.write_text(json.dumps(payload, indent=1, default=str))
        out_md.write_text(markdown(records, rates, info, stages))

    for case in cases:
        for mode in ("fwd", "fwd_bwd"):
            for name in names:
                if name in OURS and not _variant_applies(name, case):
                    continue
                if time.perf_counter() - t_start > args.budget:
                    records.append(
                        {
                            "case": case.label(),
                            **asdict(case),
                            "provider": name,
                            "mode": mode,
                            "status": "skipped",
                            "reason": "budget",
                        }
                    )
                    continue
                rec = run_case(name, case, mode, device, args.case_time, args.reps)
                if name in OURS and rec.get("status") == "ok":
                    rec["floor_ms"] = floor_ms(case, mode, rates)
                records.append(rec)
                print(
                    json.dumps(
                        {
                            k: rec.get(k)
                            for k in ("case", "mode", "provider", "status", "median_ms", "reason")
                        }
                    ),
                    flush=True,
                )
                flush()
    flush()
    print(f"wrote {out_json} and {out_md}")
    return 0


# ----------------------------------------------------------------------------- pytest
def test_gpu_bench_smoke(tmp_path: Path) -> None:
    """S2 fp32, ours and the torch reference, a few calls: the runner works on this GPU."""
    import pytest

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    rc = main(
        [
            "--out",
            str(tmp_path / "smoke"),
            "--only",
            "S2",
            "--providers",
            "triton,torch",
            "--budget",
            "60",
            "--reps",
            "3",
            "--case-time",
            "0.1",
        ]
    )
    assert rc == 0
    data = json.loads((tmp_path / "smoke.json").read_text())
    assert any(r["status"] == "ok" for r in data["records"])


if __name__ == "__main__":
    sys.exit(main())
