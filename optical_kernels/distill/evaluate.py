"""Cross-lingual retrieval evaluation: P@1, MRR@10, R@10, per pool and overall.

Retrieval (OPTICAL's evaluation): every foreign sentence of a pool is a query, encoded by the
student (a ``SentenceTransformer``: its pooling, normalisation and default prompt); the
documents are the English sentences of the same pool, encoded by the teacher; the gold
document of query ``i`` is English sentence ``i``. Scores are cosine similarities. Per query,
with ``r`` the 1-based rank of the gold document,

* ``P@1``   = [r = 1]
* ``MRR@10`` = 1/r if r ≤ 10 else 0
* ``R@10``  = [r ≤ 10]     (one relevant document per query)

Ties are counted *pessimistically*: ``r = #{documents scoring ≥ the gold document}``, so a
query whose gold document ties with another one is not a hit at rank 1 (a collapsed encoder
that gives every document the same score gets P@1 = 0, not 1). Metrics are averaged over the
queries of each pool and over all queries (``"pools"`` holds the per-pool values). A test set
is cut into consecutive pools of ``pool_size`` sentences (OPTICAL: 1,000); a remainder shorter
than ``pool_size`` is dropped, except when the set holds less than one pool, in which case the
whole set is one pool.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from sentence_transformers.sentence_transformer.evaluation import SentenceEvaluator
from tqdm.auto import tqdm

METRICS = ("p@1", "mrr@10", "r@10")


@torch.no_grad()
def encode(model: Any, texts: Sequence[str], *, batch_size: int = 64,
           progress: bool = False) -> torch.Tensor:
    """L2-normalised sentence embeddings [N, d] (float32, CPU) of a ``SentenceTransformer``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(texts) == 0:
        return torch.zeros(0, model.get_embedding_dimension())
    emb = model.encode(list(texts), batch_size=batch_size, convert_to_tensor=True,
                       normalize_embeddings=True, show_progress_bar=progress)
    return emb.float().cpu()


def _summary(r: torch.Tensor, k: int) -> dict[str, float]:
    return {
        "p@1": (r == 1).double().mean().item(),
        f"mrr@{k}": torch.where(r <= k, 1.0 / r, torch.zeros_like(r)).mean().item(),
        f"r@{k}": (r <= k).double().mean().item(),
    }


def gold_ranks(queries: torch.Tensor, docs: torch.Tensor) -> torch.Tensor:
    """Pessimistic 1-based rank of ``docs[i]`` for ``queries[i]`` (long [N]): the number of
    documents whose score is ≥ the gold document's (the gold one included)."""
    s = queries.float() @ docs.float().T
    gold = s.diagonal().unsqueeze(1)
    return (s >= gold).sum(1)


