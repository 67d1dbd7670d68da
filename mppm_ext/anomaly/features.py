"""Text-level features of the benchmark, from the monitor's per-token records.

A detector does not know where a span is, so each per-token quantity is turned into text scores over
sliding windows of ``window`` positions: ``high`` = the largest window mean in the text, ``low`` = the
smallest, ``mean`` = the text's mean (rolling features are window statistics already: their largest and
smallest value). A single-feature detector uses ``high`` or ``−low``, whichever direction ranks the
calibration split better; the logistic models take all three of each of their features."""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np

from ..monitor.records import ROLLING_FEATURES, SequenceRecord, rolling

#: Candidate energy features (the question) and the baselines they are compared with.
CANDIDATES = ("log_kinetic", "delta_log_kinetic", "log_energy", "rolling_cv_log_kinetic",
              "rolling_corr_log_kinetic_surprisal")
BASELINES = ("surprisal", "entropy", "surprisal_z", "state_norm", "cosine", "mahalanobis")
SINGLE = BASELINES + CANDIDATES
#: Logistic models: name -> features. The verdict compares the second with the first.
LOGISTIC = {"logistic(s+H)": ("surprisal", "entropy"),
            "logistic(s+H+energy)": ("surprisal", "entropy") + CANDIDATES}
BASE_MODEL, COMBINED_MODEL = tuple(LOGISTIC)
LABELS = {"log_kinetic": "log K", "delta_log_kinetic": "|Δlog K|", "log_energy": "log E",
          "rolling_cv_log_kinetic": "window CV(log K)", "rolling_corr_log_kinetic_surprisal": "window corr(log K, s)",
          "surprisal": "surprisal s", "entropy": "entropy H", "surprisal_z": "z-scored s (within text)",
          "state_norm": "‖h‖", "cosine": "cos(h_t, h_t−1)", "mahalanobis": "Mahalanobis(h)",
          BASE_MODEL: "logistic(s, H)", COMBINED_MODEL: "logistic(s, H + energy)"}


def token_values(rec: SequenceRecord) -> dict:
    """The per-token arrays of every single feature; ``surprisal_z`` is the surprisal z-scored within its
    own text (its deviation from the text's typical surprisal)."""
    out = {name: rec.values[name] for name in SINGLE if name != "surprisal_z"}
    s = rec.values["surprisal"]
    std = np.nanstd(s)
    out["surprisal_z"] = (s - np.nanmean(s)) / (std if std > 0 else 1.0)
    return out


def window_scores(x: np.ndarray, window: int) -> tuple:
    """(high, low, mean) of one per-token array ``[T]`` as floats: the largest and smallest mean over the
    trailing windows of ``window`` positions that hold at least ``window // 2`` finite values, and the mean
    of the finite values (NaN where nothing is finite)."""
    x = np.where(np.isfinite(x), x, np.nan)
    with warnings.catch_warnings():  # windows with no finite value give NaN, handled by the callers
        warnings.simplefilter("ignore", RuntimeWarning)
        win = rolling(x, window)[window - 1:]
        w = np.where(np.isfinite(win).sum(1) >= max(1, window // 2), np.nanmean(win, 1), np.nan)
        return float(np.nanmax(w)), float(np.nanmin(w)), float(np.nanmean(x))


def aggregates(rec: SequenceRecord, window: int) -> dict:
    """name -> (high, low, mean) for every single feature of one text (NaN where nothing is finite); rolling
    features are window statistics already, so their high and low are their own extremes."""
    out = {}
    for name, x in token_values(rec).items():
        if name in ROLLING_FEATURES:
            x = np.where(np.isfinite(x), x, np.nan)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                out[name] = (np.nanmax(x), np.nanmin(x), np.nanmean(x))
        else:
            out[name] = window_scores(x, window)
    return out


def matrix(records: Sequence[SequenceRecord], window: int) -> dict:
    """name -> ``[n, 3]`` (high, low, mean) over ``records``."""
    rows = [aggregates(r, window) for r in records]
    return {name: np.array([row[name] for row in rows], dtype=np.float64) for name in SINGLE}


def fill(x: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """NaN entries replaced by the median of ``reference``'s finite values (a text too short or too flat
    for a window statistic scores as a typical calibration text)."""
    finite = reference[np.isfinite(reference)]
    return np.where(np.isfinite(x), x, np.median(finite) if finite.size else 0.0)
