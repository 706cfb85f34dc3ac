"""Alignment heatmap: the transport plan between a foreign and an English sentence, by word.

The student encodes the foreign sentence (``x`` [n, d], content tokens only), the teacher the
English one (``y`` [m, d]); :func:`optical_kernels.solve_sample` gives the entropic plan
``P`` [n, m] with the same options as training. For reading, sub-word pieces are merged into
words (WordPiece ``##`` continuations, SentencePiece pieces without a leading ``▁``): the mass
of a word pair is the sum over its pieces, so the merged plan is still a transport plan. The
plot shows each row normalised to sum to 1 (a distribution over English words), so a bright
cell is a word pair that the loss aligns.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

import optical_kernels
from optical_kernels.distill.losses import OTOptions


def _content(model: Any, text: str) -> tuple[torch.Tensor, list[str]]:
    """Content-token embeddings [k, d] (float32) and their token strings of a
    ``SentenceTransformer`` (its default prompt applied and masked out)."""
    from optical_kernels.integrations.sentence_transformers import content_mask

    name = getattr(model, "default_prompt_name", None)
    prompt = model.prompts.get(name) if name else None
    feats = model.preprocess([text], prompt=prompt) if prompt else model.preprocess([text])
    dev = model.device
    feats = {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in feats.items()}
    keep = content_mask(feats, model.tokenizer)[0]
    with torch.no_grad():
        h = model(dict(feats))["token_embeddings"][0].float()
    toks = model.tokenizer.convert_ids_to_tokens(feats["input_ids"][0][keep].tolist())
    return h[keep].cpu(), toks


def merge_pieces(tokens: list[str]) -> tuple[list[str], list[int]]:
    """Words from sub-word tokens: ``(words, word index of each token)``.

    A WordPiece token starting with ``##`` continues the previous word; with SentencePiece
    (``▁`` marks a word start) a token without ``▁`` continues it.
    """
    sentencepiece = any(t.startswith("\u2581") for t in tokens)
    words: list[str] = []
    index: list[int] = []
    for t in tokens:
        if sentencepiece:
            cont = not t.startswith("\u2581") and bool(words)
            piece = t.lstrip("\u2581")
        else:
            cont = t.startswith("##") and bool(words)
            piece = t[2:] if cont else t
        if cont:
            words[-1] += piece
        else:
            words.append(piece)
        index.append(len(words) - 1)
    return words, index


def merge_plan(plan: torch.Tensor, rows: list[int], cols: list[int]) -> torch.Tensor:
    """Sum the plan over the tokens of each word: [n, m] -> [words(rows), words(cols)]."""
    n_r, n_c = max(rows) + 1, max(cols) + 1
    r = torch.zeros(n_r, plan.shape[0], dtype=plan.dtype)
    r[rows, range(plan.shape[0])] = 1
    c = torch.zeros(plan.shape[1], n_c, dtype=plan.dtype)
    c[range(plan.shape[1]), cols] = 1
    return r @ plan @ c


def transport_plan(
    student: Any,
    teacher: Any,
    foreign: str,
    english: str,
    options: OTOptions | None = None,
    *,
    words: bool = True,
) -> tuple[torch.Tensor, list[str], list[str]]:
    """Entropic transport plan between two sentences (``SentenceTransformer`` encoders).

    Returns:
        ``(P float32 on CPU, foreign labels, English labels)``: by word when ``words``
        (sub-word pieces merged, :func:`merge_pieces`), else by token.

    Raises:
        ValueError: a sentence has no content token (empty after tokenization).
    """
    opts = options or OTOptions()
    was = student.training
    student.eval()
    try:
        x, src = _content(student, foreign)
        y, tgt = _content(teacher, english)
    finally:
        student.train(was)
    for name, toks, text in (("foreign", src, foreign), ("english", tgt, english)):
        if not toks:
            raise ValueError(f"the {name} sentence {text!r} has no token to align: pass a "
                             "non-empty sentence")
    kw = opts.kwargs()
    kw.pop("grad")
    kw["objective"] = "linear"
    plan = optical_kernels.solve_sample(x, y, **kw).plan().detach().float().cpu()
    if not words:
        return plan, src, tgt
    (sw, si), (tw, ti) = merge_pieces(src), merge_pieces(tgt)
    return merge_plan(plan, si, ti), sw, tw


def draw_alignment(
    plan: torch.Tensor,
    src_tokens: list[str],
    tgt_tokens: list[str],
    path: str | os.PathLike[str],
    *,
    title: str | None = None,
) -> Path:
    """Save the plan as a heatmap PNG (rows: foreign words, columns: English words).

    Args:
        plan: [n, m] transport plan.
        src_tokens: the n foreign labels (words or tokens).
        tgt_tokens: the m English labels.
        path: output PNG path (its folder is created).
        title: figure title.

    Returns:
        The path written.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    n, m = plan.shape
    if (n, m) != (len(src_tokens), len(tgt_tokens)):
        raise ValueError(f"plan is {n}×{m} but there are {len(src_tokens)} foreign and "
                         f"{len(tgt_tokens)} English tokens")
    rows = plan / plan.sum(1, keepdim=True).clamp_min(1e-30)  # each row a distribution
    fig, ax = plt.subplots(figsize=(max(4.0, 0.38 * m + 2.5), max(3.0, 0.32 * n + 1.8)))
    im = ax.imshow(rows.numpy(), cmap="viridis", aspect="auto", vmin=0.0)
    ax.set_xticks(range(m), tgt_tokens, rotation=90, fontsize=8)
    ax.set_yticks(range(n), src_tokens, fontsize=8)
    ax.set_xlabel("English words (teacher)")
    ax.set_ylabel("foreign words (student)")
    if title:
        ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.04, label="P row-normalised")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def draw_loss_curves(
    runs: dict[str, list[dict]], path: str | os.PathLike[str], *, title: str | None = None
) -> Path:
    """Save training curves, one subplot per run (the losses have different scales).

    ``runs`` maps a run name to its history records (``{"step", "loss", "dev"?}``, as in
    ``history.json``); the training loss is drawn against the left axis and, when the run
    has dev evaluations, the dev retrieval P@1 and MRR@10 against the right axis, so that
    a reader sees whether retrieval improved, not only the loss.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    k = max(1, len(runs))
    fig, axes = plt.subplots(1, k, figsize=(4.6 * k, 3.4), squeeze=False)
    for ax, (name, hist) in zip(axes[0], runs.items(), strict=False):
        steps = [r for r in hist if "loss" in r]
        ax.plot([r["step"] for r in steps], [r["loss"] for r in steps], lw=1.0, color="C0")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss", color="C0")
        ax.grid(alpha=0.3)
        dev = [r for r in hist if "dev" in r]
        if dev:
            ax2 = ax.twinx()
            steps = [r["step"] for r in dev]
            ax2.plot(steps, [r["dev"]["p@1"] for r in dev], "o-", color="C3", ms=3, lw=1,
                     label="dev P@1")
            ax2.plot(steps, [r["dev"]["mrr@10"] for r in dev], "s--", color="C2", ms=3, lw=1,
                     label="dev MRR@10")
            ax2.set_ylim(0, 1)
            ax2.set_ylabel("dev retrieval")
            ax2.legend(fontsize=7, loc="center right")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
