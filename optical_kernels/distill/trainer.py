"""Distillation trainer: AdamW, warmup + linear decay, accumulation, DDP, exact resume.

One optimizer step consumes one *global batch* of ``batch_size`` sentence pairs, drawn from a
deterministic stream (the training set reshuffled every epoch with a seed derived from
``(seed, epoch)``), so the batch of step ``t`` depends only on ``t``. In data-parallel runs
(``torchrun --nproc_per_node P``) rank ``r`` takes the r-th contiguous ``batch_size / P`` slice
of every global batch and cuts it into ``grad_accum`` micro-batches. Each micro-batch loss is
a batch mean divided by ``grad_accum``; DDP averages the gradients over ranks: the update is
the gradient of the global-batch mean, whatever the process count and accumulation.

The teacher is frozen and runs under ``torch.no_grad``; on CUDA (and, opt-in, on CPUs with
native bf16) both encoders run under bf16 autocast (the OT loss gets float32 inputs).
Checkpoints (``<out>/checkpoint.pt``) hold the student weights, the optimizer, scheduler and
every rank's RNG state, the step and the history; they are written atomically (temporary file
+ rename), so an interrupted write never leaves a truncated checkpoint behind. Resuming
continues bit-for-bit where the run stopped (same config and process count).
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from optical_kernels.distill.evaluate import Encoder, encode, evaluate_retrieval
from optical_kernels.distill.losses import LOSSES, DistillLoss, OTOptions

CHECKPOINT_FORMAT = 1
CHECKPOINT_NAME = "checkpoint.pt"
HISTORY_NAME = "history.json"

# Config fields that do not change the trajectory: they may differ on resume.
_FREE_ON_RESUME = frozenset({"eval_every", "eval_pool", "ckpt_every", "progress"})


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not match the run resuming from it."""


