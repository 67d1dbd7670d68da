"""``mppm anomaly-bench``: does the energy add anything to perplexity as an anomaly detector?

One run: build the tasks (:mod:`.tasks`) with the first trained model, run every model (each trained model
and its random twin) with an :class:`mppm_ext.monitor.EnergyMonitor` over every text, turn the per-token
records into text scores (:mod:`.features`), fix each feature's direction and fit the logistic models on
the calibration split, and score the test split with 95% bootstrap intervals over test documents
(:mod:`.metrics`). Writes tasks.jsonl, results.json, results.csv, roc_<task>.png and report.md."""

from __future__ import annotations

import json
import math
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from . import features as F
from . import metrics as M
from . import tasks as T

#: Trained models the default run uses when installed.
DEFAULT_TRAINED = ("smollm2-135m", "gemma3-270m")
INSTALL_HINT = {"gemma3-270m": "mppm setup gemma3-270m --accept-gemma-terms", "smollm2-135m": "mppm setup"}
FPR = 0.01


@dataclass
class Settings:
    """Sizes of a run. ``n``: positives (and negatives) per task and split; ``length``/``span``/
    ``continuation``: tokens per text, per anomalous span, per sampled continuation; ``window``: the
    monitor's rolling window and the text scores' window; ``reps``: bootstrap resamples."""

    n: int
    length: int
    span: int
    continuation: int
    window: int
    reps: int
    pilot: int
    batch_size: int = 8
    host: str = "sotu"
    donors: tuple = ("moby-dick", "lee")
    seed: int = 0
    overhead_tokens: int = 32
    grid: tuple = (0.9, 1.0, 1.1, 1.2, 1.3)  # pilot temperatures of the sampled task


# Default: 100 per class and split (200 positives, 200 negatives per task) of 64 tokens, the least the
# issue asks for: about 2 x 93k scored tokens plus 40k for the tasks (see the report's "Setup" line for the
# measured time of the committed run).
DEFAULT = Settings(n=100, length=64, span=16, continuation=32, window=8, reps=1000, pilot=8, batch_size=16)
# --quick: 20 per class and split of 48 tokens, 200 resamples: a first look and the CI smoke run (a quarter
# of the default's CPU time).
QUICK = Settings(n=20, length=48, span=12, continuation=24, window=8, reps=200, pilot=4, overhead_tokens=16,
                 grid=(0.9, 1.1, 1.3))


@dataclass
class ModelEntry:
    name: str
    trained: bool
    loaded: object = field(repr=False)
    control_of: Optional[str] = None


def resolve_models(names: Optional[Sequence[str]]) -> tuple[list[ModelEntry], list[str]]:
    """The models to score (each trained model followed by its random twin) and the default trained models
    that are not installed. An explicitly named model that cannot be loaded raises FileNotFoundError or
    ValueError naming it."""
    from .. import models
    from ..models.loading import installed_gguf

    missing = []
    if names:
        wanted = list(names)
    else:
        wanted = [n for n in DEFAULT_TRAINED if installed_gguf(n) is not None]
        missing = [n for n in DEFAULT_TRAINED if n not in wanted]
        if not wanted:
            raise FileNotFoundError("no trained model is installed (" + ", ".join(
                f"{n}: `{INSTALL_HINT[n]}`" for n in DEFAULT_TRAINED) + "); or name one with --model")
    out = []
    for name in wanted:
        try:
            lm = models.load(name)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"--model {name}: {err}") from err
        out.append(ModelEntry(lm.name, lm.trained, lm))
        if lm.trained:
            twin = models.random_twin(lm)
            out.append(ModelEntry(twin.name, False, twin, control_of=lm.name))
    return out, missing


def _bar(total: int, desc: str, enabled: bool, unit: str = "text"):
    from ..scan._optional import available

    if not enabled or not available("tqdm"):
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, leave=False)


def _sampler(lm, seed: int, batch_size: int, continuation: int):
    """Model samples: top-p 0.95 at the given temperature, exactly ``continuation`` new tokens (EOS
    suppressed until then), prompts of one length so that no padding is needed."""
    tok = lm.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def sample(prompts: list, temperature: float) -> list:
        out = []
        for i in range(0, len(prompts), batch_size):
            ids = torch.tensor(prompts[i:i + batch_size])
            torch.manual_seed(seed * 7919 + i)
            with torch.no_grad():
                seq = lm.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                        temperature=temperature, top_p=0.95, top_k=0, max_new_tokens=continuation,
                                        min_new_tokens=continuation, pad_token_id=pad)
            out += seq[:, ids.shape[1]:].tolist()
        return out

    return sample


