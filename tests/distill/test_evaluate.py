"""Retrieval metrics: pessimistic ties, per-pool values, cross-checked against
sentence-transformers' InformationRetrievalEvaluator; the alignment helpers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from optical_kernels.distill.align import merge_pieces, merge_plan
from optical_kernels.distill.evaluate import gold_ranks, retrieval_metrics


def test_ties_count_against_the_query():
    # a collapsed encoder: every document scores the same -> the gold one is ranked last
    q = torch.ones(5, 3)
    d = torch.ones(5, 3)
    assert gold_ranks(q, d).tolist() == [5] * 5
    m = retrieval_metrics(q, d, pool_size=5)
    assert m["p@1"] == 0.0 and m["mrr@10"] == pytest.approx(0.2) and m["r@10"] == 1.0
    # query 0's gold document ties with document 2: rank 2, not 1 (the old rule said 1)
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    d = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    assert gold_ranks(q, d).tolist() == [2, 1, 3]
    assert retrieval_metrics(q, d)["p@1"] == pytest.approx(1 / 3)


def test_per_pool_and_overall():
    g = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(25, 8, generator=g), dim=-1)
    m = retrieval_metrics(x, x, pool_size=10)  # 2 pools of 10, the last 5 dropped
    assert m["n_pools"] == 2 and m["n_queries"] == 20 and len(m["pools"]) == 2
    assert m["p@1"] == 1.0 and all(p["p@1"] == 1.0 for p in m["pools"])
    y = F.normalize(x + 0.8 * torch.randn(25, 8, generator=g), dim=-1)
    m = retrieval_metrics(x, y, pool_size=10)
    for key in ("p@1", "mrr@10", "r@10"):
        assert m[key] == pytest.approx(sum(p[key] for p in m["pools"]) / 2)
    with pytest.raises(ValueError, match="empty set"):
        retrieval_metrics(torch.zeros(0, 3), torch.zeros(0, 3))


def test_matches_sentence_transformers_information_retrieval_evaluator(models, toy_mod):
    """Same model for queries and documents, distinct random sentences (no ties)."""
    from sentence_transformers.sentence_transformer.evaluation import (
        InformationRetrievalEvaluator,
    )

    from optical_kernels.distill.evaluate import encode

    student, _ = models
    pairs = list(dict(toy_mod.toy_pairs(60, seed=11)).items())[:40]
    foreign, english = [p[0] for p in pairs], [p[1] for p in pairs]
    ours = retrieval_metrics(encode(student, foreign), encode(student, english), pool_size=40)
    ev = InformationRetrievalEvaluator(
        queries={str(i): t for i, t in enumerate(foreign)},
        corpus={str(i): t for i, t in enumerate(english)},
        relevant_docs={str(i): {str(i)} for i in range(len(foreign))},
        accuracy_at_k=[1], precision_recall_at_k=[10], mrr_at_k=[10], ndcg_at_k=[10],
        map_at_k=[10], show_progress_bar=False, name="x",
    )
    theirs = ev(student)
    assert ours["p@1"] == pytest.approx(theirs["x_cosine_accuracy@1"], abs=1e-6)
    assert ours["mrr@10"] == pytest.approx(theirs["x_cosine_mrr@10"], abs=1e-6)
    assert ours["r@10"] == pytest.approx(theirs["x_cosine_recall@10"], abs=1e-6)
    assert 0 < ours["p@1"] < 1  # a non-trivial case


def test_wordpiece_and_sentencepiece_pieces_merge_into_words():
    assert merge_pieces(["pach", "##iy", "##ambi", "mulungu"]) == (
        ["pachiyambi", "mulungu"], [0, 0, 0, 1])
    assert merge_pieces(["\u2581Pach", "iyambi", "\u2581Mulungu"]) == (
        ["Pachiyambi", "Mulungu"], [0, 0, 1])
    plan = torch.arange(12.0).reshape(3, 4)
    merged = merge_plan(plan, [0, 0, 1], [0, 1, 1, 1])
    torch.testing.assert_close(merged, torch.tensor([[4.0, 24.0], [8.0, 30.0]]))
    assert merged.sum() == plan.sum()  # still a transport plan
