"""``make experiment``: the protocol of docs/experiment.md — every arm, tuned, 3 seeds, intervals.

``python -m optical_kernels.distill.experiment [--cell A] [--out runs/experiment]
[--results docs/experiment.json] [--budget cpu|gpu] [--dry-run]``

Plan (:func:`plan_runs`), for one cell:

1. **selection** — every arm (:data:`ARMS`: OT at three ε, KD-MSE, KD-cosine, InfoNCE KD,
   OT+KD, the token-level soft max-similarity control) is trained with seed 0 at each
   learning rate of :data:`LR_GRID` — the **same search budget for every arm** (OT's ε is an
   arm of its own, so each ε gets the same learning-rate search as any other arm) — and
   scored by P@1 on ``dev_pool`` dev verses (the dev split; never reported);
2. **final** — the arm's best learning rate on dev is trained with seeds 1 and 2 as well (the
   seed-0 run of the selection is reused: same budget; its exported model is evaluated on
   the test sets once selected), and the three seeds are evaluated on
   the Bible test set (every one of the 3,230 verses; pools of 1,000 and the whole set; per
   book; with/without near-duplicates) and every UDHR language, at eval max length 256;
3. **rows** — :func:`optical_kernels.distill.protocol.system_rows` (seed-averaged per-query
   values, bootstrap intervals over queries) and paired differences of every arm against
   KD-cosine and of OT (each ε) against the max-similarity control
   (:func:`optical_kernels.distill.results.make_difference`), written to ``--results``
   (``docs/experiment.json``) and rendered to ``docs/experiment_table.md`` with
   ``render_markdown`` (:func:`table_path`).

Every run lives in ``<out>/<cell>/<arm>/lr<lr>-seed<seed>/``; a run is **finished** when its
exported ``model/`` (with its SHA-256 manifest) and ``result.json`` (its per-query values)
exist, and a second invocation skips it (resumable; an interrupted run restarts from its
last checkpoint, :func:`optical_kernels.distill.trainer.distill`). A tqdm bar counts
training steps over the whole plan and shows the estimated remaining time.

Teacher outputs: the frozen teacher's document embeddings of every evaluation set are
computed once per process and cached (:class:`TeacherCache`, also saved as ``.npy`` under
``<out>/<cell>/teacher/``); during training the teacher runs inside the loss (its forward is
a no-grad pass of MiniLM, about a tenth of an e5-small training step).

Budgets (:data:`BUDGETS`), one shared by every arm:

* ``cpu`` — 150 steps × 16 pairs (2,400 pairs, 9% of an epoch), train length 128, the
  learning rates of :data:`LR_GRID` (3e-4, 1e-3, 3e-3: a 50-step probe at 1e-3 stayed
  at chance, so the short budgets search the top of the usual range), input embeddings
  frozen (96 M of e5-small's 118 M parameters are its 250 k-piece vocabulary; training them
  costs +75% per step, demo.MEASURED). Measured on the quiet 2-core AVX-512 host
  (2026-12-01, bf16 autocast): an OT step ~0.9 s wall, a selection run (150 steps + dev
  evaluation) ~2.5 min, so 40 runs ≈ 1.6 h with the final runs' test-set evaluation (3,230
  test verses + 2,056 UDHR paragraphs at 256 tokens, ~30 s under bf16). A reduced budget:
  each student sees 2,400 pairs; it measures early training, not converged students.
* ``gpu`` — 300 steps × 32 pairs (9,600 pairs, 36% of an epoch; 4× the CPU budget's
  pairs), same grid, seeds and frozen embeddings, for scripts/gpu_experiment.sh on one
  H200: 12,000 steps at an assumed ~20 ms per e5-small step of 32 × 128 tokens (bf16)
  ≈ 4 min, + ~3 s of set-up per run (2 min) + ~1 min of evaluation.
  The step time is an assumption, not a measurement: the script has not been run.
* ``tiny`` — 2 steps × 4 pairs, 2 learning rates, 2 arms (tests only).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# Run order (the experiment goes arm by arm): the baseline, the main OT arm, the strongest KD
# and the token-level control first, so that an experiment cut short still answers the most.
ARMS: dict[str, dict[str, Any]] = {
    "kd-cosine": {"loss": "kd-cosine"},
    "ot-eps0.05": {"loss": "ot", "eps": 0.05},
    "kd-infonce": {"loss": "kd-contrastive"},
    "maxsim": {"loss": "maxsim"},
    "ot-eps0.02": {"loss": "ot", "eps": 0.02},
    "kd-mse": {"loss": "kd"},
    "ot+kd": {"loss": "ot+kd", "eps": 0.05},
    "ot-eps0.1": {"loss": "ot", "eps": 0.1},
}
# The grid sits high: at 50 steps × 16 pairs, lr 1e-3, KD-cosine and InfoNCE KD
# students still retrieved at chance on dev (P@1 0.2% and 0.6% of 500 verses, chance 0.2%;
# development-session probe), so the short budget needs the top of the usual range and above.
LR_GRID = (3e-4, 1e-3, 3e-3)
SEEDS = (0, 1, 2)
BASELINE = "kd-cosine"
CONTROL = "maxsim"
RESULT = "result.json"
# Bible groups whose paired differences are written (besides every UDHR language "lang:<code>"
# and the pooled zero-shot groups "bantu" / "non-bantu")
DIFF_GROUPS = ("all", "no-near-dup")


@dataclass
class Budget:
    """One training budget shared by every arm and run of the experiment."""

    steps: int
    batch_size: int
    lrs: tuple[float, ...] = LR_GRID
    arms: tuple[str, ...] = tuple(ARMS)
    seeds: tuple[int, ...] = SEEDS
    train_max_length: int = 128
    eval_max_length: int = 256
    dev_pool: int = 500
    warmup: float = 0.1
    freeze_embeddings: bool = True


BUDGETS: dict[str, Budget] = {
    "cpu": Budget(steps=150, batch_size=16),
    "gpu": Budget(steps=300, batch_size=32),
    "tiny": Budget(steps=2, batch_size=4, lrs=(1e-3, 1e-2), arms=("ot-eps0.05", "kd-cosine"),
                   seeds=(0, 1), train_max_length=16, eval_max_length=16, dev_pool=8),
}


@dataclass(frozen=True)
class Run:
    """One training run of the plan."""

    cell: str
    arm: str
    lr: float
    seed: int
    phase: str  # "selection" or "final"

    def folder(self, out: Path) -> Path:
        """``<out>/<cell>/<arm>/lr<lr>-seed<seed>``."""
        return Path(out) / self.cell / self.arm / f"lr{self.lr:g}-seed{self.seed}"


def is_finished(folder: str | os.PathLike[str]) -> bool:
    """A run is finished when its exported model (with manifest) and its result file exist."""
    from .trainer import MANIFEST, MODEL_DIR

    f = Path(folder)
    return (f / MODEL_DIR / MANIFEST).is_file() and (f / RESULT).is_file()


def selection_runs(cell: str, budget: Budget) -> list[Run]:
    """Seed 0 of every arm at every learning rate of the grid."""
    return [Run(cell, arm, lr, budget.seeds[0], "selection") for arm in budget.arms
            for lr in budget.lrs]


def best_lr(out: Path, cell: str, arm: str, budget: Budget) -> float | None:
    """The learning rate with the best dev P@1 (ties: the smaller one), or ``None`` while a
    selection run of the arm is unfinished."""
    scores = []
    for lr in budget.lrs:
        f = Run(cell, arm, lr, budget.seeds[0], "selection").folder(out)
        if not is_finished(f):
            return None
        scores.append((-json.loads((f / RESULT).read_text())["dev"]["p@1"], lr))
    return min(scores)[1]


def final_runs(out: Path, cell: str, budget: Budget) -> list[Run]:
    """Seeds 1.. of every arm at its selected learning rate (arms not yet selected: none)."""
    runs = []
    for arm in budget.arms:
        lr = best_lr(out, cell, arm, budget)
        if lr is not None:
            runs += [Run(cell, arm, lr, s, "final") for s in budget.seeds[1:]]
    return runs


def plan_runs(out: Path, cell: str, budget: Budget) -> list[Run]:
    """Every run of the experiment as far as it can be planned now (final runs need the
    selection); :func:`run_experiment` re-plans after the selection."""
    return selection_runs(cell, budget) + final_runs(out, cell, budget)


class TeacherCache:
    """The frozen teacher's embeddings of a text list, computed once (memory + ``.npy``)."""

    def __init__(self, teacher: Any, folder: Path | None = None):
        self.teacher = teacher
        self.folder = folder
        self._mem: dict[str, np.ndarray] = {}

    def __call__(self, name: str, texts: Sequence[str]) -> np.ndarray:
        """[n, d] L2-normalised float64 embeddings of ``texts`` (cached under ``name``)."""
        from .evaluate import encode

        if name in self._mem and len(self._mem[name]) == len(texts):
            return self._mem[name]
        path = self.folder / f"{name.replace('/', '_').replace(':', '_')}.npy" \
            if self.folder else None
        if path is not None and path.is_file():
            emb = np.load(path)
        else:
            emb = encode(self.teacher, list(texts)).numpy().astype(np.float64)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                np.save(path, emb)
        if len(emb) != len(texts):
            raise ValueError(f"cached teacher embeddings of {name} have {len(emb)} rows, the set "
                             f"has {len(texts)}: delete {path}")
        self._mem[name] = emb
        return emb


