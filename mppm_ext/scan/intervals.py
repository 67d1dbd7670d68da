"""Bootstrap intervals for the findings report, from the per-token table a scan wrote (``tokens.parquet``).

The resampling unit is the window: windows are the sequences the model read, positions inside one are not
independent. A replicate draws each corpus's windows with replacement (stratified: the corpora keep their
sizes), so a statistic pooled over corpora has an interval too. Every statistic is a function of per-window
sufficient statistics (counts, centred sums, per-window figures), so a replicate is a matrix product with a
[replicates, windows] count matrix: 1,000 replicates of every statistic of a model cost a few milliseconds.

Two aggregates, as in :mod:`mppm_ext.scan.stats`: *pooled* treats every used position of every window as
one sample (its CVs of heavy-tailed quantities grow with the sample, see the report); *per-window* ("seq")
computes each window's figure and averages over the windows with at least two used positions. Used
positions: log p and K finite and K > 0; "drop_first" also leaves out the first DROP_FIRST steps of each
window (t = 1..DROP_FIRST, where the state leaves the first token's attention-sink state)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import numpy as np

#: Replicates per interval, and the interval's coverage.
REPLICATES = 1000
LEVEL = 0.95
#: Positions t = 1..DROP_FIRST (the steps out of the first states) are left out in the "drop_first" rows.
DROP_FIRST = 4
#: 1.4826 * MAD estimates the std of a normal sample: the robust CV is comparable to the usual one.
MAD_SCALE = 1.4826
#: Quantities with a CV (each from log p and K at the used positions).
QUANTITIES = ("energy", "kinetic", "ppl", "surprisal", "log_kinetic", "log_energy", "additive_energy",
              "log_lagrangian")
#: With the entropy kept (scans since it is): H itself and the energy with H as the potential, log K + H.
ENTROPY_QUANTITIES = ("entropy", "log_energy_entropy")
#: Quantities that are positive by construction: their CV is always defined.
POSITIVE = ("energy", "kinetic", "ppl", "surprisal")
#: The CV of a quantity that takes both signs is undefined when its |mean| is below std / UNDEFINED_CV, i.e.
#: when the CV would exceed UNDEFINED_CV: then the mean is an offset inside the spread, not a scale.
UNDEFINED_CV = 2.0


def quantities(log_prob: np.ndarray, kinetic: np.ndarray) -> dict[str, np.ndarray]:
    """Every quantity from the parts (any shape, float64). Where K = 0 or a part is NaN the logs are
    -inf/NaN; the caller masks them out."""
    s = -log_prob
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        log_k = np.log(kinetic)
        return {"energy": np.exp(log_k + s), "kinetic": kinetic, "ppl": np.exp(s), "surprisal": s,
                "log_kinetic": log_k, "log_energy": log_k + s, "additive_energy": kinetic + log_prob,
                "log_lagrangian": log_k - s}


@dataclass(frozen=True)
class Group:
    """One (model, variant) of one corpus as [windows, T] arrays (NaN-padded); ``used`` [windows, T].
    ``entropy``: H of the prediction that log p scores (None for scans written before it was kept)."""

    log_prob: np.ndarray
    kinetic: np.ndarray
    t: np.ndarray
    tokens: np.ndarray  # int64, -1 padding
    entropy: Optional[np.ndarray] = None

    def shifted(self) -> "Group":
        """The other pairing: K_t with the surprisal of the token x_t, s_(t-1)."""
        lp = np.full_like(self.log_prob, np.nan)
        lp[:, 1:] = self.log_prob[:, :-1]
        ent = None
        if self.entropy is not None:
            ent = np.full_like(self.entropy, np.nan)
            ent[:, 1:] = self.entropy[:, :-1]
        return Group(lp, self.kinetic, self.t, self.tokens, ent)

    def used(self, drop_first: bool = False) -> np.ndarray:
        ok = np.isfinite(self.log_prob) & np.isfinite(self.kinetic) & (self.kinetic > 0)
        return ok & (self.t > DROP_FIRST) if drop_first else ok


def groups(tokens: dict[str, np.ndarray]) -> dict[tuple[str, str], Group]:
    """(model, variant) -> Group from a token table (``output.read_tokens``)."""
    out = {}
    keys = np.char.add(np.char.add(tokens["model"].astype(str), "\t"), tokens["variant"].astype(str))
    for key in dict.fromkeys(keys.tolist()):
        rows = keys == key
        window = tokens["window"][rows]
        t = tokens["t"][rows].astype(np.int64)
        codes, row = np.unique(window, return_inverse=True)
        shape = (codes.size, int(t.max()) + 1)
        lp, kin = np.full(shape, np.nan), np.full(shape, np.nan)
        toks = np.full(shape, -1, dtype=np.int64)
        lp[row, t] = tokens["log_prob"][rows]
        kin[row, t] = tokens["kinetic"][rows]
        toks[row, t] = tokens["token"][rows]
        ent = None
        if "entropy" in tokens:
            ent = np.full(shape, np.nan)
            ent[row, t] = tokens["entropy"][rows]
        tt = np.broadcast_to(np.arange(shape[1]), shape)
        model, variant = key.split("\t")
        out[(model, variant)] = Group(lp, kin, tt, toks, ent)
    return out


def counts(n_windows: int, replicates: int, seed: Sequence[int]) -> np.ndarray:
    """[replicates + 1, n_windows] float64 resampling counts; row 0 is the sample itself (all ones)."""
    rng = np.random.default_rng(list(seed))
    draws = rng.integers(0, n_windows, size=(replicates, n_windows))
    c = np.zeros((replicates + 1, n_windows))
    c[0] = 1.0
    np.add.at(c, (np.repeat(np.arange(1, replicates + 1), n_windows), draws.ravel()), 1.0)
    return c


def _window_figures(x: np.ndarray, used: np.ndarray) -> dict[str, np.ndarray]:
    """Per-window n, centred sums, mean, std, CV, median-based robust CV of ``x`` [N, T] at ``used``."""
    n = used.sum(1).astype(np.float64)
    xm = np.where(used, x, np.nan)
    centre = np.nanmean(xm) if used.any() else 0.0
    d = np.where(used, x - centre, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # windows with no used position: NaN medians
        mean = d.sum(1) / n + centre
        std = np.sqrt(np.maximum((d * d).sum(1) / n - (d.sum(1) / n) ** 2, 0.0))
        med = np.nanmedian(xm, axis=1) if used.any() else np.full(x.shape[0], np.nan)
        mad = np.nanmedian(np.abs(xm - med[:, None]), axis=1) if used.any() else med
        return {"n": n, "s1": d.sum(1), "s2": (d * d).sum(1), "centre": np.float64(centre), "mean": mean,
                "std": std, "cv": std / np.abs(mean), "rcv": MAD_SCALE * mad / np.abs(med)}


def _seq(c: np.ndarray, figure: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """Average over windows (weighted by the replicate counts) of a per-window figure where ``ok``."""
    f = np.where(ok, figure, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (c @ f) / (c @ ok.astype(np.float64))


def statistics(parts: Sequence[tuple[Group, np.ndarray]], *, drop_first: bool = False) -> dict[str, np.ndarray]:
    """Each statistic -> [replicates + 1] values (index 0: the sample) for the windows of one or more
    corpora, each given as (group, its resampling counts [R + 1, N])."""
    stacked: dict[str, list] = {}
    c_all = np.concatenate([c for _, c in parts], axis=1)
    names = QUANTITIES + (ENTROPY_QUANTITIES if all(g.entropy is not None for g, _ in parts) else ())
    for group, _ in parts:
        used = group.used(drop_first)
        q = quantities(group.log_prob, group.kinetic)
        if group.entropy is not None:
            q["entropy"] = group.entropy
            q["log_energy_entropy"] = q["log_kinetic"] + group.entropy
        for name in names:
            for k, v in _window_figures(q[name], used).items():
                stacked.setdefault(f"{name}:{k}", []).append(np.broadcast_to(v, used.shape[:1]) if k == "centre"
                                                             else v)
        # Cross term of (log K, s) for the correlations, centred like the parts.
        a = np.where(used, q["log_kinetic"], 0.0)
        b = np.where(used, q["surprisal"], 0.0)
        ca = np.nanmean(np.where(used, q["log_kinetic"], np.nan)) if used.any() else 0.0
        cb = np.nanmean(np.where(used, q["surprisal"], np.nan)) if used.any() else 0.0
        stacked.setdefault("cross", []).append(np.where(used, (a - ca) * (b - cb), 0.0).sum(1))
        stacked.setdefault("ca", []).append(np.full(used.shape[0], ca))
        stacked.setdefault("cb", []).append(np.full(used.shape[0], cb))
    w = {k: np.concatenate(v) for k, v in stacked.items()}
    out: dict[str, np.ndarray] = {}
    n = c_all @ w["energy:n"]
    multi = w["energy:n"] >= 2
    moments = {}
    for name in names:
        # Pooled moments about each corpus's own centre: shift to a common one (the first corpus's).
        shift = w[f"{name}:centre"] - w[f"{name}:centre"][0]
        s1 = w[f"{name}:s1"] + shift * w[f"{name}:n"]
        s2 = w[f"{name}:s2"] + 2 * shift * w[f"{name}:s1"] + shift ** 2 * w[f"{name}:n"]
        with np.errstate(invalid="ignore", divide="ignore"):
            m1 = (c_all @ s1) / n
            var = np.maximum((c_all @ s2) / n - m1 ** 2, 0.0)
        mean = m1 + w[f"{name}:centre"][0]
        moments[name] = (m1, var)
        out[f"pooled_mean_{name}"] = mean
        out[f"pooled_std_{name}"] = np.sqrt(var)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[f"pooled_cv_{name}"] = np.sqrt(var) / np.abs(mean)
        for fig in ("mean", "std", "cv", "rcv"):
            out[f"seq_{fig}_{name}"] = _seq(c_all, w[f"{name}:{fig}"], multi & np.isfinite(w[f"{name}:{fig}"]))
    # Pooled corr(log K, s): the cross sums about each corpus's centres, moved to the common centres.
    da, db = w["ca"] - w["ca"][0], w["cb"] - w["cb"][0]
    ka, kb = w["log_kinetic:s1"], w["surprisal:s1"]
    cross = w["cross"] + da * kb + db * ka + da * db * w["energy:n"]
    with np.errstate(invalid="ignore", divide="ignore"):
        cov = (c_all @ cross) / n - moments["log_kinetic"][0] * moments["surprisal"][0]
        out["pooled_corr"] = cov / np.sqrt(moments["log_kinetic"][1] * moments["surprisal"][1])
        sa, sb = w["log_kinetic:std"], w["surprisal:std"]
        corr_w = (w["cross"] / w["energy:n"] - (ka / w["energy:n"]) * (kb / w["energy:n"])) / (sa * sb)
    out["seq_corr"] = _seq(c_all, corr_w, multi & np.isfinite(corr_w))
    # Offset-free: std(log E) against what it would be were log K and s independent.
    for agg in ("pooled", "seq"):
        sk, ss, se = (out[f"{agg}_std_{q}"] for q in ("log_kinetic", "surprisal", "log_energy"))
        with np.errstate(invalid="ignore", divide="ignore"):
            out[f"{agg}_std_ratio"] = se / np.sqrt(sk ** 2 + ss ** 2)
            out[f"{agg}_log_margin"] = se - np.minimum(sk, ss)
            out[f"{agg}_margin"] = out[f"{agg}_cv_energy"] - np.minimum(out[f"{agg}_cv_kinetic"],
                                                                         out[f"{agg}_cv_ppl"])
            if "entropy" in names:  # the same comparison with the entropy as the potential
                sh, seh = out[f"{agg}_std_entropy"], out[f"{agg}_std_log_energy_entropy"]
                out[f"{agg}_std_ratio_entropy"] = seh / np.sqrt(sk ** 2 + sh ** 2)
    out["positions"] = n
    out["windows"] = c_all @ multi.astype(np.float64)
    return out


def interval(values: np.ndarray) -> tuple[float, float, float]:
    """(point, low, high): the sample's value and the percentile interval of the replicates."""
    reps = values[1:][np.isfinite(values[1:])]
    if reps.size == 0:
        return float(values[0]), float("nan"), float("nan")
    lo, hi = np.quantile(reps, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    return float(values[0]), float(lo), float(hi)


def cv_defined(stats: dict[str, np.ndarray], name: str, agg: str = "seq") -> bool:
    """The rule of :data:`UNDEFINED_CV` (always True for the positive quantities)."""
    return name in POSITIVE or bool(stats[f"{agg}_cv_{name}"][0] <= UNDEFINED_CV)


def dominance(group: Group) -> dict[str, float]:
    """Which positions carry the spread of K and E: the share of their sum of squared deviations (pooled)
    at t = 1 and at the top 1% of positions, and log K's median and 99th percentile."""
    used = group.used()
    q = quantities(group.log_prob, group.kinetic)
    out = {}
    for name in ("kinetic", "energy"):
        x = q[name][used]
        dev = (x - x.mean()) ** 2
        total = dev.sum()
        first = ((q[name] - x.mean()) ** 2)[used & (group.t == 1)].sum()
        top = np.sort(dev)[::-1][:max(1, x.size // 100)].sum()
        out[f"{name}_share_t1"] = float(first / total) if total > 0 else float("nan")
        out[f"{name}_share_top1pct"] = float(top / total) if total > 0 else float("nan")
    lk = q["log_kinetic"][used]
    out["log_kinetic_median"], out["log_kinetic_p99"] = (float(v) for v in np.quantile(lk, [0.5, 0.99]))
    return out


def coverage_mask(group: Group, heldout: Optional[Iterable[int]]) -> np.ndarray:
    """[N, T]: positions whose token x_t and previous token x_(t-1) both have a held-out mean (the token-mean
    control subtracts b[x_t] and b[x_(t-1)] from the two states of the step K_t)."""
    ids = np.asarray(sorted(heldout or ()), dtype=np.int64)
    seen = np.isin(group.tokens, ids) & (group.tokens >= 0)
    prev = np.zeros_like(seen)
    prev[:, 1:] = seen[:, :-1]
    return seen & prev


def restricted(group: Group, mask: np.ndarray) -> Group:
    """``group`` with the positions outside ``mask`` removed (their K set to NaN)."""
    return Group(group.log_prob, np.where(mask, group.kinetic, np.nan), group.t, group.tokens, group.entropy)
