"""Stress grid of the library's promises (issue 9): random cases across costs, objectives,
gradient modes, dtypes, scales, offsets, masks and ρ on the ``torch``, ``cpu`` and ``triton``
(interpreter, every k-th case) backends, plus a fixed list of bad inputs.

Counts, per backend, in the promise domain (finite inputs, ε ≥ 1e-4 × cost range):

* ``nonfinite``: NaN/Inf in value, value_linear, err, potentials or the gradient;
* ``empty_bad``: an empty problem with a non-zero value or gradient;
* ``outside``: balanced ``<P, C>`` outside ``[min C, max C]`` (± 1e-3 R), impossible for a plan;
* ``rejected``: a clear ValueError (e.g. dot + ρ whose mass is not representable);
* ``crashed``: any other exception;
* ``value_dev``: worst ``|value − value_torch| / U`` (same dtype) and ``fp64_dev`` against the
  float64 torch solve of the same inputs, in units ``U = R + u·(max|C| + |value|)`` (cost range
  plus the rounding unit ``u`` of the working dtype on the quantities involved: a cost range
  below the rounding of C itself cannot be resolved); ``grad_dev``: worst normwise gradient
  deviation from the torch backend, ``‖dx − dx_torch‖ / ‖dx_torch‖`` (not for cosine with
  d = 1, whose gradient is identically 0). Deviations are measured on ``tol = 0`` cases only
  (with a tolerance, backends may stop one check apart); worst and 99th percentile.

Bad inputs: each must raise ValueError/TypeError whose message names the argument.

Usage (the public API only, so the same file measures an older checkout too)::

    TRITON_INTERPRET=1 python scripts/stress_promises.py --cases 2000 --triton-every 20
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
import warnings
from collections import defaultdict

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("OPTICAL_KERNELS_QUIET", "1")

import torch  # noqa: E402

import optical_kernels as ok  # noqa: E402
from optical_kernels.costs import cost_matrix  # noqa: E402

COSTS = ("cosine", "sqeuclidean", "dot")
OBJECTIVES = ("linear", "entropic", "divergence")
GRADS = ("auto", "envelope", "implicit", "unrolled")


def _case(rng: torch.Generator, i: int) -> dict:
    """One random case description (deterministic in the generator)."""

    def pick(seq):  # noqa: ANN001, ANN202
        return seq[int(torch.randint(len(seq), (1,), generator=rng))]

    return dict(
        seed=i,
        cost=pick(COSTS),
        objective=pick(OBJECTIVES),
        grad=pick(GRADS),
        dtype=pick((torch.float32, torch.float32, torch.float64, torch.float64,
                    torch.bfloat16, torch.float16)),  # fmt: skip
        scale=pick((1e-3, 1.0, 1.0, 1e2, 1e4)),
        offset=pick((0.0, 0.0, 0.0, 1.0, 1e2, 1e4)),
        rho=pick((None, None, None, 0.1, 1.0, 10.0)),
        eps_rel=10 ** float(-4 * torch.rand((), generator=rng)),
        tol=pick((0.0, 1e-4)),
        B=pick((1, 2, 3)),
        n=pick((1, 3, 5, 8)),
        m=pick((1, 4, 6, 7)),
        d=pick((1, 3, 5)),
        empty=bool(torch.rand((), generator=rng) < 0.2),
        zero_vec=bool(torch.rand((), generator=rng) < 0.15),
        ragged=bool(torch.rand((), generator=rng) < 0.5),
    )


def _inputs(c: dict) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1000 + c["seed"])
    B, n, m, d = c["B"], c["n"], c["m"], c["d"]
    x = c["offset"] + c["scale"] * torch.randn(B, n, d, generator=g, dtype=torch.float64)
    y = c["offset"] + c["scale"] * torch.randn(B, m, d, generator=g, dtype=torch.float64)
    xm = torch.ones(B, n, dtype=torch.bool)
    ym = torch.ones(B, m, dtype=torch.bool)
    if c["ragged"]:
        xm = torch.arange(n)[None] < torch.randint(1, n + 1, (B, 1), generator=g)
        ym = torch.arange(m)[None] < torch.randint(1, m + 1, (B, 1), generator=g)
    if c["empty"]:
        ym[-1] = False
    if c["zero_vec"]:
        x[0, 0] = 0.0
    x = torch.where(xm[..., None], x, 1e3)  # finite garbage at padding
    y = torch.where(ym[..., None], y, -1e3)
    x, y = x.to(c["dtype"]), y.to(c["dtype"])
    a = b = None
    if c["rho"] is not None:
        a = (0.5 + torch.rand(B, n, generator=g, dtype=torch.float64)).to(c["dtype"])
        b = (0.5 + torch.rand(B, m, generator=g, dtype=torch.float64)).to(c["dtype"])
    return x, y, xm, ym, a, b


def _cost_range(c: dict, x: torch.Tensor, y: torch.Tensor, xm, ym) -> tuple[float, float, float]:  # noqa: ANN001, E501
    """(R, min C, max C) over the valid entries, float64 on the same (rounded) inputs."""
    C = cost_matrix(x.double(), y.double(), c["cost"])
    valid = xm[:, :, None] & ym[:, None, :]
    if not valid.any():
        return 0.0, 0.0, 0.0
    lo, hi = C[valid].min().item(), C[valid].max().item()
    return hi - lo, lo, hi


def _run(backend: str, c: dict, x, y, xm, ym, a, b, eps: float):  # noqa: ANN001, ANN202
    xr = x.detach().clone().requires_grad_(True)
    yr = y.detach().clone().requires_grad_(True)
    res = ok.solve_sample(xr, yr, x_mask=xm, y_mask=ym, a=a, b=b, cost=c["cost"], eps=eps,
                          objective=c["objective"], grad=c["grad"], rho=c["rho"], tol=c["tol"],
                          max_iter=100, backend=backend)  # fmt: skip
    res.value.double().sum().backward()
    return res, xr.grad, yr.grad


def _finite(*ts: torch.Tensor) -> bool:
    return all(bool(torch.isfinite(t.double()).all()) for t in ts if t is not None)


def _bad_inputs() -> list[tuple[str, str, object]]:
    """(name expected in the message, description, thunk)."""
    x, y = torch.randn(2, 4, 3), torch.randn(2, 5, 3)
    xs, ys = torch.randn(4, 3), torch.randn(5, 3)
    nan_x = x.clone()
    nan_x[0, 0, 0] = float("nan")
    inf_y = y.clone()
    inf_y[1, 1, 1] = float("inf")
    S = ok.solve_sample
    return [
        ("x", "NaN in x", lambda: S(nan_x, y)),
        ("y", "Inf in y", lambda: S(x, inf_y)),
        ("eps", "eps=0", lambda: S(x, y, eps=0.0)),
        ("eps", "eps=nan", lambda: S(x, y, eps=float("nan"))),
        ("eps", "eps=1e39 fp32", lambda: S(x, y, eps=1e39)),
        ("eps", "eps=1e-300 fp64", lambda: S(x.double(), y.double(), eps=1e-300)),
        ("rho", "rho=0", lambda: S(x, y, rho=0.0)),
        ("max_iter", "max_iter=0", lambda: S(x, y, max_iter=0)),
        ("tol", "tol=-1", lambda: S(x, y, tol=-1.0)),
        ("a", "negative a", lambda: S(x, y, a=-torch.ones(2, 4))),
        ("x_mask", "int mask", lambda: S(x, y, x_mask=torch.ones(2, 4, dtype=torch.int64))),
        ("x_mask", "wrong mask shape", lambda: S(x, y, x_mask=torch.ones(2, 3, dtype=torch.bool))),
        ("x_mask", "unbatched, [1, n] mask",
         lambda: S(xs, ys, x_mask=torch.ones(1, 4, dtype=torch.bool))),
        ("dtype", "x fp32, y fp64", lambda: S(x, y.double())),
        ("feature", "feature mismatch", lambda: S(x, torch.randn(2, 5, 2))),
        ("x", "integer x", lambda: S(x.long(), y)),
        ("x", "meta x", lambda: S(x.to("meta"), y.to("meta"))),
        ("cost", "unknown cost", lambda: S(x, y, cost="l1")),
        ("feature", "cost_matrix feature mismatch",
         lambda: cost_matrix(x, torch.randn(2, 5, 2))),
        ("x", "cost_matrix integer x", lambda: cost_matrix(x.long(), y)),
        ("x", "cost_matrix rank-1 x", lambda: cost_matrix(torch.randn(3), ys)),
        ("C", "solve: NaN in C", lambda: ok.solve(torch.full((2, 3, 4), float("nan")))),
        ("C", "solve: rank-1 C", lambda: ok.solve(torch.randn(3))),
    ]


def main() -> None:  # noqa: C901 - one report loop
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", type=int, default=2000)
    ap.add_argument("--triton-every", type=int, default=20, help="0: no triton")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default="", help="write the summary here")
    ap.add_argument("--max-seconds", type=float, default=0.0,
                    help="stop (and report the cases done) after this long; 0: no limit")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    avail = ok.backends()
    backends = ["torch"] + [b for b in ("cpu",) if avail[b]["available"]]
    tri = args.triton_every > 0 and avail["triton"]["available"]
    rng = torch.Generator().manual_seed(args.seed)
    stats: dict = defaultdict(lambda: defaultdict(float))
    examples: dict = defaultdict(list)
    devs: dict = defaultdict(list)
    t0 = time.time()
    done = 0
    for i in range(args.cases):
        if args.max_seconds and time.time() - t0 > args.max_seconds:
            break
        if i and i % 100 == 0:
            print(f"... {i} cases, {time.time() - t0:.0f} s", flush=True)
        done = i + 1
        c = _case(rng, i)
        x, y, xm, ym, a, b = _inputs(c)
        Rng, lo, hi = _cost_range(c, x, y, xm, ym)
        if Rng <= 0:
            Rng = 1.0
        eps = c["eps_rel"] * Rng
        work = torch.float64 if c["dtype"] == torch.float64 else torch.float32
        u = torch.finfo(work).eps
        cscale = 1.0 if c["cost"] == "cosine" else max(abs(lo), abs(hi))  # C = 1 − x̂·ŷ
        unit = Rng + u * cscale
        names = backends + (["triton"] if tri and i % args.triton_every == 0 else [])
        try:
            ref64 = _run("torch", {**c}, x.double(), y.double(), xm, ym,
                         None if a is None else a.double(), None if b is None else b.double(), eps)
        except Exception:  # noqa: BLE001 - counted below per backend
            ref64 = None
        base = None
        for name in names:
            s = stats[name]
            s["cases"] += 1
            try:
                res, dx, dy = _run(name, c, x, y, xm, ym, a, b, eps)
            except ValueError as exc:
                s["rejected"] += 1
                if len(examples[f"{name}:rejected"]) < 3:
                    examples[f"{name}:rejected"].append(f"{c}: {str(exc)[:160]}")
                continue
            except Exception as exc:  # noqa: BLE001
                s["crashed"] += 1
                if len(examples[f"{name}:crashed"]) < 3:
                    examples[f"{name}:crashed"].append(f"{c}: {type(exc).__name__}: {exc}"[:300])
                continue
            f, g = res.potentials
            if not _finite(res.value, res.value_linear, res.err, f, g, dx, dy):
                s["nonfinite"] += 1
                if len(examples[f"{name}:nonfinite"]) < 5:
                    examples[f"{name}:nonfinite"].append(str(c))
                continue
            emp = res.empty
            if emp.any() and (bool((res.value[emp] != 0).any()) or bool((dx[emp] != 0).any())):
                s["empty_bad"] += 1
            if c["rho"] is None and c["objective"] == "linear":
                vl = res.value_linear.double()[~emp]
                slack = 1e-3 * Rng + 10 * u * cscale
                if vl.numel() and bool(((vl < lo - slack) | (vl > hi + slack)).any()):
                    s["outside"] += 1
                    if len(examples[f"{name}:outside"]) < 3:
                        examples[f"{name}:outside"].append(str(c))
            if name == "torch":
                base = (res, dx)
            elif base is not None and c["tol"] == 0:
                vref = base[0].value.double()
                dv = (res.value.double() - vref).abs().max().item() / (
                    unit + u * vref.abs().max().item()
                )
                gref = base[1].double()
                dg = ((dx.double() - gref).norm() / gref.norm().clamp_min(1e-30)).item()
                devs[f"{name}:value_dev"].append(dv)
                if dv > s["value_dev"]:
                    s["value_dev"] = dv
                    examples[f"{name}:worst_value"] = [f"{c} dv={dv:.3g}"]
                flat = c["cost"] == "cosine" and c["d"] == 1  # x̂ = sign(x): gradient ≡ 0
                if gref.norm() > 0 and not flat:
                    devs[f"{name}:grad_dev"].append(dg)
                if gref.norm() > 0 and not flat and dg > s["grad_dev"]:
                    s["grad_dev"] = dg
                    examples[f"{name}:worst_grad"] = [f"{c} dg={dg:.3g}"]
            if ref64 is not None and c["tol"] == 0 and c["dtype"] in (torch.float32, torch.float64):
                v64 = ref64[0].value
                d64 = (res.value.double() - v64).abs().max().item() / (
                    unit + u * v64.abs().max().item()
                )
                key = "fp64_dev_" + str(c["dtype"]).split(".")[-1]
                devs[f"{name}:{key}"].append(d64)
                if d64 > s[key]:
                    s[key] = d64
                    examples[f"{name}:worst_{key}"] = [f"{c} d={d64:.3g}"]
    bad = _bad_inputs()
    named = 0
    missed = []
    for arg, desc, thunk in bad:
        try:
            thunk()
            missed.append(f"{desc}: no error")
        except (ValueError, TypeError) as exc:
            if arg.lower() in str(exc).lower():
                named += 1
            else:
                missed.append(f"{desc}: {type(exc).__name__}: {str(exc)[:120]}")
        except Exception as exc:  # noqa: BLE001
            missed.append(f"{desc}: {type(exc).__name__}: {str(exc)[:120]}")
    for key, vals in devs.items():
        name, metric = key.split(":")
        vals = sorted(vals)
        stats[name][metric + "_p99"] = vals[min(len(vals) - 1, int(0.99 * len(vals)))]
    summary = {
        "cases": done,
        "seconds": round(time.time() - t0, 1),
        "backends": {k: {kk: (round(vv, 6) if isinstance(vv, float) and not vv.is_integer()
                              else vv) for kk, vv in v.items()} for k, v in stats.items()},
        "bad_inputs": {"named": named, "tried": len(bad), "missed": missed},
        "examples": dict(examples),
    }
    for name, s in summary["backends"].items():
        print(f"{name:7s} " + "  ".join(f"{k}={v:g}" if not math.isnan(v) else f"{k}=nan"
                                        for k, v in s.items()))
    print(f"bad inputs named {named}/{len(bad)}")
    for line in missed:
        print("  missed:", line)
    for k, v in examples.items():
        for e in v[:2]:
            print(f"  e.g. {k}: {e[:240]}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(summary, fh, indent=1, default=str)


if __name__ == "__main__":
    main()