def _per_query(query_emb: np.ndarray, doc_emb: np.ndarray, pool_size: int | None) -> dict:
    from . import floors

    def score(qs: slice, ds: slice) -> np.ndarray:
        return query_emb[qs] @ doc_emb[ds].T

    return floors.per_query_metrics(floors.pooled_ranks(score, len(query_emb), pool_size))


def _encode_queries(student: Any, texts: Sequence[str]) -> np.ndarray:
    """The student's [n, d] query embeddings, under bf16 autocast where training used it (a
    CUDA device, or a CPU with native bf16: 2.7x faster here, 6.8 -> 2.5 s for 600 verses at
    256 tokens); the teacher's document embeddings stay float32."""
    import torch

    from .evaluate import encode
    from .trainer import cpu_has_native_bf16

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.autocast(dev, dtype=torch.bfloat16,
                        enabled=dev == "cuda" or cpu_has_native_bf16()):
        return encode(student, texts).numpy().astype(np.float64)


def evaluate_run(student: Any, teacher_docs: TeacherCache, dev: Any, sets: Sequence[Any],
                 final: bool) -> dict:
    """``{"dev": {p@1, ...}, "sets": {name: {metric: list}}}``: dev metrics (always) and the
    per-query metrics of every evaluation set (final runs only)."""
    q = _encode_queries(student, dev.foreign)
    pq = _per_query(q, teacher_docs("dev", dev.english), None)
    out: dict[str, Any] = {"dev": {m: float(v.mean()) for m, v in pq.items()}, "sets": {}}
    if final:
        for es in sets:
            q = _encode_queries(student, es.foreign)
            pq = _per_query(q, teacher_docs(es.name, es.english), es.pool_size)
            out["sets"][es.name] = {m: v.tolist() for m, v in pq.items()}
    return out


