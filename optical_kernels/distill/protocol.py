"""The experiment's evaluation protocol: which queries, which pools, which groups of rows.

(docs/experiment.md states the whole protocol; this module is its code.)

* **Bible test** (3,230 verses of Ruth, 1 Kings, Proverbs, Mark, Romans, Hebrews): every verse
  is a query, in two settings, ``bible-test/pool1000`` (pools of exactly 1,000 candidates,
  :func:`optical_kernels.distill.floors.pool_windows`) and ``bible-test/all`` (all 3,230
  verses are the candidates of every query). Rows per query group: ``all``, ``no-near-dup``
  (queries that are not near-duplicates of a training verse, :mod:`.near_duplicates`),
  ``near-dup``, and one per book (``book:Ruth`` ...; a book's queries keep the pools above).
* **UDHR** (``udhr``, paragraph level): each language is its own pool (all its ~50–60
  paragraphs). Rows: ``lang:<code>`` per language (``lang:nya``: the training language on
  out-of-domain text, kept out of the zero-shot groups) and ``bantu`` / ``non-bantu`` (all
  queries of the group's zero-shot languages pooled, each query weighing the same, each
  language ranked in its own pool).
* The dev split is for model selection only and appears in no row.

:func:`system_rows` turns a system (a function giving a score function per evaluation set and
seed) into result rows (:mod:`.results`) for every set and group.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import floors
from .data_udhr import TRAINING_LANGUAGE, language_group
from .results import make_row

BIBLE_TEST = "bible-test"
UDHR_SET = "udhr"
BOOK_NAMES: dict[int, str] = {8: "Ruth", 11: "1 Kings", 20: "Proverbs", 41: "Mark",
                              45: "Romans", 58: "Hebrews"}

ScoreFn = Callable[[slice, slice], np.ndarray]


@dataclass
class EvalSet:
    """One ranking problem: aligned texts, a pool size (``None``: one pool of all), groups.

    ``groups`` maps a row group name to a boolean mask over the queries.
    """

    name: str
    foreign: list[str]
    english: list[str]
    ids: list[str]
    pool_size: int | None
    groups: dict[str, np.ndarray] = field(default_factory=dict)
    lang: str = ""  # UDHR language code, "" for the Bible

    def __len__(self) -> int:
        return len(self.foreign)


def bible_test_sets(
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    pool_size: int = floors.DEFAULT_POOL_SIZE,
    limit: int | None = None,
) -> list[EvalSet]:
    """The two Bible test settings (pools of ``pool_size``, and the whole set) with groups."""
    from .data import book_of, load_bible_split, load_near_duplicate_ids

    test = load_bible_split("test", cache_dir, limit=limit)
    nd = load_near_duplicate_ids(cache_dir)
    ids = [p.id for p in test]
    near = np.array([i in nd for i in ids], dtype=bool)
    books = np.array([book_of(i) for i in ids])
    groups = {"all": np.ones(len(ids), dtype=bool), "no-near-dup": ~near, "near-dup": near}
    for b in sorted(set(books.tolist())):
        groups[f"book:{BOOK_NAMES.get(b, str(b))}"] = books == b
    fo, en = [p.foreign for p in test], [p.english for p in test]
    return [
        EvalSet(f"{BIBLE_TEST}/pool{pool_size}", fo, en, ids, pool_size, dict(groups)),
        EvalSet(f"{BIBLE_TEST}/all", fo, en, ids, None, dict(groups)),
    ]


def udhr_sets(
    cache_dir: str | os.PathLike[str] | None = None,
    languages: Sequence[str] | None = None,
) -> list[EvalSet]:
    """One :class:`EvalSet` per cached UDHR language (paragraph level, one pool each).

    ``languages`` defaults to every zero-shot language plus the training language; a language
    missing from the cache raises ``FileNotFoundError`` (run ``optical-kernels data``).
    """
    from .data_udhr import TRAINING_LANGUAGE, ZERO_SHOT_ALL, load_udhr

    langs = list(languages) if languages is not None else [*ZERO_SHOT_ALL, TRAINING_LANGUAGE]
    out = []
    for lang in langs:
        pairs = load_udhr(lang, cache_dir, build=False)
        out.append(EvalSet(f"{UDHR_SET}:{lang}", [p.foreign for p in pairs],
                           [p.english for p in pairs], [p.id for p in pairs], None,
                           {f"lang:{lang}": np.ones(len(pairs), dtype=bool)}, lang=lang))
    return out


def system_rows(
    *,
    cell: str,
    arm: str,
    kind: str,
    sets: Sequence[EvalSet],
    per_query_fn: Callable[[EvalSet, int], dict[str, np.ndarray]],
    seeds: Sequence[int] = (),
    analytic: bool = False,
    n_resamples: int = 10_000,
) -> list[dict[str, Any]]:
    """Result rows of one system on every set and group of the protocol.

    Args:
        cell, arm, kind: the row key (see :mod:`.results`).
        sets: from :func:`bible_test_sets` and :func:`udhr_sets`.
        per_query_fn: ``(eval_set, seed) -> {"p@1", "mrr@10", "r@10"}`` per-query arrays
            (e.g. :func:`per_query_from_scores`); called once per set and seed (``seed`` is
            ``-1`` for a system without seeds).
        seeds: training seeds (empty for a floor).
        analytic: rows hold expectations (chance): no interval.
    """
    seed_list = list(seeds) or [-1]
    rows: list[dict[str, Any]] = []
    udhr: dict[str, list[dict[str, np.ndarray]]] = {}
    for es in sets:
        per = [per_query_fn(es, s) for s in seed_list]
        stacked = {m: np.stack([p[m] for p in per]) for m in floors.METRICS}
        for group, mask in es.groups.items():
            if not mask.any():
                continue
            rows.append(make_row(
                cell=cell, arm=arm, kind=kind, eval_set=es.name.split(":")[0], group=group,
                per_query={m: v[:, mask] for m, v in stacked.items()}, seeds=seeds,
                analytic=analytic, n_resamples=n_resamples,
                extra={"pool_size": es.pool_size or len(es)}))
        if es.lang and es.lang != TRAINING_LANGUAGE:
            udhr.setdefault(language_group(es.lang), []).append(stacked)
    for group, parts in udhr.items():
        joined = {m: np.concatenate([p[m] for p in parts], axis=1) for m in floors.METRICS}
        rows.append(make_row(
            cell=cell, arm=arm, kind=kind, eval_set=UDHR_SET, group=group, per_query=joined,
            seeds=seeds, analytic=analytic, n_resamples=n_resamples,
            extra={"n_languages": len(parts)}))
    return rows


def per_query_from_scores(es: EvalSet, score_fn: ScoreFn) -> dict[str, np.ndarray]:
    """Per-query metrics of a score function over the set's pools (pessimistic ties)."""
    return floors.per_query_metrics(floors.pooled_ranks(score_fn, len(es), es.pool_size))


def chance_per_query(es: EvalSet) -> dict[str, np.ndarray]:
    """Per-query chance expectations of a set (its pools' sizes)."""
    return floors.chance_per_query(floors.pool_sizes(len(es), es.pool_size))
