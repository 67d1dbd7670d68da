"""Corpus statistics from the per-token parts of many windows, in float64.

Two aggregates, always both (docs/definitions.md asks to say which): *pooled* treats every used position of every
window as one sample; *per-sequence* computes each window's figure and averages over the windows that have
at least two used positions. A position is used where the energy is defined and K > 0 (zero steps are
counted in ``zero_kinetic``)."""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import Tensor

from mppm_ext import STAT_QUANTITIES
from mppm_ext.parts import Parts, finish
from mppm_ext.results import EnergyResult

#: The two pairings of docs/definitions.md: the step into state t with the surprisal of state t ("same"), or
#: with the surprisal of the token x_t that caused it, s_{t-1} ("shifted").
PAIRINGS = ("same", "shifted")
QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
HISTOGRAM_BINS = 40


def paired(log_prob: Tensor, kinetic: Tensor, pairing: str) -> EnergyResult:
    """Every quantity from the parts ``[N, T]`` float64 (NaN where undefined) under ``pairing``, by the
    package's compiled finish (per-token quantities float32, per-window statistics from float64)."""
    if pairing == "shifted":
        shifted = torch.full_like(log_prob, float("nan"))
        shifted[:, 1:] = log_prob[:, :-1]
        log_prob = shifted
    elif pairing != "same":
        raise ValueError(f"pairing must be one of {PAIRINGS}, got {pairing!r}")
    return finish(Parts.where_not_nan(log_prob, kinetic))


def pooled_values(result: EnergyResult) -> dict[str, Tensor]:
    """Each STAT_QUANTITIES name -> 1-D float64 tensor of its values at the used positions."""
    used = result.valid & (result.kinetic > 0)
    values = {name: getattr(result, name)[used].double() for name in STAT_QUANTITIES if name != "ppl"}
    values["ppl"] = torch.exp(result.surprisal[used].double())
    return values


def _mean_cv(x: Tensor) -> tuple[float, float, float]:
    if x.numel() == 0:
        return math.nan, math.nan, math.nan
    mean = float(x.mean())
    std = float(x.std(unbiased=False))
    return mean, std, std / abs(mean) if mean != 0 else math.inf


def _corr(a: Tensor, b: Tensor) -> float:
    if a.numel() < 2:
        return math.nan
    a, b = a - a.mean(), b - b.mean()
    den = float(torch.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum()) / den if den > 0 else math.nan


def _nanmean(x: Tensor) -> float:
    x = x[~x.isnan()]
    return float(x.mean()) if x.numel() else math.nan


def summarize(log_prob: Tensor, kinetic: Tensor, pairing: str) -> tuple[dict, list[dict], list[dict]]:
    """One summary row and the distribution rows for the parts ``[N, T]`` float64 of N windows.

    Returns:
        (row, quantile_rows, histogram_rows). ``row`` has ``positions``, ``zero_kinetic``, ``windows``,
        for each quantity Q: ``pooled_mean_Q``, ``pooled_cv_Q``, ``seq_mean_Q``, ``seq_cv_Q`` (the average
        over windows of the per-window mean and CV), and ``pooled_corr`` / ``seq_corr`` of (log K, s).
    """
    result = paired(log_prob, kinetic, pairing)
    values = pooled_values(result)
    stats = result.stats
    multi = stats.count >= 2
    row = {"positions": int(stats.count.sum()), "zero_kinetic": int(stats.zero_kinetic.sum()),
           "windows": int(multi.sum())}
    for name in STAT_QUANTITIES:
        mean, _, cv = _mean_cv(values[name])
        row[f"pooled_mean_{name}"] = mean
        row[f"pooled_cv_{name}"] = cv
        row[f"seq_mean_{name}"] = _nanmean(stats.mean[name][multi])
        row[f"seq_cv_{name}"] = _nanmean(stats.cv[name][multi])
    row["pooled_corr"] = _corr(values["log_kinetic"], values["surprisal"])
    row["seq_corr"] = _nanmean(stats.corr_log_kinetic_surprisal[multi])
    return row, list(_quantile_rows(values)), list(_histogram_rows(values))


def _quantile_rows(values: dict[str, Tensor]) -> Iterable[dict]:
    q = torch.tensor(QUANTILES, dtype=torch.float64)
    for name, x in values.items():
        finite = x[x.isfinite()]
        found = torch.quantile(finite, q) if finite.numel() else torch.full_like(q, math.nan)
        for p, v in zip(QUANTILES, found.tolist()):
            yield {"quantity": name, "quantile": p, "value": v}


def _histogram_rows(values: dict[str, Tensor]) -> Iterable[dict]:
    # Bins span the 0.5%..99.5% range (E and PPL have tails that would squash everything into one bin);
    # the outer bins count what lies beyond.
    for name, x in values.items():
        x = x[x.isfinite()]
        if x.numel() == 0:
            continue
        lo, hi = torch.quantile(x, torch.tensor([0.005, 0.995], dtype=torch.float64)).tolist()
        if not hi > lo:
            hi = lo + 1.0
        counts = torch.histc(x.clamp(lo, hi), bins=HISTOGRAM_BINS, min=lo, max=hi)
        width = (hi - lo) / HISTOGRAM_BINS
        for i, c in enumerate(counts.tolist()):
            yield {"quantity": name, "bin_low": lo + i * width, "bin_high": lo + (i + 1) * width, "count": int(c)}