@dataclass
class Setting:
    """What a cell trains and evaluates on (built by :func:`real_setting`, or by a test)."""

    cell: str
    make_student: Callable[[int], Any]  # max_length -> fresh trainable student
    teacher: Any
    train: Sequence[Any]
    dev: Any  # an EvalSet-like object with .foreign / .english (one pool)
    sets: Sequence[Any]  # protocol EvalSets
    meta: dict = field(default_factory=dict)


def _train_one(run: Run, setting: Setting, budget: Budget, out: Path, cache: TeacherCache,
               progress: bool) -> dict:
    import torch

    from .losses import OTOptions
    from .trainer import TrainOptions, cpu_has_native_bf16, distill

    spec = ARMS[run.arm]
    cuda = torch.cuda.is_available()
    cfg = TrainOptions(loss=spec["loss"], steps=budget.steps, batch_size=budget.batch_size,
                       lr=run.lr, warmup=budget.warmup, seed=run.seed, ckpt_every=0,
                       save_limit=1, bf16=cuda or cpu_has_native_bf16(), progress=progress,
                       freeze_embeddings=budget.freeze_embeddings)
    ot = OTOptions(eps=spec["eps"]) if "eps" in spec else None
    folder = run.folder(out)
    student = setting.make_student(budget.train_max_length)
    setting.teacher.max_seq_length = budget.train_max_length
    res = distill(student, setting.teacher, setting.train, cfg, ot, out_dir=folder,
                  resume="auto", use_cpu=not cuda, meta={"run": asdict(run)})
    student.max_seq_length = budget.eval_max_length
    setting.teacher.max_seq_length = budget.eval_max_length
    result = evaluate_run(student.eval(), cache, setting.dev, setting.sets,
                          final=run.phase == "final")
    losses = [r["loss"] for r in res.history if "loss" in r]
    result.update(run=asdict(run), loss_first=losses[0], loss_last=losses[-1],
                  budget=asdict(budget))
    tmp = folder / f".{RESULT}.tmp"
    tmp.write_text(json.dumps(result))
    os.replace(tmp, folder / RESULT)
    return result


