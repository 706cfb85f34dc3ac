"""Rank metrics (pessimistic ties), pools and the floors of the experiment (floors.py)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from optical_kernels.distill import floors

HAS_SKLEARN = importlib.util.find_spec("sklearn") is not None
needs_sklearn = pytest.mark.skipif(not HAS_SKLEARN, reason="pip install scikit-learn")


# --------------------------------------------------------------------------- rank metrics


def test_gold_ranks_ties_are_pessimistic():
    s = np.array([
        [0.9, 0.1, 0.2],  # gold 0 alone on top: rank 1
        [0.5, 0.5, 0.1],  # gold 1 ties with doc 0: worst of the two, rank 2
        [0.3, 0.3, 0.3],  # all tie: rank 3 (a constant scorer is not perfect)
        [0.2, 0.8, 0.1],  # gold 2 below both: rank 3
    ])
    ranks = floors.gold_ranks(s, np.array([0, 1, 2, 2]))
    assert ranks.tolist() == [1, 2, 3, 3]
    m = floors.rank_metrics(s, np.array([0, 1, 2, 2]))
    assert m["p@1"] == pytest.approx(0.25)
    assert m["mrr@10"] == pytest.approx((1 + 1 / 2 + 1 / 3 + 1 / 3) / 4)
    assert m["r@10"] == 1.0 and m["n_queries"] == 4


def test_constant_scores_give_the_worst_rank():
    n = 20
    m = floors.rank_metrics(np.zeros((n, n)), np.arange(n))
    assert m["p@1"] == 0.0 and m["r@10"] == 0.0 and m["mrr@10"] == 0.0


def test_rank_metric_cutoff_k():
    ranks = np.array([1, 5, 10, 11, 200])
    per = floors.per_query_metrics(ranks, k=10)
    assert per["p@1"].tolist() == [1, 0, 0, 0, 0]
    assert per["r@10"].tolist() == [1, 1, 1, 0, 0]
    assert per["mrr@10"] == pytest.approx([1, 0.2, 0.1, 0, 0])
    assert set(floors.per_query_metrics(ranks, k=3)) == {"p@1", "mrr@3", "r@3"}


def test_rank_metrics_bad_input():
    with pytest.raises(ValueError, match="finite"):
        floors.gold_ranks(np.array([[np.nan, 1.0]]), np.array([0]))
    with pytest.raises(ValueError, match="gold"):
        floors.gold_ranks(np.zeros((2, 2)), np.array([0]))
    with pytest.raises(ValueError, match="gold"):
        floors.gold_ranks(np.zeros((2, 2)), np.array([0, 2]))
    with pytest.raises(TypeError, match="gold"):
        floors.gold_ranks(np.zeros((2, 2)), np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="scores"):
        floors.gold_ranks(np.zeros(3), np.array([0]))
    with pytest.raises(ValueError, match="k"):
        floors.per_query_metrics(np.array([1]), k=0)
    assert floors.rank_metrics(np.zeros((0, 3)), np.zeros(0, dtype=int))["n_queries"] == 0


def test_rank_metrics_match_ir_measures_with_ties():
    # trec_eval (pytrec_eval) breaks score ties by document id, descending: naming the gold
    # document "a" and the others "b…" puts it last among its ties, i.e. pessimistic ties.
    ir_measures = pytest.importorskip("ir_measures")
    from ir_measures import RR, P, R

    rng = np.random.default_rng(0)
    nq, nd = 40, 30
    scores = np.round(rng.random((nq, nd)), 1)  # coarse: many ties, gold ties included
    gold = rng.integers(0, nd, nq)
    names = [[("a" if j == gold[i] else f"b{j:03d}") for j in range(nd)] for i in range(nq)]
    qrels = [ir_measures.Qrel(f"q{i}", "a", 1) for i in range(nq)]
    run = [ir_measures.ScoredDoc(f"q{i}", names[i][j], float(scores[i, j]))
           for i in range(nq) for j in range(nd)]
    provider = ir_measures.providers.registry["pytrec_eval"]
    if not provider.is_available():
        pytest.skip("pytrec_eval provider not available")
    per = {(m.query_id, str(m.measure)): m.value
           for m in provider.iter_calc([P @ 1, RR, R @ 10], qrels, run)}
    ours = floors.gold_ranks(scores, gold)
    # per query: trec_eval's reciprocal rank (uncut; its RR@10 ignores the cut-off) is 1/rank
    assert [round(1 / per[(f"q{i}", "RR")]) for i in range(nq)] == ours.tolist()
    m = floors.rank_metrics(scores, gold)
    assert m["p@1"] == pytest.approx(np.mean([per[(f"q{i}", "P@1")] for i in range(nq)]))
    assert m["r@10"] == pytest.approx(np.mean([per[(f"q{i}", "R@10")] for i in range(nq)]))
    rr = np.array([per[(f"q{i}", "RR")] for i in range(nq)])
    assert m["mrr@10"] == pytest.approx(np.where(rr >= 0.1, rr, 0.0).mean())
    # the ties matter here: counting them in the query's favour would disagree
    optimistic = 1 + (scores > scores[np.arange(nq), gold][:, None]).sum(1)
    assert (optimistic == 1).mean() > m["p@1"]


# --------------------------------------------------------------------------- pools


@pytest.mark.parametrize("n,size", [(3230, 1000), (2000, 1000), (999, 1000), (1000, 1000),
                                    (7, 3), (1, 5)])
def test_pool_windows_use_every_query_once(n, size):
    windows = floors.pool_windows(n, size)
    covered = np.concatenate([np.arange(q.start, q.stop) for q, _ in windows])
    assert covered.tolist() == list(range(n))  # each query exactly once, in order
    for q, d in windows:
        assert d.stop - d.start == min(n, size)  # every query sees a full pool
        assert d.start <= q.start and q.stop <= d.stop  # its gold is among the candidates
    assert floors.pool_sizes(n, size).tolist() == [min(n, size)] * n


def test_pool_windows_3230():
    w = floors.pool_windows(3230, 1000)
    assert [(q.start, q.stop, d.start, d.stop) for q, d in w] == [
        (0, 1000, 0, 1000), (1000, 2000, 1000, 2000), (2000, 3000, 2000, 3000),
        (3000, 3230, 2230, 3230)]
    assert floors.pool_windows(0, 10) == []
    with pytest.raises(ValueError, match="pool_size"):
        floors.pool_windows(5, 0)


def test_pooled_ranks_match_direct_ranking():
    rng = np.random.default_rng(1)
    n, size = 23, 10
    full = rng.normal(size=(n, n))
    ranks = floors.pooled_ranks(lambda qs, ds: full[qs, ds], n, size)
    for q, d in floors.pool_windows(n, size):
        want = floors.gold_ranks(full[q, d], np.arange(q.start, q.stop) - d.start)
        assert ranks[q].tolist() == want.tolist()
    whole = floors.pooled_ranks(lambda qs, ds: full[qs, ds], n, None)
    assert whole.tolist() == floors.gold_ranks(full, np.arange(n)).tolist()


# --------------------------------------------------------------------------- floors


@pytest.mark.parametrize("n", [1, 5, 10, 50])
def test_chance_matches_random_rankings(n):
    c = floors.chance_metrics(n)
    assert c["p@1"] == pytest.approx(1 / n)
    assert c["r@10"] == pytest.approx(min(10, n) / n)
    # Monte Carlo: random scores (no ties) of the gold and the n - 1 other documents
    rng = np.random.default_rng(n)
    trials = 20000
    s = rng.random((trials, n))
    per = floors.per_query_metrics(floors.gold_ranks(s, np.zeros(trials, dtype=np.int64)))
    se = 4 / np.sqrt(trials)
    for m in floors.METRICS:
        assert abs(per[m].mean() - c[m]) < se, m
    with pytest.raises(ValueError, match="n_docs"):
        floors.chance_metrics(0)


def test_chance_per_query():
    per = floors.chance_per_query([1000, 1000, 230])
    assert per["p@1"] == pytest.approx([1e-3, 1e-3, 1 / 230])


@needs_sklearn
def test_char_ngram_tfidf_floor_matches_shared_strings():
    foreign = ["Yesu anapita ku Yerusalemu", "Davide ndi Solomo", "Mose anakwera phiri la Sinai"]
    english = ["Moses went up mount Sinai", "Jesus went to Jerusalem", "David and Solomon"]
    order = [1, 2, 0]  # english[order[i]] is the translation of foreign[i]
    english = [english[j] for j in order]
    fn = floors.char_ngram_tfidf_scores(foreign, english)
    ranks = floors.pooled_ranks(fn, 3, None)
    assert ranks.tolist() == [1, 1, 1]  # names shared by both sides
    # identical texts on both sides: every query finds its twin
    texts = [f"verse number {i} of the book" for i in range(50)]
    fn = floors.char_ngram_tfidf_scores(texts, texts)
    assert floors.pooled_ranks(fn, 50, 20).tolist() == [1] * 50
    with pytest.raises(ValueError, match="aligned"):
        floors.char_ngram_tfidf_scores(["a"], [])


def test_encoder_floor_hook():
    torch = pytest.importorskip("torch")
    texts = [f"t{i}" for i in range(12)]

    def one_hot(batch):
        return torch.eye(len(texts))[[texts.index(t) for t in batch]]

    fn = floors.encoder_scores(one_hot, one_hot, texts, texts)
    assert floors.pooled_ranks(fn, 12, 5).tolist() == [1] * 12
    # a constant encoder ties everything: pessimistic ranks, P@1 = 0
    const = floors.encoder_scores(lambda b: np.ones((len(b), 3)), lambda b: np.ones((len(b), 3)),
                                  texts, texts)
    assert floors.pooled_ranks(const, 12, 5).tolist() == [5] * 12
    with pytest.raises(ValueError, match="encode_docs"):
        floors.encoder_scores(one_hot, lambda b: np.ones((1, 3)), texts, texts)
