"""The experiment runner on a tiny slice: plan, selection on dev, 2-step runs, resumability
(a second invocation skips finished runs), rows and paired differences."""

from __future__ import annotations

import json

import numpy as np

from optical_kernels.distill import experiment as ex
from optical_kernels.distill.protocol import EvalSet
from optical_kernels.distill.results import read_results


def _sets(pairs):
    fo, en = [p[0] for p in pairs], [p[1] for p in pairs]
    ids = [str(i) for i in range(len(pairs))]
    half = np.arange(len(pairs)) < len(pairs) // 2
    groups = {"all": np.ones(len(pairs), bool), "no-near-dup": half, "near-dup": ~half}
    return [EvalSet("bible-test/pool8", fo, en, ids, 8, dict(groups)),
            EvalSet("bible-test/all", fo, en, ids, None, dict(groups))]


def _setting(toy_mod, tmp_path):
    pairs = toy_mod.toy_pairs(40)
    _, teacher = toy_mod.toy_models(tmp_path / "m")
    made = []

    def make_student(max_length):
        student, _ = toy_mod.toy_models(tmp_path / f"s{len(made)}")
        made.append(student)
        student.max_seq_length = max_length
        return student

    dev = EvalSet("dev", [p[0] for p in pairs[:8]], [p[1] for p in pairs[:8]],
                  [str(i) for i in range(8)], None)
    return ex.Setting("A", make_student, teacher, pairs[8:28], dev, _sets(pairs[28:])), made


def test_tiny_experiment_runs_selects_and_resumes(toy_mod, tmp_path):
    budget = ex.BUDGETS["tiny"]
    setting, made = _setting(toy_mod, tmp_path)
    out = tmp_path / "runs"
    done = ex.run_experiment(setting, budget, out, progress=False, log=lambda m: None)
    n_runs = len(budget.arms) * (len(budget.lrs) + len(budget.seeds) - 1)
    assert done == {"trained": n_runs, "skipped": 0}
    for arm in budget.arms:
        lr = ex.best_lr(out, "A", arm, budget)
        assert lr in budget.lrs
        devs = {x: json.loads((ex.Run("A", arm, x, 0, "selection").folder(out) / ex.RESULT)
                              .read_text())["dev"]["p@1"] for x in budget.lrs}
        assert devs[lr] == max(devs.values())
        for x in budget.lrs:  # only the selected learning rate is evaluated on the test sets
            r = json.loads((ex.Run("A", arm, x, 0, "selection").folder(out) / ex.RESULT)
                           .read_text())
            assert bool(r["sets"]) == (x == lr)
    # second invocation: everything is finished, nothing is trained or even built
    n_students = len(made)
    again = ex.run_experiment(setting, budget, out, progress=False, log=lambda m: None)
    assert again == {"trained": 0, "skipped": n_runs} and len(made) == n_students
    # an unfinished run (its result file lost) is the only one redone
    victim = ex.Run("A", budget.arms[0], budget.lrs[0], 0, "selection").folder(out)
    (victim / ex.RESULT).unlink()
    assert not ex.is_finished(victim)
    third = ex.run_experiment(setting, budget, out, progress=False, log=lambda m: None)
    assert third == {"trained": 1, "skipped": n_runs - 1}

    rows, diffs = ex.collect(setting, budget, out, n_resamples=200)
    assert {r["arm"] for r in rows} == set(budget.arms)
    assert all(r["kind"] == "trained" and r["seeds"] == list(budget.seeds) for r in rows)
    assert {(r["eval_set"], r["group"]) for r in rows} >= {("bible-test/pool8", "all"),
                                                             ("bible-test/all", "no-near-dup")}
    assert diffs and all(d["baseline"] == ex.BASELINE for d in diffs)
    path = ex.write_outputs(rows, diffs, tmp_path / "experiment.json", {"budget": "tiny"})
    assert len(read_results(path)) == len(rows)
    assert "ot-eps0.05" in ex.table_path(path).read_text()
    assert ex.table_path(path).name == "experiment_table.md"  # never the protocol document


def test_plan_counts_and_dry_run(tmp_path, capsys):
    budget = ex.BUDGETS["cpu"]
    sel = ex.selection_runs("A", budget)
    assert len(sel) == len(ex.ARMS) * len(ex.LR_GRID) == 24
    assert ex.final_runs(tmp_path, "A", budget) == []  # nothing selected yet
    assert ex.main(["--dry-run", "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "40 runs" in text and text.count("todo") == 24


def test_gpu_script_is_valid_bash_and_its_dry_run_plans_cell_a(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "scripts" / "gpu_experiment.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    env = {**os.environ, "PYTHON": sys.executable, "GPU_EXP_DRY": "1",
           "GPU_EXP_OUT": str(tmp_path / "runs"), "OUT": str(tmp_path / "out")}
    res = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert "budget gpu" in res.stdout and res.stdout.count("todo") == 24
    assert (tmp_path / "out" / "gpu-experiment" / "gpu_experiment.log").is_file()