def run_experiment(setting: Setting, budget: Budget, out: str | os.PathLike[str], *,
                   progress: bool = True, log: Callable[[str], None] = print) -> dict:
    """Run (or resume) the whole plan of one cell; returns ``{"trained", "skipped"}`` counts.

    Finished runs (:func:`is_finished`) are skipped. The seed-0 run at each learning rate is
    evaluated on the test sets too, so that the arm's selected seed-0 run needs no retraining.
    """
    from tqdm.auto import tqdm

    out = Path(out)
    cache = TeacherCache(setting.teacher, out / setting.cell / "teacher")
    n_total = len(budget.arms) * (len(budget.lrs) + len(budget.seeds) - 1)
    done = {"trained": 0, "skipped": 0}
    bar = tqdm(total=n_total * budget.steps, unit="step", disable=not progress,
               desc=f"experiment cell {setting.cell}", dynamic_ncols=True)

    def go(runs: list[Run]) -> None:
        for run in runs:
            f = run.folder(out)
            if is_finished(f):
                done["skipped"] += 1
                bar.total -= budget.steps  # skipped work does not count in the estimate
                bar.refresh()
                continue
            log(f"run {run.arm} lr={run.lr:g} seed={run.seed} ({run.phase})")
            _train_one(run, setting, budget, out, cache, progress=False)
            done["trained"] += 1
            bar.update(budget.steps)

    # Arm by arm (selection, then the selected run's test sets, then its other seeds), so that
    # an interrupted experiment leaves whole arms behind.
    for arm in budget.arms:
        go([r for r in selection_runs(setting.cell, budget) if r.arm == arm])
        lr = best_lr(out, setting.cell, arm, budget)
        if lr is not None:  # the selected seed-0 run: evaluate it on the test sets once
            _complete(Run(setting.cell, arm, lr, budget.seeds[0], "final").folder(out),
                      setting, budget, cache)
        go([r for r in final_runs(out, setting.cell, budget) if r.arm == arm])
    bar.close()
    return done


def _complete(folder: Path, setting: Setting, budget: Budget, cache: TeacherCache) -> None:
    """Add the test-set evaluation to a finished selection run (its exported model)."""
    from .models import load_sentence_model
    from .trainer import MODEL_DIR

    result = json.loads((folder / RESULT).read_text())
    if result.get("sets"):
        return
    student = load_sentence_model(folder / MODEL_DIR)
    student.max_seq_length = budget.eval_max_length
    setting.teacher.max_seq_length = budget.eval_max_length
    result["sets"] = evaluate_run(student.eval(), cache, setting.dev, setting.sets,
                                  final=True)["sets"]
    tmp = folder / f".{RESULT}.tmp"
    tmp.write_text(json.dumps(result))
    os.replace(tmp, folder / RESULT)


