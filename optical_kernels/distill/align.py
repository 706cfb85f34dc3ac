"""Token alignment heatmap: the transport plan between a foreign and an English sentence.

The student encodes the foreign sentence (``x`` [n, d], content tokens only), the teacher the
English one (``y`` [m, d]); :func:`optical_kernels.solve_sample` gives the entropic plan
``P`` [n, m] with the same options as training. Row ``i`` of ``P`` sums to ``1/n``: the plot
shows ``n·P`` (each row a distribution over English tokens), so a bright cell is a token
pair that the loss aligns.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

import optical_kernels
from optical_kernels.distill.evaluate import Encoder
from optical_kernels.distill.losses import OTOptions


def _content(encoder: Encoder, text: str) -> tuple[torch.Tensor, list[str]]:
    """Content-token embeddings [k, d] (float32) and their token strings."""
    batch = encoder.tokenize([text], encoder.device)
    with torch.no_grad():
        h = encoder(batch["input_ids"], batch["attention_mask"])[0].float()
    keep = batch["token_mask"][0]
    toks = encoder.tokenizer.convert_ids_to_tokens(batch["input_ids"][0][keep].tolist())
    return h[keep], toks


def transport_plan(
    student: Encoder,
    teacher: Encoder,
    foreign: str,
    english: str,
    options: OTOptions | None = None,
) -> tuple[torch.Tensor, list[str], list[str]]:
    """Entropic transport plan between the content tokens of two sentences.

    Returns:
        ``(P [n, m] float32 on CPU, foreign tokens (n), English tokens (m))``.

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
    res = optical_kernels.solve_sample(x, y, **kw)
    return res.plan().detach().float().cpu(), src, tgt


def draw_alignment(
    plan: torch.Tensor,
    src_tokens: list[str],
    tgt_tokens: list[str],
    path: str | os.PathLike[str],
    *,
    title: str | None = None,
) -> Path:
    """Save the plan as a token heatmap PNG (rows: foreign tokens, columns: English tokens).

    Args:
        plan: [n, m] transport plan.
        src_tokens: the n foreign token strings.
        tgt_tokens: the m English token strings.
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
    rows = plan * n  # each row a distribution over English tokens
    fig, ax = plt.subplots(figsize=(max(4.0, 0.38 * m + 2.5), max(3.0, 0.32 * n + 1.8)))
    im = ax.imshow(rows.numpy(), cmap="viridis", aspect="auto", vmin=0.0)
    ax.set_xticks(range(m), tgt_tokens, rotation=90, fontsize=8)
    ax.set_yticks(range(n), src_tokens, fontsize=8)
    ax.set_xlabel("English tokens (teacher)")
    ax.set_ylabel("foreign tokens (student)")
    if title:
        ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.04, label="n · P (row-normalised plan)")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def draw_loss_curves(
    curves: dict[str, list[float]], path: str | os.PathLike[str], *, title: str | None = None
) -> Path:
    """Save training-loss curves (one subplot per run: the losses have different scales)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    k = max(1, len(curves))
    fig, axes = plt.subplots(1, k, figsize=(4.2 * k, 3.2), squeeze=False)
    for ax, (name, ys) in zip(axes[0], curves.items(), strict=False):
        ax.plot(range(1, len(ys) + 1), ys, lw=1.0)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
