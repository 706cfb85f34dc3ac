"""``make demo``: OT vs KD distillation on English–Chichewa, end to end, on a CPU.

``python -m optical_kernels.distill.demo [--steps N] [--out DIR] [--losses ot kd]``

1. builds the corpora if the cache lacks them (Bible nya–eng by book, UDHR zero-shot sets);
2. trains one student per loss (default: the token-level OT loss of OPTICAL and the KD
   baseline, MSE as make_multilingual) from the same initialisation, for the same budget
   (steps, batch, data order), with ``SentenceTransformerTrainer`` (via
   :func:`optical_kernels.distill.trainer.distill`), evaluating dev retrieval (200 dev verses)
   four times along the way;
3. evaluates them and the untrained student (and the teacher reading the foreign text) on
   a 1,000-verse Chichewa test pool and on every UDHR zero-shot language;
4. prints one table, writes ``alignment.png`` (the OT student's transport plan on a test
   verse, by word), ``loss_curves.png`` (training loss and dev retrieval) and
   ``results.json`` into ``--out``; each student is in ``--out/run-<loss>/model``.

Budget: a fixed :data:`DEMO_STEPS` (200) optimizer steps per student, batches of 16 pairs
truncated to 64 tokens, learning rate 2e-4 — 3,200 pairs per student, the same on every
machine. Sized for 10 minutes on two CPU cores: the previous trainer ran 600 such steps per
student, evaluation included, in 7 minutes on a quiet 2-core development machine, and the
engine costs no more per step (20-step A/B on the same machine); a run of this code at 200
steps on a quiet machine has not been timed yet. The numbers show the trend after a few
thousand pairs, not converged students.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

DEMO_STEPS = 200
DEV_VERSES = 200


def _log(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def _int_at_least(lo: int):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            v = lo - 1
        if v < lo:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {text!r}")
        return v

    return parse


def parse_args(argv=None) -> argparse.Namespace:
    from optical_kernels.distill.cli import STUDENT_CHOICES
    from optical_kernels.distill.trainer import LOSSES

    ap = argparse.ArgumentParser(prog="python -m optical_kernels.distill.demo",
                                 description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("demo_output"), help="output folder")
    ap.add_argument("--cache-dir", type=Path, default=None, help="corpus/model cache")
    ap.add_argument("--student", choices=STUDENT_CHOICES, default="teacher-copy")
    ap.add_argument("--losses", nargs="+", choices=LOSSES, default=["ot", "kd"],
                    help="one student per loss")
    ap.add_argument("--steps", type=_int_at_least(1), default=DEMO_STEPS,
                    help="optimizer steps per student")
    ap.add_argument("--batch-size", type=_int_at_least(1), default=16)
    ap.add_argument("--max-length", type=_int_at_least(2), default=64)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--eps", type=float, default=0.05, help="OT ε")
    ap.add_argument("--pool-size", type=_int_at_least(1), default=1000,
                    help="Chichewa test pool (verses)")
    ap.add_argument("--no-udhr", action="store_true", help="skip the zero-shot languages")
    ap.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                    help="bf16 autocast (None: on CUDA and on CPUs with native bf16)")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def _short_pair(pairs, max_words: int = 14):
    """A short test pair (a readable heatmap)."""
    for p in pairs:
        if len(p.english.split()) <= max_words and len(p.foreign.split()) <= max_words:
            return p
    return pairs[0]


NAMES = {"ot": "OT student (OPTICAL)", "kd": "KD student (MSE)",
         "kd-cosine": "KD student (cosine)", "kd-contrastive": "KD student (InfoNCE)",
         "ot+kd": "OT+KD student"}


def run(args: argparse.Namespace) -> dict:
    """The whole demo; returns ``{"results", "budget", "seconds"}``."""
    import torch

    from optical_kernels.distill.align import draw_alignment, draw_loss_curves, transport_plan
    from optical_kernels.distill.cli import TEST_SET, eval_sets
    from optical_kernels.distill.data import build_data, load_bible_split
    from optical_kernels.distill.evaluate import evaluate_suite, format_table
    from optical_kernels.distill.losses import OTOptions
    from optical_kernels.distill.models import student_model, teacher_model
    from optical_kernels.distill.trainer import TrainOptions, cpu_has_native_bf16, distill

    t_start = time.perf_counter()
    warnings.filterwarnings("ignore", message="backend='auto'", category=RuntimeWarning)
    args.out.mkdir(parents=True, exist_ok=True)
    cache = str(args.cache_dir) if args.cache_dir else None

    _log("data: building the corpora if needed")
    build_data(cache, progress=True, udhr=not args.no_udhr)
    train = load_bible_split("train", cache)
    dev = load_bible_split("dev", cache, limit=DEV_VERSES)
    sets = eval_sets(cache, test_limit=args.pool_size, udhr=not args.no_udhr)
    _log(f"data: {len(train)} training pairs; test sets: {', '.join(sets)}")

    cuda = torch.cuda.is_available()
    bf16 = args.bf16 if args.bf16 is not None else (cuda or cpu_has_native_bf16())
    dev_name = "cuda" if cuda else "cpu"
    _log(f"bf16 autocast: {'on' if bf16 else 'off'}; {torch.get_num_threads()} threads")
    ot = OTOptions(eps=args.eps)
    teacher = teacher_model(args.max_length, dev_name)

    def new_student():
        return student_model(args.student, cache, args.max_length, dev_name)

    students, histories = {}, {}
    for loss in args.losses:
        cfg = TrainOptions(loss=loss, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                           warmup=0.1, seed=args.seed, bf16=bf16, ckpt_every=0, save_limit=1,
                           eval_every=max(1, args.steps // 4), eval_pool=DEV_VERSES)
        _log(f"train {loss} student: {args.steps} steps × {args.batch_size} pairs, "
             f"max {args.max_length} tokens")
        t0 = time.perf_counter()
        student = new_student()
        res = distill(student, teacher, train, cfg, ot, out_dir=args.out / f"run-{loss}",
                      dev_pairs=dev, resume=None, use_cpu=not cuda)
        h = [r for r in res.history if "loss" in r]
        _log(f"train {loss}: {time.perf_counter() - t0:.0f} s, loss {h[0]['loss']:.4f} -> "
             f"{h[-1]['loss']:.4f}; model {res.model_dir}")
        students[loss], histories[NAMES[loss]] = student.eval(), res.history

    systems = {}
    untrained = new_student().eval()
    if args.student == "teacher-copy":
        systems["untrained student (= teacher)"] = untrained
    else:
        systems["teacher on foreign text"] = teacher
        systems["untrained student"] = untrained
    for loss, student in students.items():
        systems[NAMES[loss]] = student
    _log("evaluating retrieval (foreign queries → English teacher embeddings)")
    t0 = time.perf_counter()
    results = evaluate_suite(systems, teacher, sets, pool_size=args.pool_size)
    _log(f"evaluation: {time.perf_counter() - t0:.0f} s")

    budget = f"{args.steps} steps × {args.batch_size} pairs, max {args.max_length} tokens"
    paths = {}
    if "ot" in students:
        test = load_bible_split("test", cache, limit=args.pool_size)
        pair = _short_pair(test)
        plan, src, tgt = transport_plan(students["ot"], teacher, pair.foreign, pair.english, ot)
        paths["alignment"] = draw_alignment(
            plan, src, tgt, args.out / "alignment.png",
            title=f"OT student ({args.student}, {budget}), test verse {pair.id}, ε={args.eps}")
    paths["curves"] = draw_loss_curves(histories, args.out / "loss_curves.png",
                                       title=f"{args.student}: {budget}")
    seconds = time.perf_counter() - t_start
    out = {"results": results, "seconds": seconds,
           "budget": {"steps": args.steps, "batch_size": args.batch_size,
                      "max_length": args.max_length, "student": args.student,
                      "losses": args.losses, "bf16": bool(bf16),
                      "threads": torch.get_num_threads()}}
    (args.out / "results.json").write_text(json.dumps(out, indent=2))

    print()
    print(f"Cross-lingual retrieval, foreign query → English (teacher) documents "
          f"[{TEST_SET}: pool of {args.pool_size} verses; UDHR: all paragraphs of a language]")
    print(format_table(results))
    print()
    for name, p in paths.items():
        print(f"{name + ':':<18} {p.resolve()}")
    print(f"{'results (JSON):':<18} {(args.out / 'results.json').resolve()}")
    print(f"{'total time:':<18} {seconds:.0f} s")
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except (ValueError, FileNotFoundError, ModuleNotFoundError) as e:
        print(f"demo: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
