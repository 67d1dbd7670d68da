"""The findings report's plots, from the statistics of :mod:`.findings_report` (PNG, matplotlib).

- ``cv_bars.png``: per-window CV(E), CV(K), CV(PPL) and CV(log E) per model with their 95% intervals; a star
  marks a model whose CV(E) lies below both parts' CVs over the whole interval.
- ``logk_vs_surprisal.png``: log K against s per model (own axes, clipped to the 0.5-99.5% range), with r
  and a slope -1 line through the mean: what conservation of log E = log K + s would look like.
- ``sequence_<model>.png``: E's parts along one window, the window named in the title.
Earlier ``sequence_*.png`` of models this run did not scan are removed."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import intervals as I
from .output import read_tokens
from .report import SCATTER_POINTS, _pyplot, _slug, plot_sequence

BARS = (("energy", "CV(E)"), ("kinetic", "CV(K)"), ("ppl", "CV(PPL)"), ("log_energy", "CV(log E)"))


def plot_cv_bars(plt, r, path: Path) -> None:
    from matplotlib.ticker import LogLocator, FuncFormatter

    from .findings_report import _conserved

    models = sorted(r.models, key=lambda m: (not r.trained(m), m))
    x = np.arange(len(models))
    width = 0.8 / len(BARS)
    fig, ax = plt.subplots(figsize=(max(7, 1.1 * len(models) + 2), 5))
    lows = []
    for i, (name, label) in enumerate(BARS):
        pts = np.array([[*I.interval(r.get(m, f"seq_cv_{name}"))] for m in models])
        lows.append(np.nanmin(pts[:, 1]))
        err = np.abs(pts[:, 1:].T - pts[:, 0])
        ax.bar(x + (i - (len(BARS) - 1) / 2) * width, pts[:, 0], width, yerr=err, capsize=2, label=label)
    ax.set_yscale("log")
    bottom = 10 ** np.floor(np.log10(max(min(lows), 1e-6)))
    ax.set_ylim(bottom=bottom)
    ax.yaxis.set_major_locator(LogLocator(base=10))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    top = ax.get_ylim()[1]
    for xi, m in zip(x, models):
        if _conserved(r, m) == "yes":
            ax.plot(xi, top * 0.8, marker="*", color="k", ms=12)
    ax.plot([], [], marker="*", color="k", ls="", label="CV(E) below both parts (whole interval)")
    ax.set_xticks(x, [f"{m}\n({'trained' if r.trained(m) else 'random'})" for m in models], fontsize=7,
                  rotation=30, ha="right")
    ax.set_ylabel("per-window CV, mean over windows (log scale)")
    ax.set_title("Is E conserved? Per-window CV(E) against its parts' CVs\n"
                 "(bars: mean over windows; whiskers: 95% bootstrap intervals)", fontsize=10)
    ax.legend(fontsize=8, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _base_points(tokens: list[dict], model: str) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for tok in tokens:
        rows = (tok["model"] == model) & (tok["variant"] == "base") & tok["valid"] & (tok["kinetic"] > 0)
        xs.append(tok["surprisal"][rows])
        ys.append(tok["log_kinetic"][rows])
    return np.concatenate(xs), np.concatenate(ys)


def plot_scatter(plt, r, tokens: list[dict], path: Path) -> None:
    models = r.models
    cols = min(len(models), 3)
    rows_n = -(-len(models) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.2 * cols, 3.6 * rows_n), squeeze=False)
    rng = np.random.default_rng(0)
    for ax, model in zip(axes.flat, models):
        s, lk = _base_points(tokens, model)
        lo_s, hi_s = np.quantile(s, [0.005, 0.995])
        lo_k, hi_k = np.quantile(lk, [0.005, 0.995])
        idx = np.arange(s.size) if s.size <= SCATTER_POINTS else rng.choice(s.size, SCATTER_POINTS, replace=False)
        ax.scatter(s[idx], lk[idx], s=2, alpha=0.35)
        line = np.linspace(lo_s, hi_s, 2)
        ax.plot(line, lk.mean() + s.mean() - line, color="C3", lw=1, label="slope −1: log E constant")
        ax.set_xlim(lo_s, hi_s)
        ax.set_ylim(lo_k, hi_k)
        ax.set_title(f"{model}\nr = {np.corrcoef(s, lk)[0, 1]:.2f} (all corpora)", fontsize=8)
        ax.set_xlabel("surprisal s (nats)")
        ax.set_ylabel("log K")
        ax.legend(fontsize=6, loc="upper right")
    for ax in list(axes.flat)[len(models):]:
        ax.axis("off")
    fig.suptitle("log K against surprisal (0.5–99.5% range shown); conservation would put the cloud on the red line",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_plots(r, out: Path) -> list[tuple[str, Path]]:
    """Write the plots for run ``r`` into ``out``; returns (label, path) in report order."""
    plt = _pyplot()
    out.mkdir(parents=True, exist_ok=True)
    root = Path(r.run["_root"])
    tokens = [read_tokens(root / c) for c in r.corpora]
    written = [("Per-window CVs with intervals", out / "cv_bars.png"),
               ("log K against surprisal", out / "logk_vs_surprisal.png")]
    plot_cv_bars(plt, r, written[0][1])
    plot_scatter(plt, r, tokens, written[1][1])
    keep = set()
    for model in r.models:
        path = out / f"sequence_{_slug(model)}.png"
        plot_sequence(plt, tokens[0], model, path, corpus=r.corpora[0])
        keep.add(path.name)
        written.append((f"{model} along one window", path))
    for stale in out.glob("sequence_*.png"):
        if stale.name not in keep:
            stale.unlink()
    return written
