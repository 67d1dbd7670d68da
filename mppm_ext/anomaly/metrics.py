"""Detection metrics in numpy: AUROC, AUPRC (average precision), TPR at a false-positive rate whose threshold
comes from calibration negatives, a document-level bootstrap, and a small L2-regularised logistic model.

Conventions: ``scores`` are float arrays where a larger score means "more anomalous"; ``labels`` are 0/1
(1 = anomalous). NaN scores are not allowed (the callers replace them before scoring)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np


def _check(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel()
    if s.shape != y.shape:
        raise ValueError(f"scores and labels must have the same length, got {s.size} and {y.size}")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 or 1")
    if np.isnan(s).any():
        raise ValueError("scores hold NaN")
    return s, y.astype(bool)


def _ranks(s: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their average rank (what the Mann-Whitney statistic needs)."""
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    # Start and end of each run of equal values; every member of a run gets the run's mean rank.
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_s)) + 1]
    ends = np.r_[starts[1:], s.size]
    mean_rank = (starts + ends + 1) / 2.0
    ranks = np.empty(s.size)
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def auroc(scores, labels) -> float:
    """Area under the ROC curve: P(score of a positive > score of a negative) + ½ P(tie), the
    Mann-Whitney U statistic over n₊·n₋. NaN when a class is empty."""
    return _auroc(*_check(scores, labels))


