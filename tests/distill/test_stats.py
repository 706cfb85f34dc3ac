"""Bootstrap intervals over queries and seeds (stats.py), on synthetic data with known answers."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("scipy")

from optical_kernels.distill import stats  # noqa: E402


def test_ci_contains_the_mean_and_is_deterministic():
    rng = np.random.default_rng(0)
    hits = (rng.random(500) < 0.3).astype(float)
    a = stats.bootstrap_ci(hits, n_resamples=2000, seed=7)
    b = stats.bootstrap_ci(hits, n_resamples=2000, seed=7)
    c = stats.bootstrap_ci(hits, n_resamples=2000, seed=8)
    assert a == b and a != c
    assert a.estimate == pytest.approx(hits.mean())
    assert a.lo < a.estimate < a.hi
    # binomial standard error: the 95% half-width is about 1.96 * sqrt(p(1-p)/n)
    se = np.sqrt(hits.mean() * (1 - hits.mean()) / hits.size)
    assert (a.hi - a.lo) / 2 == pytest.approx(1.96 * se, rel=0.15)
    assert a.n_queries == 500 and a.n_seeds == 1 and a.as_list() == [a.lo, a.hi]


def test_ci_coverage_on_a_simulated_binomial():
    # 95% percentile intervals of P@1 over n=200 queries cover the true p in ~95% of trials.
    rng = np.random.default_rng(1)
    p, n, trials = 0.3, 200, 200
    covered = 0
    for t in range(trials):
        hits = (rng.random(n) < p).astype(float)
        ci = stats.bootstrap_ci(hits, n_resamples=1000, seed=t)
        covered += ci.lo <= p <= ci.hi
    assert 0.89 <= covered / trials <= 0.99


def test_identical_systems_difference_is_zero():
    rng = np.random.default_rng(2)
    a = (rng.random(300) < 0.4).astype(float)
    d = stats.paired_difference_ci(a, a.copy(), n_resamples=1000)
    assert d.estimate == 0 and d.lo == 0 and d.hi == 0 and not d.excludes_zero()


def test_exchangeable_systems_interval_contains_zero_and_is_symmetric():
    # two systems with the same success rate, independent per query
    rng = np.random.default_rng(3)
    a = (rng.random(2000) < 0.5).astype(float)
    b = (rng.random(2000) < 0.5).astype(float)
    d = stats.paired_difference_ci(a, b, n_resamples=4000, seed=0)
    assert d.lo < 0 < d.hi  # (true difference 0; this draw is one of the ~95% that cover it)
    assert (d.hi - d.estimate) == pytest.approx(d.estimate - d.lo, rel=0.2)
    swapped = stats.paired_difference_ci(b, a, n_resamples=4000, seed=0)
    assert swapped.estimate == pytest.approx(-d.estimate)
    assert swapped.lo == pytest.approx(-d.hi) and swapped.hi == pytest.approx(-d.lo)


def test_large_difference_excludes_zero_and_pairing_narrows_it():
    rng = np.random.default_rng(4)
    difficulty = rng.random(400)  # shared per-query difficulty: what pairing cancels
    a = (difficulty < 0.6).astype(float)
    b = (difficulty < 0.5).astype(float)  # b solves a subset of a's queries
    d = stats.paired_difference_ci(a, b, n_resamples=2000)
    assert d.excludes_zero() and d.lo > 0
    assert d.estimate == pytest.approx(a.mean() - b.mean())
    # an unpaired interval (independent resampling of each system) is much wider
    ia = stats.bootstrap_ci(a, n_resamples=2000, seed=1)
    ib = stats.bootstrap_ci(b, n_resamples=2000, seed=2)
    unpaired = np.hypot(ia.hi - ia.lo, ib.hi - ib.lo)
    assert d.hi - d.lo < 0.6 * unpaired


def test_seeds_are_averaged_per_query_before_resampling():
    rng = np.random.default_rng(5)
    per_seed = (rng.random((3, 250)) < 0.4).astype(float)
    ci = stats.bootstrap_ci(per_seed, n_resamples=1000, seed=0)
    same = stats.bootstrap_ci(per_seed.mean(axis=0), n_resamples=1000, seed=0)
    assert (ci.estimate, ci.lo, ci.hi) == (same.estimate, same.lo, same.hi)
    assert ci.n_seeds == 3 and same.n_seeds == 1
    # averaging seeds reduces the per-query noise: narrower than one seed's interval
    one = stats.bootstrap_ci(per_seed[0], n_resamples=1000, seed=0)
    assert ci.hi - ci.lo < one.hi - one.lo
    d = stats.paired_difference_ci(per_seed, per_seed[:2], n_resamples=500)
    assert d.n_seeds == 2


def test_degenerate_and_bad_input():
    zeros = np.zeros(50)
    ci = stats.bootstrap_ci(zeros, n_resamples=100, method="BCa")
    assert (ci.estimate, ci.lo, ci.hi) == (0.0, 0.0, 0.0)  # never NaN
    with pytest.raises(ValueError, match="empty"):
        stats.bootstrap_ci(np.zeros(0))
    with pytest.raises(ValueError, match="finite"):
        stats.bootstrap_ci(np.array([0.0, np.nan]))
    with pytest.raises(ValueError, match="same queries"):
        stats.paired_difference_ci(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="level"):
        stats.bootstrap_ci(zeros, level=1.5)
    with pytest.raises(ValueError, match="method"):
        stats.bootstrap_ci(zeros, method="normal")
    with pytest.raises(ValueError, match="n_resamples"):
        stats.bootstrap_ci(zeros, n_resamples=0)
    with pytest.raises(ValueError, match="per_query"):
        stats.bootstrap_ci(np.zeros((2, 2, 2)))
