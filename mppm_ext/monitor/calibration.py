"""Reference distributions fitted on natural text, and per-token / per-window anomaly scores against them.

Per feature: z = (x − mean) / std of the calibration tokens and the two-sided empirical tail probability
p = min(1, 2 · min(#{ref ≤ x} + 1, #{ref ≥ x} + 1) / (n + 1)). A window score is the mean z over the
trailing window (rolling features are window statistics already: their own z). The anomaly score of a
position is the largest |window z| over the chosen features; its flag threshold is the (1 − fpr) quantile
of the same score over the calibration positions, so that a fraction ``fpr`` of natural positions is
flagged by construction (on the calibration text itself)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..anomaly.metrics import threshold_at_fpr
from .records import FEATURES, ROLLING_FEATURES, SequenceRecord, rolling

#: Features of the default anomaly score. The maximum over more features needs a higher threshold for the
#: same false-positive rate: with SmolLM2-135M, surprisal, entropy, log K, log E and the two rolling
#: statistics together flagged none of an injected instruction's windows at 1% FPR, where surprisal and
#: log E flagged 8 (README, "Energy monitor"); docs/anomaly/report.md measures what each feature adds.
DEFAULT_SCORE_FEATURES = ("surprisal", "log_energy")


def check_texts(texts, tokenizer, window: int) -> list[list[int]]:
    """Token ids of each text (no special tokens); ValueError for an empty list, a non-string or a text of
    fewer than ``window + 1`` tokens (naming its index and length)."""
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise TypeError(f"texts must be a list of strings, got {type(texts).__name__}")
    if len(texts) == 0:
        raise ValueError("texts is empty: give at least one natural text")
    out = []
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{i}] must be a string, got {type(text).__name__}")
        ids = list(tokenizer.encode(text, add_special_tokens=False))
        if len(ids) < window + 1:
            raise ValueError(f"texts[{i}] has {len(ids)} tokens, fewer than window + 1 = {window + 1}: the "
                             "rolling statistics need a full window and a next token")
        out.append(ids)
    return out


@dataclass
class Reference:
    """One feature's calibration distribution: its finite values, sorted, with their mean and std."""

    sorted_values: np.ndarray
    mean: float
    std: float

    def z(self, x: np.ndarray) -> np.ndarray:
        return (x - self.mean) / self.std

    def tail(self, x: np.ndarray) -> np.ndarray:
        n = self.sorted_values.size
        below = np.searchsorted(self.sorted_values, x, side="right")
        above = n - np.searchsorted(self.sorted_values, x, side="left")
        p = 2.0 * (np.minimum(below, above) + 1) / (n + 1)
        return np.where(np.isnan(x), np.nan, np.minimum(p, 1.0))


@dataclass
class Scored:
    """Scores of one sequence ``[T]``: ``z[name]``, ``tail[name]``, ``window_z[name]`` per feature,
    ``score`` (max |window z| over the features), ``flag`` (score > threshold) and the ``threshold``."""

    z: dict
    tail: dict
    window_z: dict
    score: np.ndarray
    flag: np.ndarray
    threshold: float


class Calibration:
    """Reference distributions of every feature (:data:`mppm_ext.monitor.records.FEATURES`) on natural text,
    and the calibration records themselves (for thresholds at a false-positive rate)."""

    def __init__(self, references: dict, records: list, window: int):
        self.references, self.records, self.window = references, records, window

    @classmethod
    def fit(cls, records: Sequence[SequenceRecord], window: int) -> "Calibration":
        refs = {}
        for name in FEATURES:
            x = np.concatenate([r.values[name] for r in records])
            x = np.sort(x[np.isfinite(x)])
            if x.size < 2:
                raise ValueError(f"calibration: feature {name!r} has {x.size} finite values; use more or longer texts")
            std = float(x.std())
            refs[name] = Reference(x, float(x.mean()), std if std > 0 else 1.0)
        return cls(refs, list(records), window)

    def _window_z(self, rec: SequenceRecord, features: Sequence[str]) -> tuple[dict, dict, dict]:
        z, tail, wz = {}, {}, {}
        for name in features:
            x = np.where(np.isfinite(rec.values[name]), rec.values[name], np.nan)
            z[name] = self.references[name].z(x)
            tail[name] = self.references[name].tail(x)
            if name in ROLLING_FEATURES:
                wz[name] = z[name]
            else:
                windows = rolling(z[name], self.window)
                with warnings.catch_warnings():  # all-NaN windows (before the first full one) are expected
                    warnings.simplefilter("ignore", RuntimeWarning)
                    mean = np.nanmean(windows, axis=1)
                wz[name] = np.where(np.arange(len(rec)) >= self.window - 1, mean, np.nan)
        return z, tail, wz

    def _score(self, wz: dict) -> np.ndarray:
        stacked = np.abs(np.stack(list(wz.values())))
        all_nan = np.isnan(stacked).all(0)
        return np.where(all_nan, np.nan, np.nanmax(np.where(np.isnan(stacked), -np.inf, stacked), axis=0))

    def threshold(self, features: Sequence[str] = DEFAULT_SCORE_FEATURES, fpr: float = 0.01) -> float:
        """The score above which a fraction ``fpr`` of the calibration positions lies."""
        scores = np.concatenate([self._score(self._window_z(r, features)[2]) for r in self.records])
        return threshold_at_fpr(scores[np.isfinite(scores)], fpr)

    def score(self, records: Sequence[SequenceRecord], *, features: Sequence[str] = DEFAULT_SCORE_FEATURES,
              fpr: float = 0.01) -> list[Scored]:
        """:class:`Scored` per record; flags at the calibration's false-positive rate ``fpr``."""
        unknown = [f for f in features if f not in self.references]
        if unknown or not features:
            raise ValueError(f"features must be a non-empty subset of {list(FEATURES)}, got {list(features)}")
        threshold = self.threshold(features, fpr)
        out = []
        for rec in records:
            z, tail, wz = self._window_z(rec, features)
            score = self._score(wz)
            out.append(Scored(z, tail, wz, score, np.nan_to_num(score, nan=-np.inf) > threshold, threshold))
        return out
