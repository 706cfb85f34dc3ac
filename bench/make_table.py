"""Turn recorded benchmark runs (bench/results/*.json) into the README's markdown table.

Usage::

    python bench/make_table.py                       # newest run in bench/results/
    python bench/make_table.py RUN.json [RUN2.json]  # one table per run
    python bench/make_table.py --readme README.md    # also rewrite the README's bench section

For each case (shape, d, fwd or fwd_bwd) and provider it prints the median time and the speed-up
over each baseline *measured in the same run* (``baseline median / provider median``; ``> 1×``
means faster than the baseline). A provider whose mean loss differs from the first baseline's
by more than ``--loss-rtol`` is flagged with ``†`` (same objective only). When the run has the
``gemm_floor`` provider, a column gives each time divided by that floor (docs/design.md §7), and
when the run recorded the host's sgemm rate, a last one the case's useful FLOP rate as a
fraction of it.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
BEGIN = "<!-- bench-table:begin -->"
END = "<!-- bench-table:end -->"


def newest_run(results_dir: Path = RESULTS_DIR) -> Path:
    """The most recently modified ``*.json`` in ``results_dir``."""
    runs = sorted(results_dir.glob("*.json"), key=lambda p: p.stat().st_mtime)
    if not runs:
        raise SystemExit(f"make_table: no *.json in {results_dir}; run `pytest bench/` first")
    return runs[-1]


def _registry_order() -> list[str]:
    """Provider names in registry order (ours first, then the peers), if importable."""
    root = str(Path(__file__).resolve().parent.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    try:
        from bench.providers import PROVIDERS
    except Exception:
        return []
    return list(PROVIDERS)


def _fmt_ms(seconds: float) -> str:
    ms = seconds * 1e3
    if ms >= 100:
        return f"{ms:,.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    return f"{ms:.2f}"


def _fmt_ratio(r: float) -> str:
    return f"{r:,.0f}×" if r >= 100 else (f"{r:.1f}×" if r >= 9.95 else f"{r:.2f}×")


def machine_line(run: dict) -> str:
    """One line naming the machine, the versions and the date of a run."""
    env = run.get("machine_info", {}).get("optical_kernels_bench", {})
    if not env:
        mi = run.get("machine_info", {})
        cpu = mi.get("cpu", {}).get("brand_raw", mi.get("processor", "?"))
        return f"{cpu}; Python {mi.get('python_version', '?')}; {run.get('datetime', '?')[:10]}"
    where = env.get("gpu") or f"{env.get('cpu_model', '?')}, {env.get('cores', '?')} cores"
    if not env.get("gpu"):
        where += f" (torch threads {env.get('torch_threads', '?')})"
    vers = [f"torch {env.get('torch')}", f"POT {env.get('pot')}", f"Python {env.get('python')}"]
    for key, label in [
        ("triton", "triton"),
        ("geomloss", "GeomLoss"),
        ("flash_sinkhorn", "FS"),
        ("ott_jax", "OTT-JAX"),
    ]:
        if env.get(key) and (key != "triton" or env.get("gpu")):
            vers.append(f"{label} {env[key]}")
    isa = ""
    if env.get("ok_cpu_variant") or env.get("torch_cpu_capability"):
        isa = (
            f"; ISA: ours `{env.get('ok_cpu_variant')}`, torch {env.get('torch_cpu_capability')}"
            f" (CPU supports {'/'.join(env.get('cpu_supports') or ['?'])})"
        )
        if env.get("isa_env"):
            isa += ", " + " ".join(f"{k}={v}" for k, v in env["isa_env"].items())
    return f"{where}; {', '.join(vers)}; {str(env.get('date', '?'))[:10]}{isa}"


def table(run: dict, baselines: list[str], loss_rtol: float = 1e-3) -> str:
    """Markdown table of one run."""
    rows: dict[tuple, dict[str, dict]] = {}
    order: list[str] = []
    cases: dict[tuple, str] = {}
    for b in run.get("benchmarks", []):
        e = b.get("extra_info", {})
        if "provider" not in e or "shape" not in e:  # train-step rows: train_table()
            continue
        key = (e["shape"], e["d"], e["mode"])
        rows.setdefault(key, {})[e["provider"]] = {
            "median": b["stats"]["median"],
            "loss": e.get("loss_mean"),
            "objective": e.get("objective", "linear"),
            "flops": e.get("flops"),
        }
        cases[key] = e.get("case", "")
        if e["provider"] not in order:
            order.append(e["provider"])
    if not rows:
        return "_(no solver benchmark in this run)_\n"
    registry = _registry_order()
    seen = list(order)
    rank = {p: (registry.index(p) if p in registry else len(registry), seen.index(p)) for p in seen}
    order.sort(key=rank.__getitem__)

    floor_name = "gemm_floor"
    env = run.get("machine_info", {}).get("optical_kernels_bench", {})
    peak = env.get("sgemm_gflops") if not env.get("gpu") else None
    head = ["case", "pass", "provider", "median (ms)"] + [f"vs {b}" for b in baselines]
    if floor_name in order:
        head.append("÷ GEMMs")
    if peak:
        head.append("% of sgemm")
    align = ["---"] * 3 + ["---:"] * (len(head) - 3)
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(align) + "|"]
    flagged = False
    shape_desc: dict[str, str] = {}
    for key in sorted(rows, key=lambda k: (k[0], k[1], k[2] != "fwd")):
        shape, d, mode = key
        desc = re.sub(r"\s*d=\d+", "", cases[key])
        shape_desc.setdefault(shape, desc)
        by_prov = rows[key]
        ref = next((by_prov[b] for b in baselines if b in by_prov), None)
        for prov in order:
            if prov not in by_prov:
                continue
            r = by_prov[prov]
            name = f"`{prov}`"
            if (
                prov != floor_name
                and ref is not None
                and r["loss"] is not None
                and ref["loss"] is not None
                and r["objective"] == ref["objective"]
                and abs(r["loss"] - ref["loss"]) > loss_rtol * max(abs(ref["loss"]), 1e-12)
            ):
                name += " †"
                flagged = True
            cells = [f"{shape} d={d}", mode.replace("_", "+"), name, _fmt_ms(r["median"])]
            for base in baselines:
                bm = by_prov.get(base)
                cells.append(_fmt_ratio(bm["median"] / r["median"]) if bm else "–")
            if floor_name in order:
                fl = by_prov.get(floor_name)
                cells.append(_fmt_ratio(r["median"] / fl["median"]) if fl else "–")
            if peak:
                fr = r["flops"] / (r["median"] * peak * 1e9) if r["flops"] else None
                cells.append(f"{100 * fr:.1f}%" if fr is not None else "–")
            lines.append("| " + " | ".join(cells) + " |")
    notes = [f"{s}: {desc}" for s, desc in shape_desc.items()]
    out = "\n".join(lines) + "\n"
    out = f"Machine: {machine_line(run)}. " + "; ".join(notes) + ".\n\n" + out
    if peak:
        out += (f"\n% of sgemm: the case's useful FLOPs (cost GEMM, 100 × two matrix-vector "
                f"products, gradient GEMM; bench/test_sinkhorn_loss.py `case_flops`) per second, "
                f"over this host's fp32 GEMM rate measured in the same run ({peak:,.0f} GFLOP/s, "
                f"torch.mm 1024²).\n")
    if flagged:
        out += f"\n† mean loss differs from the baseline's by more than {loss_rtol:g} (relative).\n"
    return out


def train_table(run: dict) -> str:
    """Markdown table of the distillation-step rows (bench/test_train_step.py), if any."""
    rows = [
        (b["extra_info"], b["stats"]["median"])
        for b in run.get("benchmarks", [])
        if str(b.get("extra_info", {}).get("provider", "")).startswith("train_step:")
    ]
    if not rows:
        return ""
    med = {e["provider"].split(":", 1)[1]: t for e, t in rows}
    lines = [
        f"\n{rows[0][0].get('case', 'distillation step')} (ISA `{rows[0][0].get('isa')}`):\n",
        "| step | median (ms) |",
        "|---|---:|",
    ]
    lines += [f"| `{k}` | {_fmt_ms(t)} |" for k, t in med.items()]
    if "ot_only" in med and "kd+ot" in med:
        share = med["ot_only"] / med["kd+ot"]
        lines.append(f"\nOT loss (forward+backward) = {100 * share:.2f}% of a `kd+ot` step.")
    return "\n".join(lines) + "\n"


def replace_readme_section(readme: Path, text: str) -> None:
    """Replace what lies between the bench-table markers of ``readme`` with ``text``."""
    src = readme.read_text()
    if BEGIN not in src or END not in src:
        raise SystemExit(f"make_table: {readme} has no {BEGIN} ... {END} section")
    head, rest = src.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{BEGIN}\n{text.rstrip()}\n{END}{tail}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="*", type=Path, help="pytest-benchmark JSON files")
    ap.add_argument("--baselines", default="pot_batch,pot_loop", help="comma-separated peers")
    ap.add_argument("--loss-rtol", type=float, default=1e-3)
    ap.add_argument("--readme", type=Path, help="rewrite this file's bench-table section")
    args = ap.parse_args(argv)
    runs = args.runs or [newest_run()]
    baselines = [b for b in args.baselines.split(",") if b]
    parts = []
    for path in runs:
        run = json.loads(path.read_text())
        parts.append(
            f"Run `{path.name}`. " + table(run, baselines, args.loss_rtol) + train_table(run)
        )
    text = "\n".join(parts)
    sys.stdout.write(text)
    if args.readme:
        replace_readme_section(args.readme, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
