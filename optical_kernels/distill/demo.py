"""``make demo``: OT vs KD distillation on English–Chichewa, end to end, on a CPU.

``python -m optical_kernels.distill.demo [--steps N] [--out DIR]``

1. builds the corpora if the cache lacks them (Bible nya–eng by book, UDHR zero-shot sets);
2. trains two students from the same initialisation, for the same budget (steps, batch, data
   order): one with the token-level OT loss (OPTICAL), one with the KD baseline;
3. evaluates them and the untrained student (and the teacher reading the foreign text) on
   a 1,000-verse Chichewa test pool and on every UDHR zero-shot language;
4. prints one table, writes ``alignment.png`` (the OT student's transport plan on a test
   verse), ``loss_curves.png`` and ``results.json`` into ``--out``.

Budget: batches of 16 pairs truncated to 64 tokens, learning rate 2e-4. ``--steps auto``
(default) times three OT steps on this machine and picks the number of steps (20–600, the same
for both students) so that the whole demo takes about ``--minutes`` (10) minutes; two free
CPU cores with native bf16 run ~3 steps/s, which gives the 600-step cap (~7 minutes in all).
``--steps N`` fixes it instead. The numbers show the trend after a few thousand pairs, not
converged students.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path


def _log(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    from optical_kernels.distill.cli import STUDENT_CHOICES, _int_at_least, _positive_float

    ap = argparse.ArgumentParser(prog="python -m optical_kernels.distill.demo",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("demo_output"), help="output folder")
    ap.add_argument("--cache-dir", type=Path, default=None, help="corpus/model cache")
    ap.add_argument("--student", choices=STUDENT_CHOICES, default="teacher-copy")
    ap.add_argument("--steps", type=_steps, default="auto",
                    help="optimizer steps per student, or auto (fit --minutes; default)")
    ap.add_argument("--minutes", type=_positive_float, default=10.0,
                    help="wall-clock target of --steps auto (default 10)")
    ap.add_argument("--batch-size", type=_int_at_least(1), default=16)
    ap.add_argument("--max-length", type=_int_at_least(2), default=64)
    ap.add_argument("--lr", type=_positive_float, default=2e-4)
    ap.add_argument("--eps", type=_positive_float, default=0.05, help="OT ε")
    ap.add_argument("--pool-size", type=_int_at_least(1), default=1000,
                    help="Chichewa test pool (verses)")
    ap.add_argument("--no-udhr", action="store_true", help="skip the zero-shot languages")
    ap.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                    help="bf16 autocast (default: on CUDA and on CPUs with native bf16)")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def _steps(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected auto or an integer >= 1, got {text!r}")
    return v


def choose_steps(step_s: float, elapsed_s: float, n_eval: int, batch_size: int,
                 minutes: float) -> int:
    """Steps per student so that the demo ends after about ``minutes``.

    A training pair costs about four encoder forward passes (student forward and backward ≈
    3, teacher 1), and so does an evaluation pair (three query encoders and the teacher), so
    the evaluation takes about ``n_eval / batch_size`` step times. Clamped to [20, 600].
    """
    eval_s = n_eval / batch_size * step_s
    left = minutes * 60 - elapsed_s - eval_s - 30  # 30 s: plots, model reloads
    return int(min(600, max(20, left / (2 * step_s))))


def _short_pair(pairs, max_words: int = 14):
    """A short test pair (a readable heatmap)."""
    for p in pairs:
        if len(p.english.split()) <= max_words and len(p.foreign.split()) <= max_words:
            return p
    return pairs[0]


def run(args: argparse.Namespace) -> dict:
    """The whole demo; returns ``{"results", "paths", "seconds"}``."""
    import torch

    from optical_kernels.distill.align import draw_alignment, draw_loss_curves, transport_plan
    from optical_kernels.distill.cli import TEST_SET, eval_sets, student_encoder, teacher_encoder
    from optical_kernels.distill.data import build_data, load_bible_split
    from optical_kernels.distill.evaluate import evaluate_suite, format_table
    from optical_kernels.distill.losses import OTOptions
    from optical_kernels.distill.trainer import TrainConfig, Trainer, cpu_has_native_bf16

    t_start = time.perf_counter()
    warnings.filterwarnings("ignore", message="backend='auto'", category=RuntimeWarning)
    args.out.mkdir(parents=True, exist_ok=True)

    _log("data: building the corpora if needed")
    build_data(args.cache_dir, progress=True, udhr=not args.no_udhr)
    train = load_bible_split("train", args.cache_dir)
    sets = eval_sets(args.cache_dir, test_limit=args.pool_size, udhr=not args.no_udhr)
    _log(f"data: {len(train)} training pairs; test sets: {', '.join(sets)}")

    bf16 = args.bf16
    if bf16 is None:
        bf16 = torch.cuda.is_available() or cpu_has_native_bf16()
    _log(f"bf16 autocast: {'on' if bf16 else 'off'}; {torch.get_num_threads()} threads")
    ot = OTOptions(eps=args.eps)
    teacher = teacher_encoder(args.max_length)

    def new_student():
        return student_encoder(args.student, args.cache_dir, args.max_length, teacher.dim)

    def config(loss: str, steps: int) -> TrainConfig:
        return TrainConfig(loss=loss, ot=ot, steps=steps, batch_size=args.batch_size,
                           lr=args.lr, warmup=0.1, seed=args.seed, bf16=bf16)

    steps = args.steps
    if steps == "auto":
        probe = Trainer(new_student(), teacher, train, config("ot", 3))
        probe.train_step()  # warm-up
        t0 = time.perf_counter()
        probe.train_step()
        probe.train_step()
        step_s = (time.perf_counter() - t0) / 2
        n_eval = sum(len(f) for f, _ in sets.values())
        steps = choose_steps(step_s, time.perf_counter() - t_start, n_eval, args.batch_size,
                             args.minutes)
        del probe
        _log(f"budget: {step_s:.2f} s per step here -> {steps} steps per student "
             f"(~{args.minutes:g} min in all; --steps N to fix it)")

    students = {}
    curves = {}
    for loss in ("ot", "kd"):
        student = new_student()
        cfg = config(loss, steps)
        _log(f"train {loss.upper()} student: {steps} steps × {args.batch_size} pairs, "
             f"max {args.max_length} tokens")
        t0 = time.perf_counter()
        hist = Trainer(student, teacher, train, cfg).fit()
        _log(f"train {loss.upper()}: {time.perf_counter() - t0:.0f} s, loss "
             f"{hist[0]['loss']:.4f} -> {hist[-1]['loss']:.4f}")
        students[loss] = student
        curves[f"{loss.upper()} loss ({'<P,C>' if loss == 'ot' else 'MSE'})"] = [
            r["loss"] for r in hist
        ]

    untrained = new_student()
    systems = {}
    if args.student == "teacher-copy":
        systems["untrained student (= teacher)"] = untrained
    else:
        systems["teacher on foreign text"] = teacher
        systems["untrained student"] = untrained
    systems["KD student"] = students["kd"]
    systems["OT student (OPTICAL)"] = students["ot"]
    _log("evaluating retrieval (foreign queries → English teacher embeddings)")
    t0 = time.perf_counter()
    if torch.cuda.is_available():
        for enc in (teacher, *systems.values()):
            enc.cuda()
    results = evaluate_suite(systems, teacher, sets, pool_size=args.pool_size, bf16=bf16)
    _log(f"evaluation: {time.perf_counter() - t0:.0f} s")

    test = load_bible_split("test", args.cache_dir, limit=args.pool_size)
    pair = _short_pair(test)
    plan, src, tgt = transport_plan(students["ot"].cpu(), teacher.cpu(), pair.foreign,
                                    pair.english, ot)
    align_png = draw_alignment(plan, src, tgt, args.out / "alignment.png",
                               title=f"OT student, test verse {pair.id}, ε={args.eps}")
    curve_png = draw_loss_curves(curves, args.out / "loss_curves.png",
                                 title=f"{steps} steps × {args.batch_size} pairs")
    seconds = time.perf_counter() - t_start
    out = {"results": results, "seconds": seconds,
           "budget": {"steps": steps, "batch_size": args.batch_size,
                      "max_length": args.max_length, "student": args.student,
                      "bf16": bf16, "threads": torch.get_num_threads()}}
    (args.out / "results.json").write_text(json.dumps(out, indent=2))

    print()
    print(f"Cross-lingual retrieval, foreign query → English (teacher) documents "
          f"[{TEST_SET}: pool of {args.pool_size} verses; UDHR: all paragraphs of a language]")
    print(format_table(results))
    print()
    print(f"alignment heatmap: {align_png.resolve()}")
    print(f"loss curves:       {curve_png.resolve()}")
    print(f"results (JSON):    {(args.out / 'results.json').resolve()}")
    print(f"total time:        {seconds:.0f} s")
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
