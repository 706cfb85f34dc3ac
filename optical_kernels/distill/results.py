"""The experiment's results file (``docs/experiment.json``) and the README table made from it.

One row per (cell, arm, eval set, language group)::

    {"cell": "A", "arm": "ot-eps0.05", "kind": "trained", "eval_set": "bible-test/pool1000",
     "group": "all", "n_queries": 3230, "seeds": [0, 1, 2],
     "p@1": 0.41, "p@1_ci": [0.39, 0.43], "mrr@10": 0.50, "r@10": 0.66,
     "p@1_seeds": [0.40, 0.41, 0.42]}

and, next to the rows, ``"differences"``: paired-bootstrap intervals of ``arm - baseline``
(:func:`make_difference`), the only form in which the README states a comparison.

``kind`` is ``"floor"`` (no training: chance, the char n-gram TF-IDF match, an untrained or
off-the-shelf model) or ``"trained"``. ``p@1_ci`` is the bootstrap interval over queries of
the seed-averaged P@1 (:func:`optical_kernels.distill.stats.bootstrap_ci`), ``null`` for an
analytic row (chance). :func:`make_row` builds a row from per-query values, so that no number
in the file is typed by hand; :func:`render_markdown` writes the table the README shows.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .bitext import atomic_write_text
from .stats import DEFAULT_RESAMPLES, bootstrap_ci, paired_difference_ci

SCHEMA_VERSION = 1
KINDS = ("floor", "trained")
KEY_FIELDS = ("cell", "arm", "eval_set", "group")
REQUIRED = ("cell", "arm", "kind", "eval_set", "group", "n_queries", "seeds", "p@1", "p@1_ci",
            "mrr@10", "r@10")
METRIC_FIELDS = ("p@1", "mrr@10", "r@10")


def make_row(
    *,
    cell: str,
    arm: str,
    kind: str,
    eval_set: str,
    group: str,
    per_query: Mapping[str, Any],
    seeds: Sequence[int] = (),
    n_resamples: int = DEFAULT_RESAMPLES,
    ci_seed: int = 0,
    analytic: bool = False,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """One results row from per-query metric values.

    Args:
        cell, arm, kind, eval_set, group: the row's key (see the module docstring).
        per_query: ``{"p@1", "mrr@10", "r@10"}`` -> [n_queries] or [n_seeds, n_queries] arrays
            (:func:`optical_kernels.distill.floors.per_query_metrics`, stacked over seeds).
        seeds: the training seeds of the rows of the arrays (empty for a floor).
        n_resamples, ci_seed: bootstrap settings of ``p@1_ci``.
        analytic: the values are expectations (chance): no interval (``p@1_ci`` = ``None``).
        extra: more JSON fields to store (e.g. ``{"pool_size": 1000}``).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    missing = [m for m in METRIC_FIELDS if m not in per_query]
    if missing:
        raise ValueError(f"per_query lacks {missing}")
    arrays = {m: np.atleast_2d(np.asarray(per_query[m], dtype=np.float64)) for m in METRIC_FIELDS}
    shapes = {a.shape for a in arrays.values()}
    if len(shapes) != 1:
        raise ValueError(f"per_query arrays differ in shape: {sorted(shapes)}")
    n_seeds, n = shapes.pop()
    if seeds and len(seeds) != n_seeds:
        raise ValueError(f"seeds lists {len(seeds)} seeds but per_query has {n_seeds} rows")
    if kind == "trained" and not seeds:
        raise ValueError("a trained row needs its seeds")
    if n == 0:
        raise ValueError(f"no queries for {cell}/{arm}/{eval_set}/{group}")
    row: dict[str, Any] = {
        "cell": cell, "arm": arm, "kind": kind, "eval_set": eval_set, "group": group,
        "n_queries": int(n), "seeds": [int(s) for s in seeds],
    }
    row["p@1"] = float(arrays["p@1"].mean())
    if analytic:
        row["p@1_ci"] = None
    else:
        ci = bootstrap_ci(arrays["p@1"], n_resamples=n_resamples, seed=ci_seed)
        row["p@1_ci"] = [ci.lo, ci.hi]
    row["mrr@10"] = float(arrays["mrr@10"].mean())
    row["r@10"] = float(arrays["r@10"].mean())
    if n_seeds > 1:
        row["p@1_seeds"] = [float(x) for x in arrays["p@1"].mean(axis=1)]
    if extra:
        clash = set(extra) & set(row)
        if clash:
            raise ValueError(f"extra may not redefine {sorted(clash)}")
        row.update(extra)
    return row