def task_builder(lm, s: Settings) -> "T.Builder":
    """The task builder over the host corpus's passages and the donor corpora's (interleaved), with ``lm``'s
    tokeniser, surprisal (the monitor's) and sampler."""
    from ..data import load_corpus
    from ..monitor import EnergyMonitor

    host = T.passages(lm.tokenizer, load_corpus(s.host), s.host, s.length, s.seed)
    donor = {split: [] for split in T.SPLITS}
    for k, name in enumerate(s.donors):
        part = T.passages(lm.tokenizer, load_corpus(name), name, s.length, s.seed + 1 + k)
        for split in T.SPLITS:
            donor[split] += part[split]
    for split in T.SPLITS:  # interleave the donor corpora
        donor[split] = [donor[split][i] for i in np.random.default_rng(s.seed).permutation(len(donor[split]))]
    mon = EnergyMonitor(lm.model, window=s.window)

    def surprisal(seqs):
        return [r["surprisal"] for r in mon.run_ids(seqs, batch_size=s.batch_size)]

    return T.Builder(lm.tokenizer, host, donor, length=s.length, span=s.span, seed=s.seed, surprisal=surprisal,
                     sampler=_sampler(lm, s.seed, 4 * s.batch_size, s.continuation), continuation=s.continuation,
                     window=s.window)


