"""Bootstrap confidence intervals over queries (and seeds) for retrieval metrics.

The unit of resampling is the *query*: the experiment's test sets are fixed, and what varies
from one reader's replication to the next is which sentences were sampled as queries. A
system trained with several seeds contributes, per query, the mean of its seeds' values; the
queries are then resampled (with replacement) and the mean recomputed, so the interval covers
the query sampling of a seed-averaged system. (With 3 seeds a resampling of seeds as well
would say little; the seeds' own spread is reported next to the interval instead, see
:mod:`optical_kernels.distill.results`.)

* :func:`bootstrap_ci`: percentile interval of one system's mean (e.g. P@1).
* :func:`paired_difference_ci`: interval of ``mean(a) - mean(b)`` for two systems scored on
  the *same* queries, resampling the same query indices for both (paired bootstrap), which
  removes the between-query variance the two systems share.

Both are :func:`scipy.stats.bootstrap` (vectorised, in batches to bound memory) with
``method="percentile"`` by default, deterministic for a given ``seed``.
"""

from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

DEFAULT_RESAMPLES = 10_000
DEFAULT_LEVEL = 0.95
_METHODS = ("percentile", "basic", "BCa")
_BATCH = 500  # resamples per vectorised batch: 500 x n_queries float64 at a time


@dataclass(frozen=True)
class Interval:
    """A point estimate with its bootstrap interval ``[lo, hi]`` at confidence ``level``."""

    estimate: float
    lo: float
    hi: float
    level: float
    n_queries: int
    n_seeds: int
    n_resamples: int
    method: str

    def as_list(self) -> list[float]:
        """``[lo, hi]``."""
        return [self.lo, self.hi]

    def excludes_zero(self) -> bool:
        """Whether 0 lies outside ``[lo, hi]`` (a difference the data resolve)."""
        return self.lo > 0 or self.hi < 0

    def to_dict(self) -> dict[str, Any]:
        """Plain ``dict`` (JSON-serialisable)."""
        return asdict(self)


def seed_average(per_query: Any, name: str = "per_query") -> tuple[np.ndarray, int]:
    """``([n_queries] seed-averaged values, n_seeds)`` from a [n_queries] or [n_seeds, n_queries]
    array of per-query values."""
    x = np.asarray(per_query, dtype=np.float64)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2:
        raise ValueError(f"{name} must be [n_queries] or [n_seeds, n_queries], got {x.shape}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {x.shape}): nothing to bootstrap")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} must be finite (found NaN or inf)")
    return x.mean(axis=0), x.shape[0]


def _check(n_resamples: int, level: float, method: str) -> None:
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")


def _rng_kwargs(seed: int) -> dict[str, Any]:
    from scipy.stats import bootstrap

    # scipy >= 1.15 names the generator `rng`; older releases `random_state`.
    key = "rng" if "rng" in inspect.signature(bootstrap).parameters else "random_state"
    return {key: np.random.default_rng(seed)}


def _mean(x: np.ndarray, axis: int = -1) -> np.ndarray:
    return x.mean(axis=axis)


def _bootstrap_mean(x: np.ndarray, n_resamples: int, level: float, method: str,
                    seed: int) -> tuple[float, float]:
    from scipy.stats import bootstrap

    if np.ptp(x) == 0:
        # Every resample has the same mean; scipy's BCa would divide by zero.
        return float(x[0]), float(x[0])
    res = bootstrap((x,), _mean, n_resamples=n_resamples, batch=_BATCH, vectorized=True,
                    axis=-1, confidence_level=level, method=method, **_rng_kwargs(seed))
    lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise ValueError(f"bootstrap interval is not finite ({lo}, {hi}); try method='percentile'")
    return lo, hi


def bootstrap_ci(
    per_query: Any,
    *,
    n_resamples: int = DEFAULT_RESAMPLES,
    level: float = DEFAULT_LEVEL,
    seed: int = 0,
    method: str = "percentile",
) -> Interval:
    """Bootstrap interval of the mean of per-query values (e.g. P@1 hits), over queries.

    Args:
        per_query: [n_queries] values, or [n_seeds, n_queries] (averaged over seeds per query
            first, see the module docstring).
        n_resamples: bootstrap resamples.
        level: confidence level.
        seed: seed of the resampling (same inputs and seed -> same interval).
        method: ``"percentile"`` (default), ``"basic"`` or ``"BCa"`` (scipy's methods).
    """
    _check(n_resamples, level, method)
    x, n_seeds = seed_average(per_query)
    lo, hi = _bootstrap_mean(x, n_resamples, level, method, seed)
    return Interval(float(x.mean()), lo, hi, level, int(x.size), n_seeds, n_resamples, method)


def paired_difference_ci(
    a: Any,
    b: Any,
    *,
    n_resamples: int = DEFAULT_RESAMPLES,
    level: float = DEFAULT_LEVEL,
    seed: int = 0,
    method: str = "percentile",
) -> Interval:
    """Paired bootstrap interval of ``mean(a) - mean(b)`` over the same queries.

    ``a`` and ``b`` are per-query values of two systems on the same queries, in the same order:
    [n_queries] or [n_seeds, n_queries] each (the seed counts may differ; each is averaged
    over its seeds per query). ``n_seeds`` of the result is ``min`` of the two.
    """
    _check(n_resamples, level, method)
    x, sa = seed_average(a, "a")
    y, sb = seed_average(b, "b")
    if x.shape != y.shape:
        raise ValueError(f"a and b must cover the same queries, got {x.size} and {y.size}")
    # The mean difference is the mean of per-query differences, and a paired resampling
    # draws the same query indices for both systems: the bootstrap of x - y is exactly it.
    lo, hi = _bootstrap_mean(x - y, n_resamples, level, method, seed)
    return Interval(float(x.mean() - y.mean()), lo, hi, level, int(x.size), min(sa, sb),
                    n_resamples, method)