def _auroc(s: np.ndarray, y: np.ndarray) -> float:
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    r = _ranks(s)
    return float((r[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def auprc(scores, labels) -> float:
    """Average precision: Σ over distinct thresholds (descending) of (recall step) × precision, the
    step-wise area under the precision-recall curve (no interpolation). NaN without positives."""
    return _auprc(*_check(scores, labels))


def _auprc(s: np.ndarray, y: np.ndarray) -> float:
    n_pos = int(y.sum())
    if n_pos == 0:
        return float("nan")
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]  # last index of each block of tied scores
    tp = np.cumsum(y)[last]
    fp = (last + 1) - tp
    precision = tp / (tp + fp)
    recall_step = np.diff(np.r_[0, tp]) / n_pos
    return float((recall_step * precision).sum())


def threshold_at_fpr(negative_scores, fpr: float) -> float:
    """The smallest threshold τ such that at most ``fpr`` of ``negative_scores`` are > τ (flag: score > τ)."""
    neg = np.sort(np.asarray(negative_scores, dtype=np.float64).ravel())
    if neg.size == 0:
        raise ValueError("threshold_at_fpr needs at least one negative score")
    if not 0.0 <= fpr < 1.0:
        raise ValueError(f"fpr must be in [0, 1), got {fpr!r}")
    allowed = int(np.floor(fpr * neg.size))  # negatives that may lie above the threshold
    return float(neg[neg.size - 1 - allowed])


def tpr_at_threshold(scores, labels, threshold: float) -> tuple[float, float]:
    """(TPR, FPR) of the rule ``score > threshold``."""
    s, y = _check(scores, labels)
    flagged = s > threshold
    tpr = float(flagged[y].mean()) if y.any() else float("nan")
    fpr = float(flagged[~y].mean()) if (~y).any() else float("nan")
    return tpr, fpr


def detection_draws(scores, labels, threshold: float, indices: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(AUROC, AUPRC, TPR of ``score > threshold``) of all items ``[3]`` and of each resample in ``indices``
    ``[len(indices), 3]`` (checked once, then computed without re-validation)."""
    s, y = _check(scores, labels)

    def one(ss, yy):
        return (_auroc(ss, yy), _auprc(ss, yy), float((ss[yy] > threshold).mean()) if yy.any() else float("nan"))

    return np.array(one(s, y)), np.array([one(s[i], y[i]) for i in indices]).reshape(len(indices), 3)


def roc_curve(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) at every distinct threshold, from (0, 0) to (1, 1), for plotting."""
    s, y = _check(scores, labels)
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]
    tp = np.cumsum(y)[last]
    fp = (last + 1) - tp
    return np.r_[0.0, fp / max(1, (~y).sum())], np.r_[0.0, tp / max(1, y.sum())]


@dataclass(frozen=True)
class Interval:
    """A point estimate with a percentile bootstrap interval (``level`` e.g. 0.95) from ``reps`` resamples."""

    value: float
    low: float
    high: float
    level: float
    reps: int

    def as_dict(self) -> dict:
        return dict(value=self.value, low=self.low, high=self.high)


def bootstrap_indices(groups, *, reps: int = 1000, seed: int = 0) -> list[np.ndarray]:
    """``reps`` resamples over groups (documents): each draws as many groups as there are, with replacement,
    and keeps every item of a drawn group (as often as it is drawn). Returns index arrays into the items;
    sharing them between statistics gives paired intervals (e.g. of a difference of two AUROCs)."""
    g = np.asarray(groups)
    if g.size == 0:
        raise ValueError("bootstrap needs at least one item")
    uniq, inverse = np.unique(g, return_inverse=True)
    members = [np.flatnonzero(inverse == k) for k in range(uniq.size)]
    rng = np.random.default_rng(seed)
    return [np.concatenate([members[k] for k in rng.integers(0, uniq.size, uniq.size)]) for _ in range(reps)]


def interval(value: float, draws, level: float = 0.95) -> Interval:
    """Percentile interval of the bootstrap ``draws`` around ``value``; NaN draws (a resample without one
    class) are dropped, and their count lowers ``reps``."""
    d = np.asarray(draws, dtype=np.float64)
    d = d[~np.isnan(d)]
    if d.size == 0:
        return Interval(float(value), float("nan"), float("nan"), level, 0)
    lo, hi = np.quantile(d, [(1 - level) / 2, (1 + level) / 2])
    return Interval(float(value), float(lo), float(hi), level, int(d.size))


def bootstrap(statistic: Callable[[np.ndarray], float], groups, *, reps: int = 1000, level: float = 0.95,
              seed: int = 0) -> Interval:
    """Percentile bootstrap over groups (see :func:`bootstrap_indices`) of ``statistic``, which takes an
    index array into the items (repeats allowed) and returns a number."""
    indices = bootstrap_indices(groups, reps=reps, seed=seed)
    value = float(statistic(np.arange(np.asarray(groups).size)))
    return interval(value, [statistic(i) for i in indices], level)


class Logistic:
    """L2-regularised logistic regression on standardised inputs, fitted by Newton's method (IRLS).

    The inputs are standardised with the mean and std of the training data (kept, and applied at
    ``predict``); the penalty ``lam`` · ‖w‖² / 2 leaves the intercept free. Missing (NaN) inputs are set
    to the training mean, i.e. 0 after standardising.
    """

    def __init__(self, lam: float = 1.0, max_iter: int = 100, tol: float = 1e-10):
        if not lam >= 0:
            raise ValueError(f"lam must be >= 0, got {lam!r}")
        self.lam, self.max_iter, self.tol = float(lam), max_iter, tol
        self.mean: Optional[np.ndarray] = None
        self.std: Optional[np.ndarray] = None
        self.coef: Optional[np.ndarray] = None  # [k + 1]: intercept, then one weight per input
        self.iterations = 0

    def _design(self, x: np.ndarray) -> np.ndarray:
        z = (np.asarray(x, dtype=np.float64) - self.mean) / self.std
        return np.c_[np.ones(len(z)), np.nan_to_num(z, nan=0.0)]

    def fit(self, x, y) -> "Logistic":
        """``x`` ``[n, k]``, ``y`` ``[n]`` in {0, 1}."""
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        if x.ndim != 2 or len(x) != len(y) or len(y) == 0:
            raise ValueError(f"fit needs x [n, k] and y [n] with n > 0, got {x.shape} and {y.shape}")
        self.mean = np.nanmean(x, axis=0)
        std = np.nanstd(x, axis=0)
        self.std = np.where(np.isfinite(std) & (std > 0), std, 1.0)
        self.mean = np.nan_to_num(self.mean, nan=0.0)
        a = self._design(x)
        penalty = np.full(a.shape[1], self.lam)
        penalty[0] = 0.0
        w = np.zeros(a.shape[1])
        for self.iterations in range(1, self.max_iter + 1):
            p = 1.0 / (1.0 + np.exp(-(a @ w)))
            grad = a.T @ (p - y) + penalty * w
            hess = (a * (p * (1 - p))[:, None]).T @ a + np.diag(penalty) + 1e-12 * np.eye(a.shape[1])
            step = np.linalg.solve(hess, grad)
            w -= step
            if np.abs(step).max() < self.tol:
                break
        self.coef = w
        return self

    def decision(self, x) -> np.ndarray:
        """The log-odds ``[n]`` of the positive class."""
        if self.coef is None:
            raise RuntimeError("Logistic.decision before fit")
        return self._design(x) @ self.coef


__all__ = ["auroc", "auprc", "threshold_at_fpr", "tpr_at_threshold", "roc_curve", "Interval", "bootstrap",
           "bootstrap_indices", "interval", "detection_draws", "Logistic"]