def build_tasks(lm, s: Settings, progress: bool) -> tuple[list, "T.Builder", list]:
    """Items of every task, the builder (temperature search) and the monitor-calibration texts."""
    builder = task_builder(lm, s)
    bar = _bar(2 * len(T.TASKS), "building tasks", progress, unit="task")
    items = builder.build(s.n, n_pilot=s.pilot, grid=s.grid, progress=bar)
    if bar is not None:
        bar.close()
    calib = [lm.tokenizer.decode(p.ids) for p in builder.host[T.SPLITS[0]].take(max(8, s.n // 2))]
    return items, builder, calib


def score_texts(entry: ModelEntry, texts: list, calib_texts: list, s: Settings, progress: bool) -> dict:
    """Per unique text, its (high, low, mean) aggregates of every feature under ``entry``'s model."""
    from ..monitor import EnergyMonitor

    mon = EnergyMonitor(entry.loaded.model, window=s.window)
    bar = _bar(len(calib_texts) + len(texts), f"scoring {entry.name}", progress)
    mon.calibrate(calib_texts, entry.loaded.tokenizer, batch_size=s.batch_size, progress=bar)
    records = mon.run(texts, entry.loaded.tokenizer, batch_size=s.batch_size, progress=bar)
    if bar is not None:
        bar.close()
    return F.matrix(records, s.window)


def evaluate_task(agg: dict, cal: np.ndarray, test: np.ndarray, y: np.ndarray, docs: np.ndarray,
                  reps: int, seed: int) -> tuple[list, dict, dict]:
    """Rows (one per feature and logistic model), the paired ΔAUROC of the combined model over the
    surprisal + entropy one, and ROC curves, for one model and task. ``cal``/``test``: index arrays of the
    task's items into ``agg``'s rows; ``y``/``docs``: labels and documents of all rows."""
    scores, info = {}, {}
    for name in F.SINGLE:
        x = agg[name]
        high, low = F.fill(x[:, 0], x[cal, 0]), -F.fill(x[:, 1], x[cal, 1])
        a_high, a_low = M.auroc(high[cal], y[cal]), M.auroc(low[cal], y[cal])
        higher = a_high >= a_low
        scores[name] = high if higher else low
        info[name] = dict(kind="candidate" if name in F.CANDIDATES else "baseline",
                          direction="higher" if higher else "lower", calibration_auroc=max(a_high, a_low))
    for name, feats in F.LOGISTIC.items():
        x = np.concatenate([agg[f] for f in feats], axis=1)
        model = M.Logistic(lam=1.0).fit(x[cal], y[cal])
        scores[name] = model.decision(x)
        info[name] = dict(kind="logistic", direction="higher", calibration_auroc=M.auroc(scores[name][cal], y[cal]))
    yt, dt = y[test], docs[test]
    boot = M.bootstrap_indices(dt, reps=reps, seed=seed)
    rows, curves = [], {}
    for name, score in scores.items():
        threshold = M.threshold_at_fpr(score[cal][y[cal] == 0], FPR)
        st = score[test]
        value, draws = M.detection_draws(st, yt, threshold, boot)
        ivs = [M.interval(value[k], draws[:, k]) for k in range(3)]
        fpr_test = M.tpr_at_threshold(st, yt, threshold)[1]
        row = dict(feature=name, **info[name], threshold=threshold, test_fpr=fpr_test)
        for key, iv in zip(("auroc", "auprc", "tpr_at_1pct_fpr"), ivs):
            row.update({key: iv.value, f"{key}_low": iv.low, f"{key}_high": iv.high})
        rows.append(row)
        curves[name] = M.roc_curve(st, yt)
    base, comb = scores[F.BASE_MODEL][test], scores[F.COMBINED_MODEL][test]
    (base_all, base_draws), (comb_all, comb_draws) = (M.detection_draws(x, yt, np.inf, boot) for x in (base, comb))
    diff = M.interval(comb_all[0] - base_all[0], comb_draws[:, 0] - base_draws[:, 0])
    verdict = "helps" if diff.low > 0 else ("hurts" if diff.high < 0 else "does not help")
    delta = dict(delta_auroc=diff.value, delta_auroc_low=diff.low, delta_auroc_high=diff.high, verdict=verdict,
                 n_pos_test=int(yt.sum()), n_neg_test=int((1 - yt).sum()), n_docs_test=int(np.unique(dt).size),
                 n_pos_calibration=int(y[cal].sum()), n_neg_calibration=int((1 - y[cal]).sum()))
    return rows, delta, curves


def measure_overhead(lm, prompt_ids: list, new_tokens: int, window: int, repeats: int = 5,
                     progress: bool = False) -> dict:
    """Greedy generation of ``new_tokens`` after one prompt, without and with the monitor attached,
    interleaved ``repeats`` times; medians in ms per generated token of wall-clock and of process CPU time
    (on a shared machine the wall clock also counts other jobs' time slices; the CPU time does not), and
    the 1-minute load average at the end."""
    from ..monitor import EnergyMonitor

    ids = torch.tensor([prompt_ids])
    tok = lm.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new_tokens,
              min_new_tokens=new_tokens, pad_token_id=pad)
    mon = EnergyMonitor(lm.model, window=window)
    clocks = {"": time.perf_counter, "cpu_": time.process_time}
    times = {(mode, clock): [] for mode in ("plain", "monitored") for clock in clocks}
    bar = _bar(2 * repeats, "monitor overhead", progress, unit="generation")
    with torch.no_grad():
        lm.model.generate(ids, **kw)  # warm-up
        for _ in range(repeats):
            for mode in ("plain", "monitored"):
                mon.reset()
                start = {clock: fn() for clock, fn in clocks.items()}
                if mode == "monitored":
                    with mon:
                        lm.model.generate(ids, **kw)
                else:
                    lm.model.generate(ids, **kw)
                for clock, fn in clocks.items():
                    times[(mode, clock)].append((fn() - start[clock]) * 1000 / new_tokens)
                if bar is not None:
                    bar.update(1)
    if bar is not None:
        bar.close()
    out = dict(model=lm.name, new_tokens=new_tokens, repeats=repeats)
    for clock in clocks:
        plain, monitored = (float(np.median(times[(mode, clock)])) for mode in ("plain", "monitored"))
        out.update({f"plain_{clock}ms_per_token": plain, f"monitored_{clock}ms_per_token": monitored,
                    f"overhead_{clock}ms_per_token": monitored - plain,
                    f"overhead_{clock}fraction": (monitored - plain) / plain})
    return dict(out, computed_from=dict(mon.computed_from), torch_threads=torch.get_num_threads(),
                load_average=(_load_averages() or [None])[0])


def _load_averages() -> Optional[list]:
    """The 1-, 5- and 15-minute load averages (None where the platform has none)."""
    import os

    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def run(out: Path, model_names: Optional[Sequence[str]], s: Settings, *, quick: bool, progress: bool = True,
        log=print) -> dict:
    """The whole benchmark; returns the results dict (also written to ``out``)."""
    from .report import plot_rocs, write_report

    start, start_cpu = time.perf_counter(), time.process_time()
    entries, missing = resolve_models(model_names)
    task_model = next((e for e in entries if e.trained), entries[0])
    log(f"building tasks with {task_model.name} ({s.n} positives and {s.n} negatives per task and split)")
    t0 = time.perf_counter()
    items, builder, calib_texts = build_tasks(task_model.loaded, s, progress)
    build_s = time.perf_counter() - t0
    T.write_jsonl(items, out / "tasks.jsonl", T.TASKS)
    texts = list(dict.fromkeys(it.text for it in items))
    row_of = {t: i for i, t in enumerate(texts)}
    log(f"{len(texts)} distinct texts; temperature {builder.temperature} matches the human mean surprisal")
    overhead = measure_overhead(task_model.loaded, builder.host[T.SPLITS[1]].take(1)[0].ids[:16],
                                s.overhead_tokens, s.window, progress=progress)
    rows, deltas, curves, timing = [], [], {}, {"build_tasks_s": build_s}
    text_means = {}  # task model: mean over texts of the text's mean surprisal, positives and negatives
    for entry in entries:
        t0 = time.perf_counter()
        agg = score_texts(entry, texts, calib_texts, s, progress)
        timing[f"score_{entry.name}_s"] = time.perf_counter() - t0
        for k, task in enumerate(T.TASKS):
            task_items = T.items_for(items, task)
            idx = np.array([row_of[it.text] for it in task_items])
            sub = {name: x[idx] for name, x in agg.items()}
            y = np.array([it.label for it in task_items])
            docs = np.array([it.doc for it in task_items])
            split = np.array([it.split for it in task_items])
            cal, test = np.flatnonzero(split == T.SPLITS[0]), np.flatnonzero(split == T.SPLITS[1])
            task_rows, delta, task_curves = evaluate_task(sub, cal, test, y, docs, s.reps, s.seed + k)
            if entry is task_model:
                mean_s = sub["surprisal"][:, 2]
                text_means[task] = dict(positives=float(np.nanmean(mean_s[y == 1])),
                                        negatives=float(np.nanmean(mean_s[y == 0])))
            common = dict(model=entry.name, trained=entry.trained, control_of=entry.control_of, task=task)
            rows += [{**common, **r} for r in task_rows]
            deltas.append({**common, **delta})
            curves[(entry.name, task)] = task_curves
        log(f"scored {entry.name} in {timing[f'score_{entry.name}_s']:.0f} s")
    import transformers

    results = dict(
        config=dict(asdict(s), quick=quick, fpr=FPR, models=[e.name for e in entries], task_model=task_model.name,
                    missing_trained=[dict(name=n, install=INSTALL_HINT[n]) for n in missing],
                    temperature=builder.temperature, temperature_search=builder.temperature_search,
                    human_mean_surprisal=builder.human_mean_surprisal, splice_match=builder.match,
                    text_mean_surprisal=text_means,
                    n_texts=len(texts)),
        versions=dict(torch=torch.__version__, transformers=transformers.__version__, python=platform.python_version(),
                      torch_threads=torch.get_num_threads()),
        rows=rows, deltas=deltas, overhead=overhead, timing=timing)
    results["wall_s"] = time.perf_counter() - start
    results["cpu_s"] = time.process_time() - start_cpu
    results["load_average_end"] = _load_averages()
    write_results(results, out)
    plot_rocs(curves, results, out)
    write_report(results, out / "report.md")
    return results


def _strict(x):
    """``x`` with NaN and inf floats as None (JSON has no NaN) and numpy scalars as Python numbers."""
    if isinstance(x, dict):
        return {k: _strict(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_strict(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def write_results(results: dict, out: Path) -> None:
    import csv

    (out / "results.json").write_text(json.dumps(_strict(results), indent=1, allow_nan=False))
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(results["rows"][0]))
        writer.writeheader()
        writer.writerows(results["rows"])