def collect(setting: Setting, budget: Budget, out: str | os.PathLike[str],
            n_resamples: int = 10_000) -> tuple[list[dict], list[dict]]:
    """Result rows and paired differences of every arm whose three seeds are finished."""
    from .protocol import TRAINING_LANGUAGE, UDHR_SET, language_group, system_rows
    from .results import make_difference

    out = Path(out)
    rows, per_arm = [], {}
    for arm in budget.arms:
        lr = best_lr(out, setting.cell, arm, budget)
        if lr is None:
            continue
        folders = [Run(setting.cell, arm, lr, s, "final").folder(out) for s in budget.seeds]
        if not all(is_finished(f) for f in folders):
            continue
        res = {s: json.loads((f / RESULT).read_text()) for s, f in zip(budget.seeds, folders,
                                                                         strict=True)}

        def per_query_fn(es: Any, seed: int, res=res) -> dict[str, np.ndarray]:
            return {m: np.asarray(v) for m, v in res[seed]["sets"][es.name].items()}

        if not all(res[s].get("sets") for s in budget.seeds):
            continue
        per_arm[arm] = per_query_fn
        arm_rows = system_rows(cell=setting.cell, arm=arm, kind="trained", sets=setting.sets,
                               per_query_fn=per_query_fn, seeds=list(budget.seeds),
                               n_resamples=n_resamples)
        rows += [{**r, "lr": lr} for r in arm_rows]
    diffs = []
    pairs = [(a, BASELINE) for a in per_arm if a != BASELINE and BASELINE in per_arm]
    pairs += [(a, CONTROL) for a in per_arm if ARMS[a]["loss"] == "ot" and CONTROL in per_arm]
    for arm, base in pairs:
        for es in setting.sets:
            for group, mask in es.groups.items():
                if not mask.any() or not (group in DIFF_GROUPS or group.startswith("lang:")):
                    continue
                a = {m: np.stack([per_arm[arm](es, s)[m][mask] for s in budget.seeds])
                     for m in ("p@1",)}
                b = {m: np.stack([per_arm[base](es, s)[m][mask] for s in budget.seeds])
                     for m in ("p@1",)}
                diffs.append(make_difference(
                    cell=setting.cell, arm=arm, baseline=base, eval_set=es.name.split(":")[0],
                    group=group, per_query=a, baseline_per_query=b, n_resamples=n_resamples))
        # the zero-shot groups: every language's queries of the group pooled (as system_rows)
        pooled: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
        for es in setting.sets:
            if es.lang and es.lang != TRAINING_LANGUAGE:
                pooled.setdefault(language_group(es.lang), []).append((
                    np.stack([per_arm[arm](es, s)["p@1"] for s in budget.seeds]),
                    np.stack([per_arm[base](es, s)["p@1"] for s in budget.seeds])))
        for group, parts in pooled.items():
            diffs.append(make_difference(
                cell=setting.cell, arm=arm, baseline=base, eval_set=UDHR_SET, group=group,
                per_query={"p@1": np.concatenate([p[0] for p in parts], axis=1)},
                baseline_per_query={"p@1": np.concatenate([p[1] for p in parts], axis=1)},
                n_resamples=n_resamples))
    return rows, diffs


def table_path(path: str | os.PathLike[str]) -> Path:
    """``docs/experiment.json`` -> ``docs/experiment_table.md`` (not ``experiment.md``: that
    is the protocol document)."""
    path = Path(path)
    return path.with_name(f"{path.stem}_table.md")


def write_outputs(rows: list[dict], diffs: list[dict], path: str | os.PathLike[str],
                  meta: dict) -> Path:
    """``docs/experiment.json`` (:func:`results.write_results`) and :func:`table_path` (the
    tables the README shows, :func:`results.render_markdown` / ``render_differences``)."""
    from .results import render_differences, render_markdown, write_results

    path = Path(path)
    write_results(path, rows, differences=diffs, meta=meta)
    groups = ("all", "no-near-dup", "near-dup", "bantu", "non-bantu", "lang:nya")
    md = render_markdown(rows, groups=groups)
    if diffs:
        md += "\n" + render_differences([d for d in diffs if not d["group"].startswith("lang:")])
    table_path(path).write_text(md)
    return path