def retrieval_metrics(queries: torch.Tensor, docs: torch.Tensor, pool_size: int = 1000,
                      k: int = 10, *, progress: bool = False) -> dict[str, Any]:
    """P@1, MRR@k and R@k of aligned query/document embeddings (see the module docstring).

    Args:
        queries: [N, d] query embeddings; the gold document of query ``i`` is ``docs[i]``.
        docs: [N, d] document embeddings.
        pool_size: size of each retrieval pool.
        k: cut-off of MRR and recall.
        progress: a progress bar over the pools.

    Returns:
        ``{"p@1", f"mrr@{k}", f"r@{k}", "n_queries", "n_pools", "pools": [per-pool metrics]}``.
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
    ranks, pools = [], []
    for p in tqdm(range(n_pools), desc="retrieval pools", disable=not progress or n_pools < 2):
        r = gold_ranks(queries[p * size : (p + 1) * size], docs[p * size : (p + 1) * size])
        ranks.append(r)
        pools.append({**_summary(r.double(), k), "n_queries": int(r.numel())})
    r = torch.cat(ranks).double()
    return {**_summary(r, k), "n_queries": int(r.numel()), "n_pools": n_pools, "pools": pools}


def evaluate_retrieval(query_model: Any, doc_model: Any, foreign: Sequence[str],
                       english: Sequence[str], *, pool_size: int = 1000, batch_size: int = 64,
                       doc_embeddings: torch.Tensor | None = None,
                       progress: bool = False) -> dict[str, Any]:
    """Retrieval metrics of foreign queries (``query_model``) against English documents
    (``doc_model``, or their precomputed ``doc_embeddings`` from :func:`encode`)."""
    if len(foreign) != len(english):
        raise ValueError(
            f"foreign and english must be aligned, got {len(foreign)} and {len(english)} texts"
        )
    q = encode(query_model, foreign, batch_size=batch_size, progress=progress)
    d = doc_embeddings if doc_embeddings is not None else encode(
        doc_model, english, batch_size=batch_size, progress=progress)
    return retrieval_metrics(q, d.to(q.device), pool_size, progress=progress)


def evaluate_suite(systems: Mapping[str, Any], teacher: Any,
                   sets: Mapping[str, tuple[Sequence[str], Sequence[str]]], *,
                   pool_size: int = 1000, batch_size: int = 64,
                   progress: bool = False) -> dict[str, dict[str, dict[str, Any]]]:
    """``results[set][system] = metrics`` for several query encoders on several test sets,
    against the teacher's English documents (encoded once per set)."""
    results: dict[str, dict[str, dict[str, Any]]] = {}
    for set_name, (foreign, english) in sets.items():
        docs = encode(teacher, english, batch_size=batch_size, progress=progress)
        results[set_name] = {
            name: evaluate_retrieval(model, teacher, foreign, english, pool_size=pool_size,
                                     batch_size=batch_size, doc_embeddings=docs,
                                     progress=progress)
            for name, model in systems.items()
        }
    return results


def format_table(results: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> str:
    """Plain-text table of :func:`evaluate_suite` results, one row per (set, system)."""
    rows = [("test set", "system", "P@1", "MRR@10", "R@10", "queries", "pools")]
    for set_name, by_system in results.items():
        for system, m in by_system.items():
            rows.append((set_name, system, f"{100 * m['p@1']:.1f}", f"{100 * m['mrr@10']:.1f}",
                         f"{100 * m['r@10']:.1f}", f"{m['n_queries']}", f"{m['n_pools']}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for j, r in enumerate(rows):
        cells = [c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))]
        lines.append("  ".join(cells))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


class DevRetrievalEvaluator(SentenceEvaluator):
    """Periodic dev retrieval for ``SentenceTransformerTrainer(evaluator=...)``.

    The model under training encodes the foreign queries; the frozen teacher's English
    document embeddings are computed once. Returns ``{"dev_p@1", "dev_mrr@10", "dev_r@10"}``
    (the trainer logs them as ``eval_dev_...``); the primary metric is ``dev_p@1``.
    """

    def __init__(self, teacher: Any, foreign: Sequence[str], english: Sequence[str], *,
                 pool_size: int = 1000, batch_size: int = 64, name: str = "dev"):
        super().__init__()
        if len(foreign) != len(english) or not foreign:
            raise ValueError("dev set: foreign and english must be aligned and non-empty")
        self.foreign, self.english = list(foreign), list(english)
        self.pool_size, self.batch_size, self.name = pool_size, batch_size, name
        self._teacher = (teacher,)  # not a submodule
        self._docs: torch.Tensor | None = None
        self.primary_metric = "p@1"

    def __call__(self, model: Any, output_path: str | None = None, epoch: int = -1,
                 steps: int = -1) -> dict[str, float]:
        if self._docs is None:
            self._docs = encode(self._teacher[0], self.english, batch_size=self.batch_size)
        m = evaluate_retrieval(model, None, self.foreign, self.english, pool_size=self.pool_size,
                               batch_size=self.batch_size, doc_embeddings=self._docs)
        metrics = self.prefix_name_to_metrics({k: m[k] for k in METRICS}, self.name)
        self.store_metrics_in_model_card_data(model, metrics, epoch, steps)
        return metrics
