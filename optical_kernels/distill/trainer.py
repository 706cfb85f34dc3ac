"""Distillation training on ``SentenceTransformerTrainer`` (transformers ``Trainer``, accelerate).

The engine does the training: AdamW with warmup + linear decay, gradient accumulation, bf16
autocast, gradient clipping, tqdm progress, periodic dev evaluation (a sentence-transformers
evaluator), multi-process data parallelism (``torchrun`` / ``accelerate launch``: gloo on CPU,
nccl on GPU) and checkpoint/resume (``<out>/checkpoints/checkpoint-N``: safetensors weights,
optimizer, scheduler, RNG states, trainer state; resuming restores them and skips the batches
already seen, so the resumed loss curve is the uninterrupted one). The losses are
:mod:`optical_kernels.integrations.sentence_transformers` (``OPTICALLoss``, ``TeacherKDLoss``).

What this module adds, because the engine lacks it:

* **integrity** — a SHA-256 manifest (``sha256-manifest.json``) written atomically after each
  checkpoint is saved and after the model export, verified before a resume or a load: the
  engine loads a damaged ``optimizer.pt`` silently, or fails with pickle advice, and silently
  skips a missing ``rng_state.pth`` (which breaks exact resume);
* **orphan cleanup** — a checkpoint folder without a manifest was cut short (kill -9, disk
  full) and is deleted at the next start, as are ``tmp-checkpoint-*`` and export temporaries;
* **export** — the student is written to ``<out>/model`` (a sentence-transformers folder that
  also loads with ``AutoModel``) atomically (temporary folder + rename);
* **resume guard** — ``options.json`` records the run's options; resuming with options that
  change the trajectory (learning rate, loss, OT options, ...) is refused (the engine would
  silently mix two runs);
* ``history.json`` — the engine's log history (loss per step, dev metrics) in one file.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

MANIFEST = "sha256-manifest.json"
CHECKPOINTS = "checkpoints"
MODEL_DIR = "model"
HISTORY_NAME = "history.json"
OPTIONS_NAME = "options.json"
# Options that do not change the trajectory: they may differ on resume.
_FREE_ON_RESUME = frozenset({"eval_every", "eval_pool", "ckpt_every", "save_limit", "progress"})
LOSSES = ("ot", "kd", "kd-cosine", "kd-contrastive", "ot+kd", "maxsim")
# Files without which an engine checkpoint cannot resume exactly.
CHECKPOINT_FILES = ("model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json")


class CheckpointError(RuntimeError):
    """A checkpoint or model folder that is incomplete, corrupt or not ours."""


def _h(text: str, **kw: Any) -> Any:
    return field(metadata={"help": text}, **kw)


@dataclass
class TrainOptions:
    """Training options (the ``distill`` command's training arguments)."""

    loss: Literal["ot", "kd", "kd-cosine", "kd-contrastive", "ot+kd", "maxsim"] = _h(
        "ot: token-level OT (OPTICAL); kd: MSE of sentence embeddings (MSELoss, "
        "make_multilingual); kd-cosine: 1 - cos; kd-contrastive: in-batch InfoNCE "
        "(MultipleNegativesRankingLoss, student foreign vs teacher English); ot+kd: OT + "
        "kd_weight x MSE; maxsim: token-level soft max-similarity (BERTScore-style, no "
        "transport), the non-OT control", default="ot")
    kd_weight: float = _h("weight of the MSE term in ot+kd", default=1.0)
    steps: int = _h("optimizer steps", default=1000)
    batch_size: int = _h("global batch: sentence pairs per optimizer step, all processes "
                         "together (a multiple of processes x grad_accum)", default=32)
    grad_accum: int = _h("micro-batches per optimizer step and process", default=1)
    lr: float = _h("peak learning rate (AdamW)", default=5e-5)
    weight_decay: float = _h("AdamW weight decay", default=0.01)
    warmup: float = _h("linear warmup: a fraction of the steps if < 1, else a number of steps; "
                       "then linear decay to 0", default=0.1)
    max_grad_norm: float = _h("gradient-norm clipping (0 disables)", default=1.0)
    eval_every: int = _h("dev retrieval every N steps and at the end (0: never)", default=0)
    eval_pool: int = _h("dev retrieval pool size", default=1000)
    ckpt_every: int = _h("checkpoint every N steps (0: only at the end)", default=500)
    save_limit: int = _h("checkpoints kept (older ones are deleted)", default=2)
    seed: int = _h("seed of the data order, dropout and initialisation", default=0)
    bf16: bool | None = _h("bf16 autocast (None: on CUDA devices that support it; worth "
                           "--bf16 on CPUs with AVX512-BF16/AMX)", default=None)
    freeze_embeddings: bool = _h("do not train the student's input embeddings", default=False)
    progress: bool = _h("tqdm progress bar", default=True)

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        for name in ("steps", "batch_size", "grad_accum", "eval_pool", "save_limit"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        for name in ("eval_every", "ckpt_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {v!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        for name in ("weight_decay", "warmup", "max_grad_norm", "kd_weight"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    @property
    def warmup_steps(self) -> int:
        """Warmup length in steps."""
        return int(round(self.warmup * self.steps)) if self.warmup < 1 else int(self.warmup)

    def to_dict(self) -> dict:
        return asdict(self)


def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 natively (x86 AVX512-BF16 or AMX-BF16 on Linux)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return bool(set(line.split(":", 1)[1].split()) & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


# ------------------------------------------------------------------------------ integrity
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(folder: str | os.PathLike[str]) -> Path:
    """Write ``folder/sha256-manifest.json`` (SHA-256 of every file below it), atomically."""
    folder = Path(folder)
    files = {p.relative_to(folder).as_posix(): _sha256(p)
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST
             and not p.name.startswith(f".{MANIFEST}")}
    tmp = folder / f".{MANIFEST}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps({"format": 1, "sha256": files}, indent=1))
    os.replace(tmp, folder / MANIFEST)
    return folder / MANIFEST


def verify_manifest(folder: str | os.PathLike[str], required: Sequence[str] = (),
                    *, must_exist: bool = False) -> None:
    """Check every file of ``folder`` against its manifest before anything is loaded.

    Args:
        folder: a checkpoint or model folder.
        required: files that must be listed (and present) for the folder to be usable.
        must_exist: a folder without a manifest is an error (else it is accepted unchecked).

    Raises:
        CheckpointError: naming the missing or corrupt file and what to do.
    """
    folder = Path(folder)
    man = folder / MANIFEST
    if not man.is_file():
        if must_exist:
            raise CheckpointError(
                f"{folder} has no {MANIFEST}: it is incomplete (its save was interrupted) or "
                "was not written by `optical-kernels distill`; resume from another checkpoint "
                "or restart without --resume")
        return
    try:
        listed = json.loads(man.read_text())["sha256"]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{man} is corrupt ({e}); delete {folder} and resume from "
                              "another checkpoint") from None
    for name in required:
        if name not in listed:
            raise CheckpointError(f"{folder} lacks {name}: the checkpoint is incomplete; "
                                  "resume from another checkpoint or restart without --resume")
    for name, digest in listed.items():
        p = folder / name
        if not p.is_file():
            raise CheckpointError(f"{p} is missing (listed in {MANIFEST}): the folder is "
                                  "incomplete; resume from another checkpoint or retrain")
        if _sha256(p) != digest:
            raise CheckpointError(
                f"{p} is corrupt: its SHA-256 differs from the one recorded when it was "
                "written; delete the folder and resume from another checkpoint or retrain")


def checkpoints(out_dir: str | os.PathLike[str]) -> list[Path]:
    """The complete checkpoints of a run (with a manifest), oldest first."""
    root = Path(out_dir) / CHECKPOINTS
    found = [p for p in root.glob("checkpoint-*") if p.is_dir() and (p / MANIFEST).is_file()
             and p.name.split("-", 1)[1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-", 1)[1]))


def clean_orphans(out_dir: str | os.PathLike[str]) -> list[Path]:
    """Delete what an interrupted run left: checkpoints without a manifest, the engine's
    ``tmp-checkpoint-*`` folders and our export/manifest temporaries. Returns the paths."""
    out = Path(out_dir)
    gone: list[Path] = []
    root = out / CHECKPOINTS
    for p in [*root.glob("checkpoint-*"), *root.glob("tmp-checkpoint-*"),
              *out.glob(f".{MODEL_DIR}.*.tmp"), *out.glob(f"{MODEL_DIR}/.{MANIFEST}.*.tmp"),
              *out.glob(f".{OPTIONS_NAME}.*.tmp"), *out.glob(f".{HISTORY_NAME}.tmp")]:
        if p.is_dir() and p.name.startswith("checkpoint-") and (p / MANIFEST).is_file():
            for t in p.glob(f".{MANIFEST}.*.tmp"):
                t.unlink()
            continue
        shutil.rmtree(p) if p.is_dir() else p.unlink()
        gone.append(p)
    return gone


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (or its cause) reports a full disk (ENOSPC, or torch's zip writer)."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(exc)
        if "No space left" in text or ("enforce fail" in text and "inline_container" in text):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def export_model(model: Any, out_dir: str | os.PathLike[str]) -> Path:
    """Save ``model`` to ``out_dir/model`` (safetensors, tokenizer, pooling, manifest),
    written to a temporary folder and renamed into place."""
    out = Path(out_dir)
    final = out / MODEL_DIR
    tmp = out / f".{MODEL_DIR}.{os.getpid()}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(str(tmp))
    write_manifest(tmp)
    if final.exists():
        old = out / f".{MODEL_DIR}.{os.getpid()}.old.tmp"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    return final


# ------------------------------------------------------------------------------ engine glue
def make_loss(name: str, student: Any, teacher: Any, ot: Any = None,
              kd_weight: float = 1.0) -> Any:
    """The sentence-transformers loss module of ``name`` (one of :data:`LOSSES`)."""
    from optical_kernels.distill.losses import OTOptions
    from optical_kernels.integrations.sentence_transformers import (
        OPTICALLoss,
        SoftMaxSimLoss,
        TeacherKDLoss,
    )

    if name not in LOSSES:
        raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {name!r}")
    if name in ("ot", "ot+kd"):
        kw = (ot or OTOptions()).kwargs()
        return OPTICALLoss(student, teacher, kd_weight=kd_weight if name == "ot+kd" else 0.0,
                           **kw)
    if name == "maxsim":
        return SoftMaxSimLoss(student, teacher)
    kind = {"kd": "mse", "kd-cosine": "cosine", "kd-contrastive": "contrastive"}[name]
    return TeacherKDLoss(student, teacher, kind)


def _callbacks() -> list:
    from transformers import TrainerCallback

    class Manifest(TrainerCallback):
        """SHA-256 manifest of each checkpoint, written once the engine has saved it."""

        def on_save(self, args, state, control, **kw):
            if state.is_world_process_zero:
                write_manifest(Path(args.output_dir) / f"checkpoint-{state.global_step}")

    class FinalEval(TrainerCallback):
        """Evaluate at the last step too (the engine evaluates every eval_steps only)."""

        def on_step_end(self, args, state, control, **kw):
            if args.eval_strategy != "no" and state.global_step >= state.max_steps:
                control.should_evaluate = True

    return [Manifest(), FinalEval()]


def training_arguments(cfg: TrainOptions, out_dir: str | os.PathLike[str], *,
                       world_size: int = 1, use_cpu: bool = False,
                       prompts: dict[str, str] | None = None) -> Any:
    """The engine's ``SentenceTransformerTrainingArguments`` for ``cfg``."""
    import torch
    from sentence_transformers import SentenceTransformerTrainingArguments

    per_device, rest = divmod(cfg.batch_size, world_size * cfg.grad_accum)
    if rest or per_device < 1:
        raise ValueError(
            f"batch_size {cfg.batch_size} must be a multiple of processes x grad_accum = "
            f"{world_size} x {cfg.grad_accum}: change --batch-size or --grad-accum")
    bf16 = cfg.bf16
    if bf16 is None:
        bf16 = not use_cpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    ckpt = cfg.ckpt_every or cfg.steps
    return SentenceTransformerTrainingArguments(
        output_dir=str(Path(out_dir) / CHECKPOINTS),
        max_steps=cfg.steps,
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr,
        weight_decay=cfg.weight_decay,
        lr_scheduler_type="linear",
        warmup_steps=cfg.warmup_steps,
        max_grad_norm=cfg.max_grad_norm if cfg.max_grad_norm > 0 else 1e30,
        bf16=bool(bf16),
        use_cpu=use_cpu,
        seed=cfg.seed,
        data_seed=cfg.seed,
        logging_steps=1,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=ckpt,
        save_total_limit=cfg.save_limit,
        eval_strategy="steps" if cfg.eval_every else "no",
        eval_steps=cfg.eval_every or None,
        eval_on_start=bool(cfg.eval_every),  # the untrained student's dev retrieval (step 0)
        disable_tqdm=not cfg.progress,
        report_to="none",
        dataloader_drop_last=False,
        prompts=prompts or None,
        ddp_find_unused_parameters=False,
    )


@dataclass
class DistillResult:
    """What :func:`distill` returns: the log ``history`` (one record per step), the exported
    ``model_dir`` (``None`` without ``out_dir`` export or on ranks > 0) and the trainer."""

    history: list[dict]
    model_dir: Path | None
    trainer: Any


def _check_options(path: Path, options: dict, ckpt: str | None) -> None:
    """Refuse to resume ``ckpt`` with options that change the trajectory."""
    if ckpt is None or not path.is_file():
        return
    saved = json.loads(path.read_text())
    mine = json.loads(json.dumps(options, default=list))
    diff = sorted(k for k in mine if k not in _FREE_ON_RESUME and saved.get(k) != mine[k])
    if diff:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {mine[k]!r}" for k in diff)
        raise CheckpointError(
            f"cannot resume from {ckpt}: options differ from the run that wrote it ({details}); "
            "use the same options, or a new --out directory (or --resume none) to start afresh")


def history_records(log_history: list[dict]) -> list[dict]:
    """One record per optimizer step, ``{"step", "loss", "lr", "dev": {...}}``, from the
    engine's ``state.log_history`` (plus ``{"step": 0, "dev": ...}``, the dev retrieval before
    training, when the run evaluates)."""
    by_step: dict[int, dict] = {}
    for rec in log_history:
        step = int(rec.get("step", 0))
        if "loss" in rec:
            by_step.setdefault(step, {"step": step}).update(
                loss=float(rec["loss"]), lr=float(rec.get("learning_rate", 0.0)))
        dev = {k[len("eval_dev_"):]: v for k, v in rec.items() if k.startswith("eval_dev_")}
        if dev:
            by_step.setdefault(step, {"step": step})["dev"] = dev
    return [by_step[s] for s in sorted(by_step) if "loss" in by_step[s] or s == 0]


def distill(
    student: Any,
    teacher: Any,
    train_pairs: Sequence,
    cfg: TrainOptions,
    ot: Any = None,
    *,
    out_dir: str | os.PathLike[str],
    dev_pairs: Sequence | None = None,
    resume: str | os.PathLike[str] | None = "auto",
    use_cpu: bool = False,
    meta: dict | None = None,
) -> DistillResult:
    """Distil ``teacher`` into ``student`` on ``(foreign, english)`` pairs with the engine.

    Args:
        student: trainable ``SentenceTransformer`` (its default prompt, if any, is applied to
            the foreign column).
        teacher: frozen ``SentenceTransformer`` (English side).
        train_pairs: ``(foreign, english)`` pairs (``BitextPair`` works).
        cfg: :class:`TrainOptions`.
        ot: :class:`~optical_kernels.distill.losses.OTOptions` of the OT losses.
        out_dir: run folder: ``checkpoints/``, ``model/``, ``history.json``.
        dev_pairs: pairs of the periodic dev retrieval (with ``cfg.eval_every``).
        resume: ``"auto"`` (the newest complete checkpoint of ``out_dir``, if any), a
            checkpoint folder, or ``None``.
        use_cpu: train on CPU even when CUDA is visible.
        meta: JSON-able facts written into ``history.json``.

    Raises:
        CheckpointError: the checkpoint to resume from is incomplete or corrupt.
        ValueError: empty data or inconsistent options.
    """
    import datasets
    from sentence_transformers import SentenceTransformerTrainer

    from optical_kernels.distill.evaluate import DevRetrievalEvaluator

    if len(train_pairs) == 0:
        raise ValueError("train_pairs is empty: give at least one (foreign, english) pair")
    out = Path(out_dir)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        for p in clean_orphans(out):
            print(f"removed incomplete {p} (left by an interrupted run)", flush=True)
    ckpt: str | None = None
    if resume == "auto":
        done = checkpoints(out)
        ckpt = str(done[-1]) if done else None
    elif resume is not None:
        ckpt = str(resume)
    if ckpt is not None:
        verify_manifest(ckpt, CHECKPOINT_FILES, must_exist=True)
        if not any(Path(ckpt).glob("rng_state*.pth")):
            raise CheckpointError(f"{ckpt} lacks rng_state.pth: the checkpoint is incomplete; "
                                  "resume from another checkpoint or restart without --resume")

    options = {**cfg.to_dict(), "ot": asdict(ot) if ot is not None else None,
               "world_size": world}
    _check_options(out / OPTIONS_NAME, options, ckpt)
    if rank == 0:  # atomically: other ranks may be reading it
        tmp = out / f".{OPTIONS_NAME}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(options, indent=1, default=list))
        os.replace(tmp, out / OPTIONS_NAME)

    if cfg.freeze_embeddings:
        student[0].auto_model.get_input_embeddings().requires_grad_(False)
    prompt = student.prompts.get(student.default_prompt_name) if student.default_prompt_name \
        else None
    args = training_arguments(cfg, out, world_size=world, use_cpu=use_cpu,
                              prompts={"foreign": prompt} if prompt else None)
    data = datasets.Dataset.from_dict({"foreign": [p[0] for p in train_pairs],
                                       "english": [p[1] for p in train_pairs]})
    evaluator = None
    if cfg.eval_every and dev_pairs:
        evaluator = DevRetrievalEvaluator(teacher, [p[0] for p in dev_pairs],
                                          [p[1] for p in dev_pairs], pool_size=cfg.eval_pool)
    loss = make_loss(cfg.loss, student, teacher, ot, cfg.kd_weight)
    trainer = SentenceTransformerTrainer(model=student, args=args, train_dataset=data,
                                         loss=loss, evaluator=evaluator, callbacks=_callbacks())
    trainer.train(resume_from_checkpoint=ckpt)
    history = history_records(trainer.state.log_history)
    model_dir = None
    if trainer.is_world_process_zero():
        model_dir = export_model(student, out)
        tmp = out / f".{HISTORY_NAME}.tmp"
        tmp.write_text(json.dumps({"config": cfg.to_dict(), "meta": meta or {},
                                   "ot": asdict(ot) if ot is not None else None,
                                   "history": history}, indent=1, default=str))
        os.replace(tmp, out / HISTORY_NAME)
    return DistillResult(history, model_dir, trainer)
