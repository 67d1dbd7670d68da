"""``run_scan``: corpus x models -> per-token parts, summary rows and distributions, sharded over torchrun
ranks when there are several (see :mod:`mppm_ext.scan.distributed`)."""

from __future__ import annotations

import itertools
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from . import distributed as D
from ._optional import progress
from .passes import BASE, MID, SHUFFLED, ModelHandle, StatePlan, batch_parts, capture_states, layer_variant, resolve_layer
from .stats import PAIRINGS, summarize
from .token_mean import TokenMeanAccumulator
from .windows import HOLDOUT_EVERY, Window, batches, shard, shuffled, split_windows

#: Control flags (the "other layers" control is ``layers``).
CONTROLS = ("random-twin", "token-mean", "shuffle", "pre-norm")


@dataclass(frozen=True)
class ScanConfig:
    """Arguments of :func:`run_scan`.

    models: short names for ``mppm_ext.models.load`` or already loaded ``LoadedModel`` objects.
    corpus: a name/path for ``mppm_ext.data.load_corpus`` or the documents themselves.
    window: tokens per window (>= 3). max_tokens: cap on scanned tokens per model (None: the whole corpus).
    controls: subset of CONTROLS (``pre-norm``: layer -1 instead of the base state "final"). layers: other
    layers whose state is scanned as well, numbered as :mod:`mppm_ext.models.layers` (an int or "final"), or
    ``"mid"``: state L // 2 of each model.
    seed: seed of the shuffle and of random twins.
    """

    models: tuple
    corpus: Union[str, Sequence[str]]
    window: int = 256
    max_tokens: Optional[int] = None
    batch_size: int = 8
    controls: tuple[str, ...] = ()
    layers: tuple = ()
    device: str = "auto"
    dtype: torch.dtype = torch.float32
    seed: int = 0
    progress: bool = True

    def validate(self) -> None:
        if not self.models:
            raise ValueError("models: give at least one model")
        unknown = [c for c in self.controls if c not in CONTROLS]
        if unknown:
            raise ValueError(f"controls: unknown {unknown}; expected a subset of {list(CONTROLS)}")
        if not isinstance(self.window, int) or self.window < 3:
            raise ValueError(f"window must be an integer >= 3 (the energy needs tokens t-1, t, t+1), got {self.window!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 3):
            raise ValueError(f"max_tokens must be an integer >= 3 or None, got {self.max_tokens!r}")
        bad = [L for L in self.layers if L not in (MID, "final") and (isinstance(L, bool) or not isinstance(L, int))]
        if bad:
            raise ValueError(f"layers must be integers, 'final' or {MID!r}, got {bad}")


@dataclass
class ModelScan:
    """One scanned model (merged over ranks). ``parts[variant]`` = (tokens [N, T] int64 with -1 padding,
    log_prob, kinetic, entropy [N, T] float64), rows in window order; ``windows`` the Window records."""

    label: str
    info: dict
    windows: list[Window]
    parts: dict[str, tuple[Tensor, Tensor, Tensor, Tensor]]
    timing: dict
    coverage: Optional[float] = None
    dropped_short: int = 0


@dataclass
class ScanResult:
    """What rank 0 holds after a scan: per model its parts, summary rows and distribution rows."""

    config: ScanConfig
    models: list[ModelScan] = field(default_factory=list)
    summary: list[dict] = field(default_factory=list)
    quantiles: list[dict] = field(default_factory=list)
    histograms: list[dict] = field(default_factory=list)
    world: int = 1
    device: str = "cpu"
    heldout: Optional[str] = None


def _documents(corpus) -> list[str]:
    if isinstance(corpus, str):
        from mppm_ext import data

        docs = data.load_corpus(corpus)
    else:
        docs = list(corpus)
    if not all(isinstance(d, str) for d in docs):
        raise TypeError("corpus documents must be strings")
    if not any(d.strip() for d in docs):
        raise ValueError(f"corpus {corpus if isinstance(corpus, str) else '(documents)'!r} is empty: no text to scan")
    return docs


def _load(spec, cfg: ScanConfig, device: torch.device):
    if isinstance(spec, str):
        from mppm_ext import models

        return models.load(spec, dtype=cfg.dtype, device=str(device))
    return spec


def _model_info(loaded, handle: ModelHandle) -> dict:
    V, d = handle.weight.shape
    return {"name": loaded.name, "family": loaded.family, "trained": bool(loaded.trained),
            "source": getattr(loaded, "source", ""),
            "params": sum(p.numel() for p in loaded.model.parameters()), "vocab": int(V), "hidden": int(d),
            "log_vocab": math.log(V)}


def _token_means(ctx: D.Context, handle: ModelHandle, heldout: Sequence[Window], cfg: ScanConfig):
    ids = torch.tensor([t for w in heldout for t in w.tokens], dtype=torch.int64)
    acc = TokenMeanAccumulator(handle.weight.shape[0], ids, handle.weight.shape[1])
    todo = list(shard(batches(heldout, cfg.batch_size), ctx.rank, ctx.world))
    for batch in progress(todo, total=len(todo), desc="held-out means", enabled=cfg.progress and ctx.is_main):
        post, _, _ = capture_states(handle, batch, StatePlan())
        acc.add(post, batch.ids, batch.mask)
    D.all_reduce_sum(ctx, acc.sums)
    D.all_reduce_sum(ctx, acc.counts)
    return acc.finish()


def _scan_part(ctx: D.Context, handle: ModelHandle, windows: Sequence[Window], plan: StatePlan, cfg: ScanConfig,
               desc: str, rename: Optional[str] = None) -> dict:
    """This rank's share: {"rows": {variant: [(window index, tokens, log_prob [n], kinetic [n], entropy [n])]}, seconds in
    the forward passes and in the energy, tokens forwarded}."""
    rows: dict[str, list] = {}
    forward_s = energy_s = 0.0
    tokens = 0
    todo = list(shard(batches(windows, cfg.batch_size), ctx.rank, ctx.world))
    for batch in progress(todo, total=len(todo), desc=desc, enabled=cfg.progress and ctx.is_main):
        out = batch_parts(handle, batch, plan)
        forward_s += out.forward_s
        energy_s += out.energy_s
        tokens += batch.num_tokens
        for variant, values in out.parts.items():
            target = rows.setdefault(rename or variant, [])
            for row, w in enumerate(batch.windows):
                n = len(w.tokens)
                target.append((w.index, w.tokens, *(v[row, :n].clone() for v in values)))
    return {"rows": rows, "forward_s": forward_s, "energy_s": energy_s, "tokens": tokens}


def _merge(parts: list[dict]) -> tuple[dict, dict]:
    """Rank parts -> ({variant: (tokens, log_prob, kinetic, entropy) [N, T]}, timing) in window order."""
    variants: dict[str, list] = {}
    timing = {"forward_s": 0.0, "energy_s": 0.0, "tokens": 0}
    for part in parts:
        for key in timing:
            timing[key] += part[key]
        for variant, rows in part["rows"].items():
            variants.setdefault(variant, []).extend(rows)
    merged = {}
    for variant, rows in variants.items():
        rows.sort(key=lambda r: r[0])
        T = max(len(r[1]) for r in rows)
        toks = torch.full((len(rows), T), -1, dtype=torch.int64)
        values = [torch.full((len(rows), T), float("nan"), dtype=torch.float64) for _ in rows[0][2:]]
        for i, (_, tokens, *row) in enumerate(rows):
            n = len(tokens)
            toks[i, :n] = torch.tensor(tokens, dtype=torch.int64)
            for v, r in zip(values, row):
                v[i, :n] = r
        merged[variant] = (toks, *values)
    return merged, timing


def scan_model(ctx: D.Context, loaded, label: str, documents: Sequence[str], cfg: ScanConfig, out_dir: Path,
               model_index: int) -> Optional[ModelScan]:
    """Scan one loaded model on this rank's share of the windows; rank 0 returns the merged scan."""
    started = time.perf_counter()
    split = split_windows(loaded.tokenizer, documents, cfg.window, max_tokens=cfg.max_tokens,
                          holdout="token-mean" in cfg.controls)
    handle = ModelHandle.of(loaded.model)
    layers = tuple((layer_variant(L), resolve_layer(loaded.model, L)) for L in cfg.layers)
    means = _token_means(ctx, handle, split.heldout, cfg) if split.heldout else None
    plan = StatePlan(layers=layers, pre_norm="pre-norm" in cfg.controls, token_means=means)
    part = _scan_part(ctx, handle, split.scan, plan, cfg, desc=label)
    if "shuffle" in cfg.controls:
        extra = _scan_part(ctx, handle, shuffled(split.scan, cfg.seed), StatePlan(), cfg, desc=f"{label} shuffled",
                           rename=SHUFFLED)
        part["rows"].update(extra["rows"])
        for key in ("forward_s", "energy_s", "tokens"):
            part[key] += extra[key]
    D.write_part(ctx, out_dir, model_index, part)
    D.barrier(ctx)
    if not ctx.is_main:
        return None
    merged, timing = _merge(D.read_parts(ctx, out_dir, model_index))
    timing["wall_s"] = time.perf_counter() - started
    coverage = None
    if means is not None:
        toks = merged[BASE][0]
        seen = means.slot[toks.clamp(min=0)] >= 0
        coverage = float((seen & (toks >= 0)).sum()) / float((toks >= 0).sum())
    by_index = {w.index: w for w in split.scan}
    windows = [by_index[int(i)] for i in sorted(by_index)]
    return ModelScan(label=label, info=_model_info(loaded, handle), windows=windows, parts=merged, timing=timing,
                     coverage=coverage, dropped_short=split.dropped_short)


def summary_rows(scan: ModelScan, cfg: ScanConfig) -> tuple[list[dict], list[dict], list[dict]]:
    """Summary, quantile and histogram rows of one model: one per (variant, pairing)."""
    per_1k = 1000.0 / max(scan.timing["tokens"], 1)
    rows, quantiles, histograms = [], [], []
    for variant, (toks, lp, kin, ent) in scan.parts.items():
        for pairing in PAIRINGS:
            row, q, h = summarize(lp, kin, pairing)
            row["pooled_mean_entropy"] = float(ent[ent.isfinite()].mean()) if ent.isfinite().any() else math.nan
            key = {"model": scan.label, "variant": variant, "pairing": pairing}
            rows.append({**key, "family": scan.info["family"], "trained": scan.info["trained"],
                         "params": scan.info["params"], "vocab": scan.info["vocab"],
                         "log_vocab": scan.info["log_vocab"], "window": cfg.window,
                         "tokens": int((toks >= 0).sum()), **row,
                         "forward_ms_per_1k": 1000.0 * scan.timing["forward_s"] * per_1k,
                         "energy_ms_per_1k": 1000.0 * scan.timing["energy_s"] * per_1k,
                         "token_mean_coverage": scan.coverage})
            quantiles += [{**key, **r} for r in q]
            histograms += [{**key, **r} for r in h]
    return rows, quantiles, histograms


def check_writable(out_dir: Path) -> Path:
    """Create ``out_dir`` and prove it writable before any model loads (a scan can take many minutes)."""
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".mppm-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ValueError(f"out: cannot write to the output directory {str(out_dir)!r} ({exc.strerror or exc})") from exc
    return out_dir


def run_scan(cfg: ScanConfig, out_dir: Union[str, Path], *, write: bool = True) -> Optional[ScanResult]:
    """Scan every model of ``cfg`` on its corpus; write the tables to ``out_dir`` (rank 0).

    Under torchrun every rank runs this; the batches are dealt round-robin to the ranks, rank 0 merges and
    returns the :class:`ScanResult`, the other ranks return None. ``out_dir`` must be shared by the ranks.

    Raises:
        ValueError: bad config values, an empty corpus, an unwritable ``out_dir``, an unknown model name
            (from ``mppm_ext.models.load``).
    """
    from .output import write_outputs

    cfg.validate()
    out_dir = check_writable(Path(out_dir))
    documents = _documents(cfg.corpus)
    ctx = D.setup(cfg.device)
    try:
        result = ScanResult(config=cfg, world=ctx.world, device=str(ctx.device),
                            heldout=(f"every {HOLDOUT_EVERY}th window (window index % {HOLDOUT_EVERY} == "
                                     f"{HOLDOUT_EVERY - 1}), not scanned" if "token-mean" in cfg.controls else None))
        # Numbers the part files; counted on every rank (only rank 0 collects the scans).
        model_index = itertools.count()

        def scan_one(loaded) -> None:
            scan = scan_model(ctx, loaded, loaded.name, documents, cfg, out_dir, next(model_index))
            if scan is not None:
                result.models.append(scan)
                rows, q, h = summary_rows(scan, cfg)
                result.summary += rows
                result.quantiles += q
                result.histograms += h

        for spec in cfg.models:
            loaded = _load(spec, cfg, ctx.device)
            scan_one(loaded)
            if "random-twin" in cfg.controls and loaded.trained:
                from mppm_ext import models

                scan_one(models.random_twin(loaded, seed=cfg.seed))
            del loaded
        if ctx.is_main and write:
            write_outputs(result, out_dir)
        return result if ctx.is_main else None
    finally:
        D.teardown(ctx)
