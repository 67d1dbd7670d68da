"""``mppm report DIR``: PNG plots and ``report.md`` from the files a scan wrote (no model runs here).

Plots: each model's energy and parts along its first window; log K against surprisal, pooled; CV bars of
E, K and PPL per model, trained beside random (the parts' CVs are the baselines E must beat)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from ._optional import require
from .output import MARKDOWN_COLUMNS, markdown_table, read_csv, read_tokens

LABELS = {"energy": "CV(E)", "kinetic": "CV(K)", "ppl": "CV(PPL)", "log_energy": "CV(log E)"}
#: Points per model in the scatter plot (a random subsample beyond this: the PNG stays small).
SCATTER_POINTS = 4000


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in label)


def _pyplot():
    matplotlib = require("matplotlib", "plots", "mppm report (PNG plots)")
    matplotlib.use("Agg")  # files only; no display is needed or wanted
    import matplotlib.pyplot as plt

    return plt


def _base(tokens: dict, model: str) -> np.ndarray:
    return (tokens["model"] == model) & (tokens["variant"] == "base")


def plot_sequence(plt, tokens: dict, model: str, path: Path, corpus: str = "") -> None:
    """Energy and its parts along the model's first scanned window (base state, "same" pairing); the title
    names the window (corpus, window index, document, token span)."""
    rows = _base(tokens, model)
    window = tokens["window"][rows].min()
    first = rows & (tokens["window"] == window)
    t = tokens["t"][first]
    fig, axes = plt.subplots(4, 1, figsize=(9, 8), sharex=True)
    for ax, name, label in zip(axes, ("log_energy", "log_kinetic", "surprisal", "log_lagrangian"),
                               ("log E = log K + s", "log K", "surprisal s (nats)", "ℓ = log K − s")):
        ax.plot(t, tokens[name][first], lw=0.9)
        ax.set_ylabel(label, fontsize=8)
    axes[-1].set_xlabel("position t in the window")
    span = tokens["position"][first]
    axes[0].set_title(f"{model}: {'corpus ' + corpus + ', ' if corpus else ''}window {int(window)} (document "
                      f"{int(tokens['document'][first][0])}, tokens {int(span.min())}–{int(span.max())})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_scatter(plt, tokens: dict, models: list[str], path: Path) -> None:
    """log K against surprisal at the used positions, one panel per model."""
    cols = min(len(models), 3)
    rows_n = -(-len(models) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4 * cols, 3.4 * rows_n), squeeze=False)
    rng = np.random.default_rng(0)
    for ax, model in zip(axes.flat, models):
        used = _base(tokens, model) & tokens["valid"] & np.isfinite(tokens["log_kinetic"])
        idx = np.flatnonzero(used)
        if idx.size > SCATTER_POINTS:
            idx = rng.choice(idx, SCATTER_POINTS, replace=False)
        ax.scatter(tokens["surprisal"][idx], tokens["log_kinetic"][idx], s=2, alpha=0.4)
        ax.set_title(model, fontsize=9)
        ax.set_xlabel("surprisal s")
        ax.set_ylabel("log K")
    for ax in list(axes.flat)[len(models):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_cv_bars(plt, summary: list[dict], path: Path) -> None:
    """Pooled CV of E, K and PPL (base state, "same" pairing) per model, trained models first."""
    rows = [r for r in summary if r["variant"] == "base" and r["pairing"] == "same"]
    rows.sort(key=lambda r: (r["trained"] != "True", r["model"]))
    from matplotlib.ticker import FuncFormatter

    names = ("energy", "kinetic", "ppl", "log_energy")
    x = np.arange(len(rows))
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(rows) + 2), 4.5))
    for i, name in enumerate(names):
        values = [float(r[f"pooled_cv_{name}"]) for r in rows]
        ax.bar(x + (i - (len(names) - 1) / 2) * width, values, width, label=LABELS[name])
    ax.set_xticks(x, [f"{r['model']}\n({'trained' if r['trained'] == 'True' else 'random'})" for r in rows],
                  fontsize=7, rotation=30, ha="right")
    ax.set_yscale("log")
    # The axis starts at the decade below the smallest bar, with plain tick labels (0.01, 0.1, 1, ...).
    smallest = min(float(r[f"pooled_cv_{n}"]) for r in rows for n in names if float(r[f"pooled_cv_{n}"]) > 0)
    ax.set_ylim(bottom=10 ** np.floor(np.log10(smallest)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_ylabel("pooled CV (log scale)")
    ax.set_title("Is E conserved? CV(E) against its parts' CVs")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(scan_dir, out_dir: Optional[Path] = None) -> dict[str, Path]:
    """Write the plots and ``report.md`` for ``scan_dir`` into ``out_dir`` (default: ``scan_dir``).

    Raises:
        FileNotFoundError: ``scan_dir`` is not a scan directory.
        MissingDependencyError: matplotlib (extra ``plots``) is not installed.
    """
    scan_dir = Path(scan_dir)
    if not (scan_dir / "summary.csv").exists():
        raise FileNotFoundError(f"{scan_dir} holds no summary.csv: is it the output of `mppm scan`?")
    plt = _pyplot()
    out_dir = Path(out_dir) if out_dir is not None else scan_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = read_csv(scan_dir / "summary.csv")
    tokens = read_tokens(scan_dir)
    models = list(dict.fromkeys(r["model"] for r in summary))
    paths = {}
    for model in models:
        paths[f"sequence:{model}"] = out_dir / f"sequence_{_slug(model)}.png"
        plot_sequence(plt, tokens, model, paths[f"sequence:{model}"])
    paths["scatter"] = out_dir / "logk_vs_surprisal.png"
    plot_scatter(plt, tokens, models, paths["scatter"])
    paths["cv_bars"] = out_dir / "cv_bars.png"
    plot_cv_bars(plt, summary, paths["cv_bars"])
    lines = ["# Scan report", "", f"Scan directory: `{scan_dir}`. Pooled = every used position of every window; "
             "seq = average over windows of the per-window figure. Pairing 'same' pairs K_t with s_t, "
             "'shifted' with s_{t-1}.", "", markdown_table(summary, MARKDOWN_COLUMNS),
             "![CV bars](cv_bars.png)", "", "![log K against surprisal](logk_vs_surprisal.png)", ""]
    lines += [f"![{m}]({paths[f'sequence:{m}'].name})" for m in models]
    paths["report"] = out_dir / "report.md"
    paths["report"].write_text("\n".join(lines) + "\n")
    return paths
