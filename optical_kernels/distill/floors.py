"""Retrieval floors and the experiment's rank metrics (numpy, no torch).

Every system of the experiment (docs/experiment.md) is scored the same way: foreign queries
against English documents of a *pool*; the gold document of query ``i`` is English text ``i``.
A system gives a score matrix; from it each query gets the 1-based rank of its gold document
with **pessimistic ties**: a gold document that ties with ``k`` others gets the worst rank of
the ``k + 1`` (``rank = #{documents scoring >= the gold}``), so a constant scorer scores as
badly as a random one can, never perfectly. Per query,

* ``p@1``    = [rank = 1]
* ``mrr@10`` = 1 / rank if rank <= 10 else 0
* ``r@10``   = [rank <= 10]

and a set's metric is the mean over its queries. Per-query values (not only the means) are
returned so that :mod:`optical_kernels.distill.stats` can bootstrap them.

The floors:

* :func:`chance_metrics`: the expectation of a uniformly random ranking of ``n`` documents
  (gold rank uniform on ``1..n``): ``p@1 = 1/n``, ``mrr@k = H_min(k,n) / n``,
  ``r@k = min(k, n) / n``.
* :func:`char_ngram_tfidf_scores`: a model-free lexical match, cosine of character 3–5-gram
  TF-IDF vectors (scikit-learn ``TfidfVectorizer(analyzer="char_wb")``), fitted on the texts of
  the evaluated set (both sides; no labels are used).
* :func:`encoder_scores`: any encoder on both sides (e.g. off-the-shelf e5-small, untrained):
  the caller passes the two embedding callables.

:func:`rank_metrics` duplicates what ``evaluate.retrieval_metrics`` computes (with the
pessimistic tie rule of issue 11); it is kept self-contained here (numpy, per-query output)
until the two are merged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

METRICS = ("p@1", "mrr@10", "r@10")
DEFAULT_POOL_SIZE = 1000


def _check_scores(scores: Any, gold: Any) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2:
        raise ValueError(f"scores must be a [n_queries, n_docs] matrix, got shape {s.shape}")
    g = np.asarray(gold)
    if g.ndim != 1 or g.shape[0] != s.shape[0]:
        raise ValueError(f"gold must have one index per query ({s.shape[0]}), got shape {g.shape}")
    if g.size and not np.issubdtype(g.dtype, np.integer):
        raise TypeError(f"gold must hold integer document indices, got dtype {g.dtype}")
    if g.size and (g.min() < 0 or g.max() >= s.shape[1]):
        raise ValueError(f"gold indices must be in [0, {s.shape[1]}), got {g.min()}..{g.max()}")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite (found NaN or inf)")
    return s, g.astype(np.int64)


def gold_ranks(scores: Any, gold: Any) -> np.ndarray:
    """1-based rank of each query's gold document, ties pessimistic (see the module docstring).

    Args:
        scores: [n_queries, n_docs] similarity matrix (higher = more similar).
        gold: [n_queries] integer index of each query's gold document.

    Returns:
        int64 [n_queries] ranks in ``1..n_docs``.
    """
    s, g = _check_scores(scores, gold)
    if s.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    gs = s[np.arange(s.shape[0]), g][:, None]
    return (s >= gs).sum(axis=1).astype(np.int64)


def per_query_metrics(ranks: Any, k: int = 10) -> dict[str, np.ndarray]:
    """Per-query ``p@1``, ``mrr@k`` and ``r@k`` (float64 arrays) from 1-based gold ranks."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    r = np.asarray(ranks)
    if r.size and (not np.issubdtype(r.dtype, np.integer) or r.min() < 1):
        raise ValueError("ranks must be integers >= 1")
    r = r.astype(np.float64)
    return {
        "p@1": (r == 1).astype(np.float64),
        f"mrr@{k}": np.where(r <= k, 1.0 / np.maximum(r, 1.0), 0.0),
        f"r@{k}": (r <= k).astype(np.float64),
    }


def rank_metrics(scores: Any, gold: Any, k: int = 10) -> dict[str, float]:
    """Mean ``p@1``, ``mrr@k``, ``r@k`` and ``n_queries`` of a score matrix (pessimistic ties).

    An empty query set gives zeros (and ``n_queries`` 0).
    """
    per = per_query_metrics(gold_ranks(scores, gold), k)
    n = len(per["p@1"])
    out = {m: float(v.mean()) if n else 0.0 for m, v in per.items()}
    out["n_queries"] = n
    return out


# --------------------------------------------------------------------------- pools


