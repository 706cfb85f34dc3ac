"""Encoders and cross-lingual retrieval evaluation.

Retrieval (OPTICAL's evaluation): every foreign sentence of a pool is a query, encoded by the
student (mean pooling); the documents are the English sentences of the same pool, encoded by
the teacher; the gold document of query ``i`` is English sentence ``i``. Scores are cosine
similarities. Per query, with ``r`` the 1-based rank of the gold document:

* ``P@1``   = [r = 1]
* ``MRR@10`` = 1/r if r ≤ 10 else 0
* ``R@10``  = [r ≤ 10]     (one relevant document per query)

each averaged over all queries of all pools. A test set is cut into consecutive pools of
``pool_size`` sentences (OPTICAL: 1,000); a remainder shorter than ``pool_size`` is dropped,
except when the set holds less than one pool, in which case the whole set is one pool.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from optical_kernels.distill.models import mean_pool, tokenize

METRICS = ("p@1", "mrr@10", "r@10")


class Encoder(nn.Module):
    """A transformers encoder with its tokenizer, text prefix and optional projection.

    ``forward`` returns token embeddings ``h`` [B, L, d] (the last hidden state, projected to
    ``out_dim`` features when ``out_dim`` differs from the model's hidden size); sentence
    embeddings are their masked mean (:func:`mean_pool`).

    Args:
        model: a transformers model whose output has ``last_hidden_state`` (e.g. ``BertModel``).
        tokenizer: its tokenizer.
        prefix: text prepended to every input (e5 models expect ``"query: "``).
        out_dim: width of the returned embeddings; a trainable ``nn.Linear`` is added when it
            differs from the model's hidden size.
        max_length: truncation length in tokens.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        *,
        prefix: str = "",
        out_dim: int | None = None,
        max_length: int = 128,
    ):
        super().__init__()
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {max_length}")
        self.model = model
        self.tokenizer = tokenizer
        self.prefix = prefix
        self.max_length = int(max_length)
        hidden = int(model.config.hidden_size)
        self.proj = nn.Linear(hidden, out_dim) if out_dim and out_dim != hidden else None
        # We pool the last hidden state ourselves: a BERT pooler gets no gradient (and would
        # make DistributedDataParallel wait for it), so it is frozen.
        if getattr(model, "pooler", None) is not None:
            model.pooler.requires_grad_(False)

    @property
    def dim(self) -> int:
        """Width of the embeddings returned by ``forward``."""
        return self.proj.out_features if self.proj is not None else self.model.config.hidden_size

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def tokenize(self, texts: Sequence[str], device: torch.device | None = None) -> dict:
        """Tokenize ``texts`` with the prefix, padded to the longest (:func:`models.tokenize`).

        Returns:
            ``{"input_ids": [B, L], "attention_mask": [B, L], "token_mask": [B, L] bool}``;
            ``token_mask`` marks the content tokens, those that carry transport mass (not
            padding, not special, not the prefix).
        """
        return tokenize(self.tokenizer, texts, prefix=self.prefix, max_length=self.max_length,
                        device=device)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Token embeddings [B, L, d] of a tokenized batch."""
        h = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.proj(h) if self.proj is not None else h


@torch.no_grad()
def encode(
    encoder: Encoder,
    texts: Sequence[str],
    *,
    batch_size: int = 64,
    normalize: bool = True,
    bf16: bool | None = None,
) -> torch.Tensor:
    """Mean-pooled sentence embeddings [N, d] (float32, on the encoder's device).

    Texts are batched by length to limit padding; the output follows the input order.
    ``normalize`` L2-normalises the rows (cosine similarity = dot product). ``bf16`` runs
    the encoder under bf16 autocast (``None``: on CUDA only).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    was_training = encoder.training
    encoder.eval()
    dev = encoder.device
    if bf16 is None:
        bf16 = dev.type == "cuda"
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = torch.empty(len(texts), encoder.dim, device=dev)
    try:
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            enc = encoder.tokenize([texts[i] for i in idx], dev)
            with torch.autocast(dev.type, torch.bfloat16, enabled=bf16):
                h = encoder(enc["input_ids"], enc["attention_mask"])
            out[idx] = mean_pool(h.float(), enc["attention_mask"])
    finally:
        encoder.train(was_training)
    return F.normalize(out, dim=-1) if normalize else out


def retrieval_metrics(
    queries: torch.Tensor, docs: torch.Tensor, pool_size: int = 1000, k: int = 10
) -> dict[str, float]:
    """P@1, MRR@k and R@k of aligned query/document embeddings.

    Args:
        queries: [N, d] query embeddings; the gold document of query ``i`` is ``docs[i]``.
        docs: [N, d] document embeddings.
        pool_size: size of each retrieval pool (see the module docstring).
        k: cut-off of MRR and recall.

    Returns:
        ``{"p@1", f"mrr@{k}", f"r@{k}", "n_queries", "n_pools"}``.
    """
    if queries.shape != docs.shape or queries.dim() != 2:
        raise ValueError(
            f"queries and docs must both be [N, d], got {tuple(queries.shape)} and "
            f"{tuple(docs.shape)}"
        )
    if pool_size < 1:
        raise ValueError(f"pool_size must be >= 1, got {pool_size}")
    n = queries.shape[0]
    if n == 0:
        raise ValueError("cannot evaluate retrieval on an empty set")
    n_pools = max(1, n // pool_size)
    size = pool_size if n >= pool_size else n
    ranks = []
    for p in range(n_pools):
        q = queries[p * size : (p + 1) * size].float()
        d = docs[p * size : (p + 1) * size].float()
        s = q @ d.T  # [size, size]
        gold = s.diagonal().unsqueeze(1)
        ranks.append(1 + (s > gold).sum(1))  # ties count in the query's favour
    r = torch.cat(ranks).double()
    return {
        "p@1": (r == 1).double().mean().item(),
        f"mrr@{k}": torch.where(r <= k, 1.0 / r, torch.zeros_like(r)).mean().item(),
        f"r@{k}": (r <= k).double().mean().item(),
        "n_queries": int(r.numel()),
        "n_pools": n_pools,
    }


def evaluate_retrieval(
    query_encoder: Encoder,
    doc_encoder: Encoder,
    foreign: Sequence[str],
    english: Sequence[str],
    *,
    pool_size: int = 1000,
    batch_size: int = 64,
    doc_embeddings: torch.Tensor | None = None,
    bf16: bool | None = None,
) -> dict[str, float]:
    """Retrieval metrics of foreign queries against English documents (see module docstring).

    ``doc_embeddings`` (the output of :func:`encode` on ``english``) may be passed to reuse
    the teacher's document embeddings across systems; ``bf16`` as in :func:`encode`.
    """
    if len(foreign) != len(english):
        raise ValueError(
            f"foreign and english must be aligned, got {len(foreign)} and {len(english)} texts"
        )
    q = encode(query_encoder, foreign, batch_size=batch_size, bf16=bf16)
    d = doc_embeddings
    if d is None:
        d = encode(doc_encoder, english, batch_size=batch_size, bf16=bf16)
    return retrieval_metrics(q, d.to(q.device), pool_size)


def evaluate_suite(
    systems: Mapping[str, Encoder],
    teacher: Encoder,
    sets: Mapping[str, tuple[Sequence[str], Sequence[str]]],
    *,
    pool_size: int = 1000,
    batch_size: int = 64,
    bf16: bool | None = None,
) -> dict[str, dict[str, dict[str, float]]]:
    """Evaluate several query encoders on several test sets against the teacher's documents.

    Args:
        systems: name -> query encoder (e.g. ``{"teacher (foreign)": teacher,
            "untrained student": s0, "OT student": s1}``).
        teacher: the document encoder (English side).
        sets: set name -> ``(foreign texts, english texts)``.
        bf16: bf16 autocast of the encoders (``None``: on CUDA only).

    Returns:
        ``results[set][system] = metrics`` (see :func:`retrieval_metrics`).
    """
    results: dict[str, dict[str, dict[str, float]]] = {}
    for set_name, (foreign, english) in sets.items():
        docs = encode(teacher, english, batch_size=batch_size, bf16=bf16)
        results[set_name] = {
            name: evaluate_retrieval(
                enc, teacher, foreign, english, pool_size=pool_size, batch_size=batch_size,
                doc_embeddings=docs, bf16=bf16,
            )
            for name, enc in systems.items()
        }
    return results


def format_table(results: Mapping[str, Mapping[str, Mapping[str, float]]]) -> str:
    """Plain-text table of :func:`evaluate_suite` results, one row per (set, system)."""
    rows = [("test set", "system", "P@1", "MRR@10", "R@10", "queries")]
    for set_name, by_system in results.items():
        for system, m in by_system.items():
            rows.append(
                (
                    set_name,
                    system,
                    f"{100 * m['p@1']:.1f}",
                    f"{100 * m['mrr@10']:.1f}",
                    f"{100 * m['r@10']:.1f}",
                    f"{m['n_queries']}",
                )
            )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for j, r in enumerate(rows):
        cells = [c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))]
        lines.append("  ".join(cells))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