@dataclass
class TrainConfig:
    """Training options.

    Attributes:
        loss: ``"ot"``, ``"kd"`` or ``"ot+kd"``.
        kd_weight: weight of the KD term in ``ot+kd``.
        ot: options of the OT loss (:class:`OTOptions`).
        steps: number of optimizer steps.
        batch_size: *global* batch (pairs per optimizer step, all processes together); must
            be a multiple of ``world_size × grad_accum``.
        grad_accum: micro-batches per optimizer step and process.
        lr: peak learning rate of AdamW.
        weight_decay: AdamW weight decay (not applied to biases and norms, ``ndim < 2``).
        warmup: warmup length, a fraction of ``steps`` when < 1, else a number of steps;
            the learning rate then decays linearly to 0 at ``steps``.
        max_grad_norm: gradient-norm clipping threshold (0 disables).
        eval_every: evaluate retrieval on the dev set every this many steps and at the end
            (0: never).
        eval_pool: dev retrieval pool size.
        ckpt_every: write a checkpoint every this many steps (0: only at the end).
        seed: seed of the data order, of the initialisation and of dropout.
        bf16: bf16 autocast of both encoders (the loss stays float32); ``None`` = on CUDA
            devices that support it. On CPUs with native bf16 (AVX512-BF16 or AMX,
            :func:`cpu_has_native_bf16`) ``True`` roughly halves the step time.
        freeze_embeddings: do not train the student's input embeddings (for the 250k-token
            multilingual vocabulary this saves most of the optimizer's time and memory).
        progress: show a tqdm progress bar (rank 0).
    """

    loss: str = "ot"
    kd_weight: float = 1.0
    ot: OTOptions = field(default_factory=OTOptions)
    steps: int = 1000
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup: float = 0.1
    max_grad_norm: float = 1.0
    eval_every: int = 0
    eval_pool: int = 1000
    ckpt_every: int = 0
    seed: int = 0
    bf16: bool | None = None
    freeze_embeddings: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if isinstance(self.ot, dict):
            self.ot = OTOptions(**self.ot)
        for name in ("steps", "batch_size", "grad_accum"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        for name in ("eval_every", "eval_pool", "ckpt_every"):
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
        return int(round(self.warmup * self.steps)) if self.warmup < 1 else int(self.warmup)

    def to_dict(self) -> dict:
        return asdict(self)


def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 natively (x86 AVX512-BF16 or AMX-BF16 on Linux)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Learning-rate multiplier after ``step`` updates: linear warmup then linear decay to 0."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    return max(0.0, (total - step) / max(1, total - warmup))


def init_distributed() -> tuple[int, int, int]:
    """Join the process group described by torchrun's environment, if any.

    Returns ``(rank, world_size, local_rank)``; ``(0, 1, 0)`` without torchrun. Uses nccl when
    CUDA is available, gloo otherwise.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and not dist.is_initialized():
        return 0, 1, 0
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))


def _rng_state(device: torch.device) -> dict:
    st = np.random.get_state()
    out = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [st[0], torch.from_numpy(st[1].astype(np.int64)), *st[2:]],
    }
    if device.type == "cuda":
        out["cuda"] = torch.cuda.get_rng_state(device)
    return out


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_tuplify(state["python"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, list | tuple) else x


def save_checkpoint(path: str | os.PathLike[str], state: dict) -> Path:
    """``torch.save(state)`` to a temporary file in the same folder, fsync, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def load_checkpoint(path: str | os.PathLike[str]) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint` (tensors on CPU).

    Raises:
        CheckpointError: the file is missing, truncated, corrupt or not a checkpoint of this
            trainer; the message says what to do.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {path} does not exist: pass the checkpoint.pt written by "
            "`optical-kernels distill --out DIR` (DIR/checkpoint.pt)"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # zipfile/pickle/EOF/RuntimeError: all mean "unreadable"
        raise CheckpointError(
            f"checkpoint {path} is corrupt or truncated ({type(e).__name__}: {e}); delete it "
            "and restart training without --resume, or resume from another checkpoint"
        ) from e
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path} is not an optical_kernels distillation checkpoint (format "
            f"{CHECKPOINT_FORMAT}); pass a checkpoint.pt written by `optical-kernels distill`"
        )
    return state


def load_student_weights(student: Encoder, path: str | os.PathLike[str]) -> dict:
    """Load the student weights of a checkpoint into ``student``; return the checkpoint."""
    state = load_checkpoint(path)
    try:
        student.load_state_dict(state["student"])
    except RuntimeError as e:
        raise CheckpointError(
            f"the weights in {path} do not fit this student ({e}); pass the same --student "
            "(and teacher) the checkpoint was trained with"
        ) from e
    return state


class Trainer:
    """Distil ``teacher`` into ``student`` on aligned ``(foreign, english)`` pairs.

    Args:
        student: the trainable :class:`Encoder` (foreign side).
        teacher: the frozen :class:`Encoder` (English side).
        train_pairs: sequence of ``(foreign, english)`` pairs (``BitextPair`` works).
        config: :class:`TrainConfig`.
        out_dir: where checkpoints and ``history.json`` go (``None``: nothing is written).
        dev_pairs: pairs for the periodic dev retrieval evaluation.
        device: torch device; default ``cuda:LOCAL_RANK`` when CUDA is available, else CPU.
        meta: JSON-able facts stored in the checkpoint (e.g. the student's name).

    Under ``torchrun`` the trainer joins the process group (gloo on CPU, nccl on GPU) and
    wraps the student in ``DistributedDataParallel``. It seeds torch's global RNG with
    ``config.seed + rank`` (dropout differs across ranks, as it should).
    """

    def __init__(
        self,
        student: Encoder,
        teacher: Encoder,
        train_pairs: Sequence,
        config: TrainConfig,
        *,
        out_dir: str | os.PathLike[str] | None = None,
        dev_pairs: Sequence | None = None,
        device: str | torch.device | None = None,
        meta: dict | None = None,
    ):
        if len(train_pairs) == 0:
            raise ValueError("train_pairs is empty: build the data (`optical-kernels data`)")
        self.cfg = config
        self._owns_group = not dist.is_initialized()
        self.rank, self.world, local = init_distributed()
        self._owns_group = self._owns_group and dist.is_initialized()
        if config.batch_size % (self.world * config.grad_accum):
            raise ValueError(
                f"batch_size {config.batch_size} must be a multiple of world_size × grad_accum "
                f"= {self.world} × {config.grad_accum}: change --batch-size or --grad-accum"
            )
        if device is None:
            device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.pairs = train_pairs
        self.dev_pairs = dev_pairs
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.meta = dict(meta or {})
        bf16 = config.bf16
        if bf16 is None:
            bf16 = self.device.type == "cuda" and torch.cuda.is_bf16_supported()
        self.bf16 = bool(bf16)

        torch.manual_seed(config.seed + self.rank)
        self.student = student.to(self.device).train()
        self.teacher = teacher.to(self.device).eval().requires_grad_(False)
        if config.freeze_embeddings:
            student.model.get_input_embeddings().requires_grad_(False)
        self.loss_fn = DistillLoss(config.loss, config.ot, config.kd_weight)
        params = [p for p in student.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": config.weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ]
        self.optimizer = torch.optim.AdamW(groups, lr=config.lr)
        warm, total = config.warmup_steps, config.steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, warm, total)
        )
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model: nn.Module = DistributedDataParallel(student, device_ids=ids)
        else:
            self.model = student
        self.step = 0
        self.history: list[dict] = []
        self._perm_cache: tuple[int, list[int]] | None = None
        self._dev_docs: torch.Tensor | None = None

    # ------------------------------------------------------------------ data order
    def _perm(self, epoch: int) -> list[int]:
        if self._perm_cache is None or self._perm_cache[0] != epoch:
            g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch)
            self._perm_cache = (epoch, torch.randperm(len(self.pairs), generator=g).tolist())
        return self._perm_cache[1]

    def global_batch(self, step: int) -> list[int]:
        """Indices of the pairs of optimizer step ``step`` (0-based), all ranks together."""
        n, bs = len(self.pairs), self.cfg.batch_size
        out: list[int] = []
        pos = step * bs
        while len(out) < bs:
            epoch, off = divmod(pos + len(out), n)
            take = min(bs - len(out), n - off)
            out.extend(self._perm(epoch)[off : off + take])
        return out

    def _micro_batches(self, step: int) -> list[list[int]]:
        idx = self.global_batch(step)
        per_rank = len(idx) // self.world
        mine = idx[self.rank * per_rank : (self.rank + 1) * per_rank]
        k = per_rank // self.cfg.grad_accum
        return [mine[i * k : (i + 1) * k] for i in range(self.cfg.grad_accum)]

    # ------------------------------------------------------------------ one step
    def _autocast(self):
        return torch.autocast(self.device.type, torch.bfloat16, enabled=self.bf16)

    def train_step(self) -> dict:
        """One optimizer step; returns its log record (global-batch mean losses)."""
        t0 = time.perf_counter()
        micro = self._micro_batches(self.step)
        totals = torch.zeros(3, dtype=torch.float64)  # loss, ot, kd
        for i, chunk in enumerate(micro):
            pairs = [self.pairs[j] for j in chunk]
            s = self.student.tokenize([p[0] for p in pairs], self.device)
            t = self.teacher.tokenize([p[1] for p in pairs], self.device)
            with torch.no_grad(), self._autocast():
                th = self.teacher(t["input_ids"], t["attention_mask"])
            sync = i == len(micro) - 1 or self.world == 1
            ctx = contextlib.nullcontext() if sync else self.model.no_sync()
            with ctx:
                with self._autocast():
                    sh = self.model(s["input_ids"], s["attention_mask"])
                loss, parts = self.loss_fn(
                    sh.float(), s["attention_mask"], s["token_mask"],
                    th.float(), t["attention_mask"], t["token_mask"],
                )
                (loss / len(micro)).backward()
            totals[0] += loss.item() / len(micro)
            totals[1] += parts.get("ot", torch.zeros(())).item() / len(micro)
            totals[2] += parts.get("kd", torch.zeros(())).item() / len(micro)
        if self.cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.cfg.max_grad_norm)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.world > 1:
            dist.all_reduce(totals)  # float64 sum over ranks (gloo and nccl both support it)
            totals /= self.world
        self.step += 1
        dt = time.perf_counter() - t0
        rec = {"step": self.step, "loss": totals[0].item(), "lr": lr,
               "pairs_per_s": self.cfg.batch_size / dt}
        if self.cfg.loss != "kd":
            rec["ot"] = totals[1].item()
        if self.cfg.loss != "ot":
            rec["kd"] = totals[2].item()
        return rec

    # ------------------------------------------------------------------ eval / checkpoints
    def evaluate_dev(self) -> dict | None:
        """Dev retrieval metrics (rank 0; other ranks return ``None``)."""
        if not self.dev_pairs or self.rank != 0:
            return None
        foreign = [p[0] for p in self.dev_pairs]
        english = [p[1] for p in self.dev_pairs]
        if self._dev_docs is None:
            self._dev_docs = encode(self.teacher, english, bf16=self.bf16)
        return evaluate_retrieval(
            self.student, self.teacher, foreign, english, pool_size=self.cfg.eval_pool,
            doc_embeddings=self._dev_docs, bf16=self.bf16,
        )

    @property
    def checkpoint_path(self) -> Path | None:
        return self.out_dir / CHECKPOINT_NAME if self.out_dir is not None else None

    def state_dict(self) -> dict:
        """Everything needed to resume (collective under DDP: every rank must call it)."""
        rng = _rng_state(self.device)
        if self.world > 1:
            all_rng: list = [None] * self.world
            dist.all_gather_object(all_rng, rng)
        else:
            all_rng = [rng]
        return {
            "format": CHECKPOINT_FORMAT,
            "step": self.step,
            "world_size": self.world,
            "config": self.cfg.to_dict(),
            "meta": self.meta,
            "student": self.student.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": all_rng,
            "history": json.dumps(self.history),
        }

    def save(self) -> Path | None:
        """Write ``<out>/checkpoint.pt`` and ``<out>/history.json`` (rank 0 writes)."""
        if self.out_dir is None:
            return None
        state = self.state_dict()
        if self.rank == 0:
            save_checkpoint(self.checkpoint_path, state)
            self.write_history()
        if self.world > 1:
            dist.barrier()
        return self.checkpoint_path

    def write_history(self) -> None:
        if self.out_dir is None or self.rank != 0:
            return
        path = self.out_dir / HISTORY_NAME
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps({"config": self.cfg.to_dict(), "meta": self.meta,
                                   "history": self.history}, indent=1))
        os.replace(tmp, path)

    def load(self, path: str | os.PathLike[str]) -> None:
        """Restore a checkpoint written by :meth:`save` (same config and process count)."""
        state = load_checkpoint(path)
        saved = state["config"]
        mine = self.cfg.to_dict()
        diff = sorted(k for k in mine if k not in _FREE_ON_RESUME and saved.get(k) != mine[k])
        if diff:
            details = ", ".join(f"{k}: {saved.get(k)!r} -> {mine[k]!r}" for k in diff)
            raise CheckpointError(
                f"cannot resume from {path}: options differ from the run that wrote it "
                f"({details}); use the same options, or a new --out directory to start afresh"
            )
        if state["world_size"] != self.world:
            raise CheckpointError(
                f"{path} was written by {state['world_size']} processes, this run has "
                f"{self.world}: resume with the same torchrun --nproc_per_node"
            )
        try:
            self.student.load_state_dict(state["student"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise CheckpointError(
                f"the weights in {path} do not fit this student ({e}); resume with the same "
                "--student and options"
            ) from e
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        self.history = json.loads(state["history"])
        _set_rng_state(state["rng"][self.rank], self.device)

    # ------------------------------------------------------------------ main loop
    def fit(self, resume: str | os.PathLike[str] | None = None) -> list[dict]:
        """Train up to ``config.steps``; return the history (one record per step).

        Args:
            resume: a checkpoint path, ``"auto"`` (``<out>/checkpoint.pt`` if it exists) or
                ``None`` (start from scratch).
        """
        if resume == "auto":
            p = self.checkpoint_path
            resume = p if p is not None and p.exists() else None
        if resume is not None:
            self.load(resume)
        cfg = self.cfg
        bar = tqdm(total=cfg.steps, initial=self.step, unit="step", dynamic_ncols=True,
                   disable=not (cfg.progress and self.rank == 0), desc=f"distill {cfg.loss}")
        try:
            while self.step < cfg.steps:
                rec = self.train_step()
                last = self.step == cfg.steps
                if cfg.eval_every and (self.step % cfg.eval_every == 0 or last):
                    dev = self.evaluate_dev()
                    if dev is not None:
                        rec["dev"] = dev
                    if self.world > 1:
                        dist.barrier()
                self.history.append(rec)
                post = {"loss": f"{rec['loss']:.4f}", "pairs/s": f"{rec['pairs_per_s']:.1f}"}
                if "dev" in rec:
                    post["dev P@1"] = f"{rec['dev']['p@1']:.3f}"
                bar.set_postfix(post, refresh=False)
                bar.update(1)
                if last or (cfg.ckpt_every and self.step % cfg.ckpt_every == 0):
                    self.save()
        finally:
            bar.close()
        return self.history

    def close(self) -> None:
        """Release the DDP wrapper and leave the process group if this trainer created it.

        The wrapper goes first: destroying DDP's reducer after its process group can hang.
        """
        if isinstance(self.model, DistributedDataParallel):
            self.model = self.student
            gc.collect()
        if self._owns_group and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
            self._owns_group = False

