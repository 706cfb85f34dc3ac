"""Near-duplicates of test verses in the training split (parallel passages across books).

The Bible split is by book, but some passages are repeated in other books (1 Kings 8:6 =
2 Chronicles 5:7; Kings/Chronicles, Psalms quoted in epistles, ...). A retrieval score on such
a test verse partly measures memorisation of its training twin. A test pair is a
*near-duplicate* when, on the training side,

* some training pair has the same English or the same foreign text (``kind = "exact"``;
  compared after whitespace collapsing and lower-casing), or
* some training English verse has word TF-IDF cosine >= ``threshold`` (0.8) with its English
  (``kind = "tfidf"``). The vectorizer (scikit-learn ``TfidfVectorizer``, word unigrams,
  lower-cased, ``sublinear_tf``) is fitted on the *training* English only, so the definition
  does not depend on the test set.

:func:`find_near_duplicates` returns one :class:`NearDuplicate` per flagged test pair (its
closest training twin); :func:`write_near_duplicates` / :func:`read_near_duplicates` store
the list as TSV (``build_data`` writes ``<cache>/data/bible/nya-eng.test.near_duplicates.tsv``).
Results are reported on all test queries and on the queries that are not near-duplicates.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from .bitext import BitextPair, atomic_write_text, clean_text

DEFAULT_THRESHOLD = 0.8
_HEADER = "# test_id\ttrain_id\tcosine\tkind"
_CHUNK = 512  # test rows per sparse product


class NearDuplicate(NamedTuple):
    """A flagged test pair, its closest training pair, their English cosine, and why."""

    test_id: str
    train_id: str
    cosine: float
    kind: str  # "exact" or "tfidf"


def _norm(text: str) -> str:
    return clean_text(text).lower()


def find_near_duplicates(
    test: Sequence[BitextPair],
    train: Sequence[BitextPair],
    *,
    threshold: float = DEFAULT_THRESHOLD,
) -> list[NearDuplicate]:
    """Test pairs with a training near-duplicate (see the module docstring), in test order.

    Args:
        test: the evaluated pairs.
        train: the training pairs (the vectorizer is fitted on their English side).
        threshold: minimum word TF-IDF cosine of the English sides, in (0, 1].

    Returns:
        ``[NearDuplicate(test_id, train_id, cosine, kind), ...]``; ``cosine`` is the TF-IDF
        cosine with the reported twin (an exact duplicate's twin is the first exact match).
    """
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    if not test or not train:
        return []
    try:
        from sklearn.feature_extraction.text import TfidfVectorizer
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(
            "near-duplicate detection needs scikit-learn: pip install 'optical_kernels[distill]'"
        ) from e
    vec = TfidfVectorizer(lowercase=True, sublinear_tf=True)
    tr = vec.fit_transform([p.english for p in train])
    te = vec.transform([p.english for p in test])
    best = np.zeros(len(test))
    arg = np.zeros(len(test), dtype=np.int64)
    for s in range(0, len(test), _CHUNK):
        sim = (te[s : s + _CHUNK] @ tr.T).toarray()
        arg[s : s + _CHUNK] = sim.argmax(axis=1)
        best[s : s + _CHUNK] = sim[np.arange(sim.shape[0]), arg[s : s + _CHUNK]]
    by_en: dict[str, int] = {}
    by_fo: dict[str, int] = {}
    for j, p in enumerate(train):
        by_en.setdefault(_norm(p.english), j)
        by_fo.setdefault(_norm(p.foreign), j)
    out = []
    for i, p in enumerate(test):
        j = by_en.get(_norm(p.english), by_fo.get(_norm(p.foreign)))
        if j is not None:
            cos = float((te[i] @ tr[j].T).toarray()[0, 0])
            out.append(NearDuplicate(p.id, train[j].id, round(cos, 4), "exact"))
        elif best[i] >= threshold:
            out.append(NearDuplicate(p.id, train[int(arg[i])].id, round(float(best[i]), 4),
                                     "tfidf"))
    return out


def write_near_duplicates(path: str | os.PathLike[str], items: Sequence[NearDuplicate]) -> int:
    """Write the list as TSV (atomic); returns the row count."""
    lines = [_HEADER] + [f"{d.test_id}\t{d.train_id}\t{d.cosine:.4f}\t{d.kind}" for d in items]
    atomic_write_text(path, "\n".join(lines) + "\n")
    return len(items)


def read_near_duplicates(path: str | os.PathLike[str]) -> list[NearDuplicate]:
    """Read a list written by :func:`write_near_duplicates`."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"near-duplicate list not found: {p} (run `optical-kernels data`)")
    out = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line or line.startswith("#"):
            continue
        f = line.split("\t")
        if len(f) != 4 or f[3] not in ("exact", "tfidf"):
            raise ValueError(f"{p}: line {n}: expected test_id, train_id, cosine, kind")
        out.append(NearDuplicate(f[0], f[1], float(f[2]), f[3]))
    return out


def summary(items: Sequence[NearDuplicate], n_test: int,
            threshold: float = DEFAULT_THRESHOLD) -> dict[str, Any]:
    """Counts for the manifest: ``{"n", "exact", "tfidf", "fraction", "threshold"}``."""
    exact = sum(d.kind == "exact" for d in items)
    return {
        "n": len(items),
        "exact": exact,
        "tfidf": len(items) - exact,
        "fraction": round(len(items) / n_test, 4) if n_test else 0.0,
        "threshold": threshold,
    }