def real_setting(cell: str, cache_dir: str | None, budget: Budget,
                 test_limit: int | None = None, udhr: bool = True) -> Setting:
    """Cell ``A`` (MiniLM teacher, e5-small student) or ``B`` (e5-small teacher and student)
    on the real corpora (built if missing)."""
    from .data import build_data, load_bible_split
    from .models import student_model, teacher_model
    from .protocol import EvalSet, bible_test_sets, udhr_sets

    if cell not in ("A", "B"):
        raise ValueError(f"cell must be 'A' or 'B', got {cell!r}")
    build_data(cache_dir, progress=True, udhr=udhr)
    train = load_bible_split("train", cache_dir)
    dev_pairs = load_bible_split("dev", cache_dir)
    step = max(1, len(dev_pairs) // budget.dev_pool)
    dev_pairs = dev_pairs[::step][:budget.dev_pool]
    dev = EvalSet("dev", [p.foreign for p in dev_pairs], [p.english for p in dev_pairs],
                  [p.id for p in dev_pairs], None)
    sets = bible_test_sets(cache_dir, limit=test_limit) + (udhr_sets(cache_dir) if udhr else [])
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if cell == "A":
        teacher = teacher_model(budget.train_max_length, device)
    else:
        teacher = student_model("e5-small", cache_dir, budget.train_max_length,
                                device).eval().requires_grad_(False)
        # In training the teacher reads the English column without a prompt (the trainer's
        # prompt goes to the foreign column only); evaluate its documents the same way.
        teacher.default_prompt_name = None
    return Setting(cell, lambda n: student_model("e5-small", cache_dir, n, device), teacher,
                   train, dev, sets)


def parse_args(argv=None) -> argparse.Namespace:
    """The command line."""
    ap = argparse.ArgumentParser(prog="python -m optical_kernels.distill.experiment",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--cell", choices=("A", "B"), default="A")
    ap.add_argument("--budget", choices=sorted(BUDGETS), default="cpu")
    ap.add_argument("--out", type=Path, default=Path("runs/experiment"))
    ap.add_argument("--results", type=Path, default=Path("docs/experiment.json"))
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--test-limit", type=int, default=None,
                    help="first N test verses only (smoke checks; not the protocol)")
    ap.add_argument("--no-udhr", action="store_true")
    ap.add_argument("--dry-run", action="store_true",
                    help="print the plan and the budget, train nothing")
    ap.add_argument("--collect-only", action="store_true",
                    help="train nothing: write --results from the arms whose runs are finished "
                    "(an experiment cut short, or one still running in another process)")
    ap.add_argument("--floors", type=Path, default=Path("docs/experiment_floors.json"),
                    help="floor rows (experiment_floors) put in the same table, if the file "
                    "exists")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    """Entry point."""
    args = parse_args(argv)
    budget = BUDGETS[args.budget]
    n_runs = len(budget.arms) * (len(budget.lrs) + len(budget.seeds) - 1)
    print(f"experiment cell {args.cell}, budget {args.budget}: {len(budget.arms)} arms × "
          f"({len(budget.lrs)} learning rates + {len(budget.seeds) - 1} more seeds) = {n_runs} "
          f"runs × {budget.steps} steps × {budget.batch_size} pairs, train length "
          f"{budget.train_max_length}, eval length {budget.eval_max_length}", flush=True)
    if args.dry_run:
        for run in plan_runs(args.out, args.cell, budget):
            state = "done" if is_finished(run.folder(args.out)) else "todo"
            print(f"  {state} {run.phase:9s} {run.arm:11s} lr={run.lr:g} seed={run.seed}")
        return 0
    try:
        setting = real_setting(args.cell, args.cache_dir, budget, args.test_limit,
                               udhr=not args.no_udhr)
        done = ({"trained": 0, "skipped": 0} if args.collect_only
                else run_experiment(setting, budget, args.out))
        rows, diffs = collect(setting, budget, args.out)
    except (ValueError, FileNotFoundError, ModuleNotFoundError) as e:
        print(f"experiment: error: {e}", file=sys.stderr)
        return 1
    if rows:
        arms_done = sorted({r["arm"] for r in rows})
        meta = {"cell": args.cell, "budget": asdict(budget), "budget_name": args.budget,
                "arms_finished": arms_done,
                "arms_missing": [a for a in budget.arms if a not in arms_done]}
        if args.floors.is_file():
            from .results import read_results

            rows = rows + [r for r in read_results(args.floors) if r["kind"] == "floor"]
            meta["floors_from"] = args.floors.name  # a file name, not this machine's path
        p = write_outputs(rows, diffs, args.results, meta)
        print(f"wrote {p} and {table_path(p)} ({len(rows)} rows)")
    print(f"runs trained {done['trained']}, skipped (finished) {done['skipped']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