def pool_windows(n: int, pool_size: int = DEFAULT_POOL_SIZE) -> list[tuple[slice, slice]]:
    """Pools that use every one of ``n`` aligned items as a query exactly once.

    Returns ``[(query_slice, doc_slice), ...]``. Consecutive pools of ``pool_size`` items are
    their own queries and documents; the remainder (``n % pool_size`` last items, when
    ``n > pool_size``) are queries ranked against the *last* ``pool_size`` items, so every
    query has exactly ``min(n, pool_size)`` candidates. ``n <= pool_size``: one pool of all.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if pool_size < 1:
        raise ValueError(f"pool_size must be >= 1, got {pool_size}")
    if n <= pool_size:
        return [(slice(0, n), slice(0, n))] if n else []
    out = [(slice(s, s + pool_size), slice(s, s + pool_size))
           for s in range(0, n - pool_size + 1, pool_size)]
    done = out[-1][0].stop
    if done < n:
        out.append((slice(done, n), slice(n - pool_size, n)))
    return out


def pooled_ranks(
    score_fn: Callable[[slice, slice], np.ndarray], n: int, pool_size: int | None
) -> np.ndarray:
    """Gold ranks of ``n`` aligned queries over :func:`pool_windows` (``None``: one pool of all).

    ``score_fn(query_slice, doc_slice)`` returns the score matrix of those queries against
    those documents; the gold of query ``i`` is document ``i``.
    """
    windows = pool_windows(n, n if pool_size is None else pool_size) if n else []
    ranks = np.zeros(n, dtype=np.int64)
    for qs, ds in windows:
        s = np.asarray(score_fn(qs, ds))
        gold = np.arange(qs.start, qs.stop) - ds.start
        ranks[qs] = gold_ranks(s, gold)
    return ranks


# --------------------------------------------------------------------------- floors


def chance_metrics(n_docs: int, k: int = 10) -> dict[str, float]:
    """Expected ``p@1``, ``mrr@k``, ``r@k`` of a uniformly random ranking of ``n_docs``."""
    if n_docs < 1:
        raise ValueError(f"n_docs must be >= 1, got {n_docs}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    m = min(k, n_docs)
    harmonic = float(np.sum(1.0 / np.arange(1, m + 1)))
    return {"p@1": 1.0 / n_docs, f"mrr@{k}": harmonic / n_docs, f"r@{k}": m / n_docs}


def chance_per_query(pool_sizes: Sequence[int], k: int = 10) -> dict[str, np.ndarray]:
    """Per-query chance expectations for queries whose pools have these sizes."""
    sizes = np.asarray(pool_sizes, dtype=np.int64)
    out: dict[str, list[float]] = {m: [] for m in ("p@1", f"mrr@{k}", f"r@{k}")}
    cache: dict[int, dict[str, float]] = {}
    for n in sizes.tolist():
        c = cache.setdefault(n, chance_metrics(n, k))
        for m in out:
            out[m].append(c[m])
    return {m: np.asarray(v, dtype=np.float64) for m, v in out.items()}


def pool_sizes(n: int, pool_size: int | None) -> np.ndarray:
    """Number of candidates of each of ``n`` queries under :func:`pool_windows`."""
    sizes = np.zeros(n, dtype=np.int64)
    for qs, ds in pool_windows(n, n if pool_size is None else pool_size) if n else []:
        sizes[qs] = ds.stop - ds.start
    return sizes


def _sklearn_tfidf() -> Any:
    try:
        from sklearn.feature_extraction.text import TfidfVectorizer
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(
            "the TF-IDF floor needs scikit-learn: pip install 'optical_kernels[distill]'"
        ) from e
    return TfidfVectorizer


def char_ngram_tfidf_scores(
    foreign: Sequence[str], english: Sequence[str], ngram_range: tuple[int, int] = (3, 5)
) -> Callable[[slice, slice], np.ndarray]:
    """Score function of the character n-gram TF-IDF floor, for :func:`pooled_ranks`.

    One ``TfidfVectorizer(analyzer="char_wb", ngram_range, lowercase=True, sublinear_tf=True)``
    is fitted on all texts of both sides of the evaluated set; the score of a query/document
    pair is the cosine of their (L2-normalised) vectors. It matches names, numbers and loan
    words shared by the two languages: the floor a trained encoder must clear.
    """
    if len(foreign) != len(english):
        raise ValueError(f"foreign and english must be aligned, got {len(foreign)} and "
                         f"{len(english)} texts")
    if len(foreign) == 0:
        return lambda qs, ds: np.zeros((0, 0))
    vec = _sklearn_tfidf()(analyzer="char_wb", ngram_range=ngram_range, lowercase=True,
                           sublinear_tf=True)
    vec.fit(list(foreign) + list(english))
    q = vec.transform(list(foreign))
    d = vec.transform(list(english))
    return lambda qs, ds: (q[qs] @ d[ds].T).toarray()


def encoder_scores(
    encode_queries: Callable[[list[str]], Any],
    encode_docs: Callable[[list[str]], Any],
    foreign: Sequence[str],
    english: Sequence[str],
) -> Callable[[slice, slice], np.ndarray]:
    """Score function of an encoder floor (cosine of embeddings), for :func:`pooled_ranks`.

    The hook for "a model on both sides": ``encode_queries(texts)`` and ``encode_docs(texts)``
    return [n, d] embeddings (numpy or torch; e.g. off-the-shelf e5-small with its
    ``"query: "`` prefix on both sides, or an untrained student against the teacher). Each side
    is encoded once; rows are L2-normalised here.
    """
    if len(foreign) != len(english):
        raise ValueError(f"foreign and english must be aligned, got {len(foreign)} and "
                         f"{len(english)} texts")

    def embed(fn: Callable[[list[str]], Any], texts: Sequence[str], name: str) -> np.ndarray:
        x = fn(list(texts))
        if hasattr(x, "detach"):  # a torch tensor
            x = x.detach().float().cpu().numpy()
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[0] != len(texts):
            raise ValueError(f"{name} must return [{len(texts)}, d] embeddings, got {x.shape}")
        norm = np.linalg.norm(x, axis=1, keepdims=True)
        return x / np.maximum(norm, 1e-12)

    q = embed(encode_queries, foreign, "encode_queries")
    d = embed(encode_docs, english, "encode_docs")
    return lambda qs, ds: q[qs] @ d[ds].T
