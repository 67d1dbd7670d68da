"""Per-sequence records of the energy monitor and the rolling statistics over a trailing window.

Position t of a record pairs, as :class:`mppm_ext.EnergyResult` does, the step *into* state t (log K_t)
with the uncertainty *of* state t (surprisal s_t = −log p(x_{t+1} | state t), entropy H_t). A record holds
only a sequence's real tokens (padding dropped), in order."""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

#: Per-token quantities recorded at every position (float64 arrays, NaN where undefined).
TOKEN_FEATURES = (
    "log_kinetic",        # log K_t, K_t = ½‖h_t − h_{t−1}‖² of the final post-norm state
    "surprisal",          # s_t = −log p(x_{t+1} | state t); NaN at the last position seen
    "entropy",            # H_t of the next-token distribution at state t
    "log_energy",         # log E_t = log K_t + s_t
    "delta_log_kinetic",  # |log K_t − log K_{t−1}|
    "state_norm",         # ‖h_t‖
    "cosine",             # cos(h_t, h_{t−1})
    "mahalanobis",        # (h_t − μ)ᵀ Σ⁻¹ (h_t − μ) against the calibration states; NaN before calibrate()
)
#: Rolling statistics over the trailing window of ``window`` positions ending at t (NaN until a full window).
ROLLING_FEATURES = ("rolling_mean_log_kinetic", "rolling_cv_log_kinetic", "rolling_corr_log_kinetic_surprisal")
FEATURES = TOKEN_FEATURES + ROLLING_FEATURES
#: The fewest finite values a window needs for its statistics.
MIN_FINITE = 3


@dataclass
class SequenceRecord:
    """One sequence the monitor saw. ``tokens`` ``[T]`` int64 (the input ids of its real positions);
    ``values[name]`` ``[T]`` float64 for every name in :data:`FEATURES`."""

    tokens: np.ndarray
    values: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.tokens.size)

    def __getitem__(self, name: str) -> np.ndarray:
        return self.values[name]


def rolling(values: np.ndarray, window: int) -> np.ndarray:
    """``[T, window]`` view of the trailing windows of ``values`` ``[T]`` (rows before a full window are
    NaN-padded on the left)."""
    padded = np.r_[np.full(window - 1, np.nan), values]
    return np.lib.stride_tricks.sliding_window_view(padded, window)


def rolling_statistics(log_kinetic: np.ndarray, surprisal: np.ndarray, window: int) -> dict:
    """Mean and CV (std / |mean|, population std) of log K and Pearson corr(log K, s) over the trailing
    window of each position, from the window's finite values (NaN with fewer than :data:`MIN_FINITE`)."""
    k = rolling(np.where(np.isfinite(log_kinetic), log_kinetic, np.nan), window)
    s = rolling(np.where(np.isfinite(surprisal), surprisal, np.nan), window)
    full = np.arange(log_kinetic.size) >= window - 1
    ok_k = np.isfinite(k)
    n_k = ok_k.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(ok_k, k, 0).sum(1) / n_k
        std = np.sqrt(np.where(ok_k, (k - mean[:, None]) ** 2, 0).sum(1) / n_k)
        cv = std / np.abs(mean)
        both = ok_k & np.isfinite(s)
        n = both.sum(1)
        mk = np.where(both, k, 0).sum(1) / n
        ms = np.where(both, s, 0).sum(1) / n
        dk, ds = np.where(both, k - mk[:, None], 0), np.where(both, s - ms[:, None], 0)
        corr = (dk * ds).sum(1) / np.sqrt((dk ** 2).sum(1) * (ds ** 2).sum(1))
    bad_k, bad = ~full | (n_k < MIN_FINITE), ~full | (n < MIN_FINITE)
    return {"rolling_mean_log_kinetic": np.where(bad_k, np.nan, mean),
            "rolling_cv_log_kinetic": np.where(bad_k, np.nan, cv),
            "rolling_corr_log_kinetic_surprisal": np.where(bad | ~np.isfinite(corr), np.nan, corr)}


def write_records(records: Sequence[SequenceRecord], path, extra_columns: dict | None = None) -> Path:
    """One row per (sequence, position): ``sequence``, ``position``, ``token`` and every feature, plus
    ``extra_columns`` (name -> list of per-sequence arrays). ``.parquet`` needs pyarrow; any other suffix
    writes CSV. Raises ValueError naming ``path`` when it cannot be written."""
    path = Path(path)
    columns = {"sequence": [], "position": [], "token": [], **{name: [] for name in FEATURES}}
    extra = dict(extra_columns or {})
    for name in extra:
        columns[name] = []
    for i, rec in enumerate(records):
        columns["sequence"].append(np.full(len(rec), i))
        columns["position"].append(np.arange(len(rec)))
        columns["token"].append(rec.tokens)
        for name in FEATURES:
            columns[name].append(rec.values[name])
        for name, arrays in extra.items():
            columns[name].append(np.asarray(arrays[i]))
    table = {k: (np.concatenate(v) if v else np.empty(0)) for k, v in columns.items()}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.table(table), path)
        else:
            with open(path, "w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(list(table))
                writer.writerows(zip(*(v.tolist() for v in table.values())))
    except OSError as err:
        raise ValueError(f"cannot write records to {str(path)!r}: {err.strerror or err}") from err
    return path
