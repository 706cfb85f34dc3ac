"""The experiment's results file and README table (results.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("scipy")

from optical_kernels.distill import floors, results  # noqa: E402


def _per_query(ranks):
    return floors.per_query_metrics(np.asarray(ranks, dtype=np.int64))


def test_make_row_from_per_query_values():
    rng = np.random.default_rng(0)
    ranks = rng.integers(1, 30, size=(3, 120))  # 3 seeds x 120 queries
    per = {m: np.stack([_per_query(r)[m] for r in ranks]) for m in floors.METRICS}
    row = results.make_row(cell="A", arm="ot-eps0.05", kind="trained", eval_set="bible-test",
                           group="all", per_query=per, seeds=[0, 1, 2], n_resamples=500,
                           extra={"pool_size": 1000})
    assert row["n_queries"] == 120 and row["seeds"] == [0, 1, 2]
    assert row["p@1"] == pytest.approx((ranks == 1).mean())
    assert row["r@10"] == pytest.approx((ranks <= 10).mean())
    assert row["mrr@10"] == pytest.approx(np.where(ranks <= 10, 1 / ranks, 0).mean())
    lo, hi = row["p@1_ci"]
    assert lo <= row["p@1"] <= hi and lo < hi
    assert row["p@1_seeds"] == pytest.approx((ranks == 1).mean(axis=1))
    assert row["pool_size"] == 1000
    json.dumps(row)  # plain JSON types only


def test_make_row_checks():
    per = _per_query([1, 2, 3])
    with pytest.raises(ValueError, match="seeds"):
        results.make_row(cell="A", arm="kd", kind="trained", eval_set="x", group="all",
                         per_query=per)
    with pytest.raises(ValueError, match="kind"):
        results.make_row(cell="A", arm="kd", kind="other", eval_set="x", group="all",
                         per_query=per)
    with pytest.raises(ValueError, match="lacks"):
        results.make_row(cell="A", arm="kd", kind="floor", eval_set="x", group="all",
                         per_query={"p@1": per["p@1"]})
    with pytest.raises(ValueError, match="2 rows"):
        results.make_row(cell="A", arm="kd", kind="trained", eval_set="x", group="all",
                         per_query={m: np.stack([v, v]) for m, v in per.items()}, seeds=[0])
    with pytest.raises(ValueError, match="redefine"):
        results.make_row(cell="A", arm="kd", kind="floor", eval_set="x", group="all",
                         per_query=per, extra={"p@1": 1.0})
    chance = results.make_row(cell="-", arm="chance", kind="floor", eval_set="x", group="all",
                              per_query=floors.chance_per_query([10, 10]), analytic=True)
    assert chance["p@1_ci"] is None and chance["p@1"] == pytest.approx(0.1)


def test_write_read_render_roundtrip(tmp_path):
    rows = [
        results.make_row(cell="-", arm="chance", kind="floor", eval_set="bible-test", group="all",
                         per_query=floors.chance_per_query([1000] * 4), analytic=True),
        results.make_row(cell="A", arm="kd-cos", kind="trained", eval_set="bible-test",
                         group="all", per_query=_per_query([1, 1, 2, 40]), seeds=[0],
                         n_resamples=200),
        results.make_row(cell="A", arm="kd-cos", kind="trained", eval_set="udhr", group="bantu",
                         per_query=_per_query([1, 3]), seeds=[0], n_resamples=200),
    ]
    path = tmp_path / "experiment.json"
    assert results.write_results(path, rows, meta={"note": "test"}) == 3
    doc = json.loads(path.read_text())
    assert doc["schema_version"] == results.SCHEMA_VERSION and doc["meta"] == {"note": "test"}
    back = results.read_results(path)
    assert back == rows
    table = results.render_markdown(back)
    lines = table.strip().split("\n")
    assert len(lines) == 2 + 3
    assert lines[0].startswith("| cell | arm |") and "P@1 [95% CI]" in lines[0]
    assert "| chance | floor | bible-test | all | 4 | – | 0.1 |" in lines[2]
    lo, hi = rows[1]["p@1_ci"]
    assert f"| 50.0 [{100 * lo:.1f}, {100 * hi:.1f}] |" in lines[3]
    only = results.render_markdown(back, groups=["bantu"])
    assert only.count("\n") == 3 and "bantu" in only


def test_validate_rejects_bad_rows():
    good = results.make_row(cell="A", arm="x", kind="floor", eval_set="s", group="all",
                            per_query=_per_query([1, 2]), n_resamples=100)
    with pytest.raises(ValueError, match="duplicate"):
        results.validate_rows([good, dict(good)])
    with pytest.raises(ValueError, match="lacks"):
        results.validate_rows([{k: v for k, v in good.items() if k != "r@10"}])
    with pytest.raises(ValueError, match="p@1_ci"):
        results.validate_rows([{**good, "p@1_ci": [0.9, 1.0]}])
    with pytest.raises(ValueError, match="mrr@10"):
        results.validate_rows([{**good, "mrr@10": 1.5}])


def test_differences_are_paired_and_stored(tmp_path):
    rng = np.random.default_rng(3)
    base = (rng.random((3, 300)) < 0.3).astype(float)  # 3 seeds
    better = np.maximum(base, (rng.random((3, 300)) < 0.2))  # solves a superset
    pq = {"p@1": better, "mrr@10": better, "r@10": better}
    bq = {"p@1": base, "mrr@10": base, "r@10": base}
    d = results.make_difference(cell="A", arm="ot", baseline="kd-cos", eval_set="bible-test",
                                group="all", per_query=pq, baseline_per_query=bq,
                                n_resamples=500)
    assert d["diff"] == pytest.approx(better.mean() - base.mean())
    assert d["resolved"] and 0 < d["ci"][0] < d["diff"] < d["ci"][1]
    same = results.make_difference(cell="A", arm="kd-cos", baseline="kd-cos",
                                   eval_set="bible-test", group="all", per_query=bq,
                                   baseline_per_query=bq, n_resamples=500)
    assert same["diff"] == 0 and same["ci"] == [0.0, 0.0] and not same["resolved"]
    with pytest.raises(ValueError, match="metric"):
        results.make_difference(cell="A", arm="a", baseline="b", eval_set="s", group="all",
                                per_query=pq, baseline_per_query=bq, metric="ndcg")
    table = results.render_differences([d, same])
    assert "| A | ot − kd-cos | bible-test | all | p@1 | 300 |" in table
    assert table.strip().split("\n")[2].endswith("| yes |")
    row = results.make_row(cell="A", arm="ot", kind="trained", eval_set="bible-test",
                           group="all", per_query=pq, seeds=[0, 1, 2], n_resamples=200)
    path = tmp_path / "e.json"
    results.write_results(path, [row], differences=[d])
    assert json.loads(path.read_text())["differences"] == [d]