def make_difference(
    *,
    cell: str,
    arm: str,
    baseline: str,
    eval_set: str,
    group: str,
    per_query: Mapping[str, Any],
    baseline_per_query: Mapping[str, Any],
    metric: str = "p@1",
    n_resamples: int = DEFAULT_RESAMPLES,
    ci_seed: int = 0,
) -> dict[str, Any]:
    """A paired-bootstrap difference ``arm - baseline`` of one metric on the same queries.

    ``per_query`` / ``baseline_per_query`` as in :func:`make_row` (each [n_queries] or
    [n_seeds, n_queries]; seeds averaged per query). Returns ``{"cell", "arm", "baseline",
    "eval_set", "group", "metric", "n_queries", "diff", "ci": [lo, hi], "resolved"}`` where
    ``resolved`` says whether the interval excludes 0: a difference the README may state.
    """
    if metric not in METRIC_FIELDS:
        raise ValueError(f"metric must be one of {METRIC_FIELDS}, got {metric!r}")
    for name, pq in (("per_query", per_query), ("baseline_per_query", baseline_per_query)):
        if metric not in pq:
            raise ValueError(f"{name} lacks {metric!r}")
    d = paired_difference_ci(per_query[metric], baseline_per_query[metric],
                             n_resamples=n_resamples, seed=ci_seed)
    return {"cell": cell, "arm": arm, "baseline": baseline, "eval_set": eval_set,
            "group": group, "metric": metric, "n_queries": d.n_queries, "diff": d.estimate,
            "ci": d.as_list(), "resolved": d.excludes_zero()}


def render_differences(diffs: Iterable[Mapping[str, Any]]) -> str:
    """Markdown table of :func:`make_difference` entries (percentage points)."""
    head = ("cell", "arm − baseline", "eval set", "group", "metric", "queries",
            "Δ [95% CI] (pp)", "resolved")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 5 + ["--:"] * 3) + "|"]
    for d in diffs:
        lo, hi = d["ci"]
        cells = (d["cell"], f"{d['arm']} − {d['baseline']}", d["eval_set"], d["group"],
                 d["metric"], str(d["n_queries"]),
                 f"{100 * d['diff']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]",
                 "yes" if d["resolved"] else "no")
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def validate_rows(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Check every row has the schema's fields with sane values and keys are unique."""
    out, seen = [], set()
    for i, r in enumerate(rows):
        missing = [k for k in REQUIRED if k not in r]
        if missing:
            raise ValueError(f"row {i} lacks {missing}")
        if r["kind"] not in KINDS:
            raise ValueError(f"row {i}: kind must be one of {KINDS}, got {r['kind']!r}")
        for m in METRIC_FIELDS:
            v = r[m]
            if not isinstance(v, (int, float)) or not 0 <= v <= 1:
                raise ValueError(f"row {i}: {m} must be a number in [0, 1], got {v!r}")
        ci = r["p@1_ci"]
        # (a percentile interval holds the mean up to rounding; 1e-9 of slack for it)
        if ci is not None and (len(ci) != 2 or not ci[0] - 1e-9 <= r["p@1"] <= ci[1] + 1e-9):
            raise ValueError(f"row {i}: p@1_ci must be [lo, hi] around p@1, got {ci!r}")
        if not isinstance(r["n_queries"], int) or r["n_queries"] < 1:
            raise ValueError(f"row {i}: n_queries must be a positive int")
        key = tuple(r[k] for k in KEY_FIELDS)
        if key in seen:
            raise ValueError(f"row {i}: duplicate key {dict(zip(KEY_FIELDS, key))}")
        seen.add(key)
        out.append(dict(r))
    return out


def write_results(
    path: str | os.PathLike[str], rows: Iterable[Mapping[str, Any]],
    *, meta: Mapping[str, Any] | None = None,
    differences: Iterable[Mapping[str, Any]] = (),
) -> int:
    """Write ``{"schema_version", "meta", "rows", "differences"}`` as JSON (atomic).

    Returns the row count.
    """
    checked = validate_rows(rows)
    doc = {"schema_version": SCHEMA_VERSION, "meta": dict(meta or {}), "rows": checked,
           "differences": [dict(d) for d in differences]}
    atomic_write_text(path, json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
    return len(checked)


def read_results(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The rows of a file written by :func:`write_results` (validated)."""
    doc = json.loads(Path(path).read_text(encoding="utf-8"))
    if doc.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"{path}: schema_version {doc.get('schema_version')!r}, "
                         f"expected {SCHEMA_VERSION}")
    return validate_rows(doc["rows"])


def _pct(v: float) -> str:
    return f"{100 * v:.1f}"


def render_markdown(
    rows: Iterable[Mapping[str, Any]],
    *,
    eval_sets: Sequence[str] | None = None,
    groups: Sequence[str] | None = None,
) -> str:
    """Markdown table of the rows (percentages, one decimal), in file order.

    Columns: cell, arm, kind, eval set, group, queries, seeds, P@1 [95% CI], MRR@10, R@10.
    ``eval_sets`` / ``groups`` keep only those rows (``None``: all).
    """
    head = ("cell", "arm", "kind", "eval set", "group", "queries", "seeds", "P@1 [95% CI]",
            "MRR@10", "R@10")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 5 + ["--:"] * 5) + "|"]
    for r in validate_rows(rows):
        if eval_sets is not None and r["eval_set"] not in eval_sets:
            continue
        if groups is not None and r["group"] not in groups:
            continue
        ci = r["p@1_ci"]
        p1 = _pct(r["p@1"]) + (f" [{_pct(ci[0])}, {_pct(ci[1])}]" if ci is not None else "")
        seeds = str(len(r["seeds"])) if r["seeds"] else "–"
        cells = (r["cell"], r["arm"], r["kind"], r["eval_set"], r["group"], str(r["n_queries"]),
                 seeds, p1, _pct(r["mrr@10"]), _pct(r["r@10"]))
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"
