"""Statistics of ``mppm steer-bench``: similarity–fluency curves, their Pareto frontier at a fluency
budget, and paired-bootstrap intervals of differences between methods (numpy, seeded).

A method's curve is the sequence of (mean fluency cost, mean similarity) points over the cases, one per
strength in increasing order, starting at the natural continuation (strength 0). The fluency cost is the
mean surprisal of the continuation under the judge model (nats per token); more is less fluent.

The frontier at budget F is the best similarity the polyline through those points reaches without its
cost exceeding F: the maximum over the points with cost <= F and over the crossings of F by the segments
between consecutive points (linear interpolation there). The natural point is on every curve, so the
frontier at a budget at or above the natural cost is at least the natural similarity; a method whose
weakest strength already costs more than F gets the interpolation between the natural point and that
strength's point (linearity between measured strengths is the one modelling assumption).
"""

from __future__ import annotations

import numpy as np


def frontier(cost: np.ndarray, sim: np.ndarray, budget: np.ndarray) -> np.ndarray:
    """Frontier similarity of curves at budgets.

    Args:
        cost, sim: ``[..., K]`` curve points in strength order (point 0 the natural continuation).
        budget: ``[...]`` or broadcastable: the largest allowed cost per curve.

    Returns:
        ``[...]`` float64; NaN where even point 0 costs more than the budget.
    """
    cost, sim = np.asarray(cost, dtype=np.float64), np.asarray(sim, dtype=np.float64)
    budget = np.asarray(budget, dtype=np.float64)[..., None]
    best = np.where(cost <= budget, sim, -np.inf).max(-1)
    x0, x1, y0, y1 = cost[..., :-1], cost[..., 1:], sim[..., :-1], sim[..., 1:]
    # A segment crosses the budget when exactly one end is within it; its value there is interpolated.
    crosses = (np.minimum(x0, x1) <= budget) & (budget < np.maximum(x0, x1))
    with np.errstate(invalid="ignore", divide="ignore"):
        y = y0 + (budget - x0) * (y1 - y0) / (x1 - x0)
    best = np.maximum(best, np.where(crosses, y, -np.inf).max(-1, initial=-np.inf))
    return np.where(np.isfinite(best), best, np.nan)


def resample_weights(n: int, resamples: int, seed: int) -> np.ndarray:
    """``[resamples, n]`` float64 weights of a case bootstrap (counts of each case in a resample of size n,
    divided by n), from numpy's PCG64 seeded with ``seed``."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(np.float64) / n


def curve_means(weights: np.ndarray, cost: np.ndarray, sim: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean curves under case weights ``[R, n]`` for per-case points ``[n, K]``: ``([R, K], [R, K])``."""
    return weights @ cost, weights @ sim


def interval(samples: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of bootstrap samples (NaNs dropped; NaN bounds when none is left)."""
    s = samples[np.isfinite(samples)]
    if s.size == 0:
        return float("nan"), float("nan")
    lo, hi = np.quantile(s, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def matched_difference(cost_a, sim_a, cost_b, sim_b, natural_cost, extra_costs, *, resamples: int = 2000,
                       seed: int = 0) -> list[dict]:
    """Frontier similarity of method A minus method B at budgets natural cost + each of ``extra_costs``,
    with paired-bootstrap 95% intervals.

    Args:
        cost_a, sim_a, cost_b, sim_b: ``[n, K_a]`` / ``[n, K_b]`` per-case curve points of the two methods on
            the same n cases (column 0: the natural continuation).
        natural_cost: ``[n]`` the natural continuation's cost per case (the budget's origin).
        extra_costs: the budgets above the natural mean cost, nats per token.

    Each resample draws n cases with replacement (the same draw for both methods: paired), recomputes
    both mean curves and the natural mean cost, and takes the frontier difference at each budget.
    Returns one dict per budget: extra_cost, a, b, difference (on all cases) and low, high (the interval).
    """
    n = len(natural_cost)
    weights = np.vstack([np.full((1, n), 1.0 / n), resample_weights(n, resamples, seed)])
    ca, sa = curve_means(weights, np.asarray(cost_a), np.asarray(sim_a))
    cb, sb = curve_means(weights, np.asarray(cost_b), np.asarray(sim_b))
    origin = weights @ np.asarray(natural_cost, dtype=np.float64)
    out = []
    for extra in extra_costs:
        fa, fb = frontier(ca, sa, origin + extra), frontier(cb, sb, origin + extra)
        lo, hi = interval((fa - fb)[1:])
        out.append(dict(extra_cost=float(extra), a=float(fa[0]), b=float(fb[0]), difference=float(fa[0] - fb[0]),
                        low=lo, high=hi))
    return out


def call(low: float, high: float) -> str:
    """'higher' / 'lower' when the interval excludes 0, 'indistinguishable' otherwise (or when undefined)."""
    if low > 0:
        return "higher"
    if high < 0:
        return "lower"
    return "indistinguishable"


def verdict(calls: list[str]) -> str:
    """One word over the budgets: 'dominates' (higher at every budget), 'loses' (lower at every one),
    'matches' (indistinguishable at every one), else 'mixed'."""
    if calls and all(c == "higher" for c in calls):
        return "dominates"
    if calls and all(c == "lower" for c in calls):
        return "loses"
    if calls and all(c == "indistinguishable" for c in calls):
        return "matches"
    return "mixed"


__all__ = ["frontier", "resample_weights", "curve_means", "interval", "matched_difference", "call", "verdict"]
