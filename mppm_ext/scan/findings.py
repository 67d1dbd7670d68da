"""The reproduction report: one command scans the trained models and their random twins, random-weight
models of six families at their real sizes reading the trained model's tokens (plus one byte-level control),
with every control, on each fetched corpus, and writes ``docs/findings.md`` whose numbers, intervals and
answers are all computed from that run (:mod:`.findings_report`).

    python -m mppm_ext.scan.findings                  # or: mppm findings
    python -m mppm_ext.scan.findings --from-scan docs/findings/scan   # rewrite the report and plots only

Defaults: 4,096 scanned tokens per model and corpus, four corpora (see DEFAULT_*), about 10 minutes on 2 free
CPU cores. The report states the token count, the wall time, the
CPU time and the load the run saw."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

#: Trained models, scanned with their random twins when installed (``mppm setup``).
DEFAULT_TRAINED = ("smollm2-135m", "gemma3-270m")
#: Random-weight models of six of the paper's families at real sizes (Llama/SmolLM2, GPT-2, GPT-NeoX/Pythia,
#: OPT, Gemma 3, Qwen2). Phi-1.5 (1.3B) is left out by default: on 2 CPU cores it alone would take about
#: as long as the rest together; add it with --models random:phi-1.3b.
#: Each reads SmolLM2's tokens (``@smollm2-135m``: its tokenizer, the vocabulary resized to 49,152), so that
#: every random-weight model sees the token sequences the trained one sees; one byte-level model stays as
#: the control of the earlier runs' set-up (the text the families read then differed, not only the weights).
READER = "smollm2-135m"
# Llama-135M is SmolLM2-135M's architecture, so on SmolLM2's tokens it is the trained model's random twin
# already scanned (same config, same tokens): only its byte-level variant is added.
DEFAULT_RANDOM = tuple(f"random:{m}@{READER}" for m in ("gpt2-124m", "pythia-160m", "opt-125m", "gemma3-270m",
                                                        "qwen2-0.5b")) + ("random:llama-135m",)
#: Scanned separately; "tiny" ships with the package, the others come with ``mppm setup``.
DEFAULT_CORPORA = ("tiny", "sotu", "moby-dick", "lee")
DEFAULT_WINDOW = 256
# Budget: 8 models x 4 corpora x (1 scan + 1 shuffled + 0.25 held-out) passes x 4,096 tokens ~ 300k forward
# tokens of 125M-500M-parameter models: 2,048 tokens took 293 s wall (499 CPU-s) on 2 quiet cores, so the
# default fills the ~10 minutes a run may take; the measured time of the committed run is in the report and
# the README.
DEFAULT_MAX_TOKENS = 4096
LARGE_MAX_TOKENS = 16384
# Small batches keep the activations of the widest model (Qwen2-0.5B: 24 blocks, d = 896) small; the
# logits are never formed (the energy is computed from the final state, tile by tile).
DEFAULT_BATCH = 2
from .engine import CONTROLS
LAYERS = ("mid",)


#: What the findings run adds to its scan directory, so that --from-scan rewrites the same report.
RUN_FILE = "findings_run.json"


def write_findings(scan_root: Path, report: Path, *, plots: Optional[Path] = None) -> Path:
    """Write the findings Markdown (and, with ``plots``, its PNGs) from a findings scan directory: one scan
    directory per corpus plus findings_run.json (see :mod:`mppm_ext.scan.findings_report`)."""
    from .findings_report import write

    return write(Path(scan_root), Path(report), plots=plots)


def _available(names: Sequence[str]) -> tuple[list[str], list[dict]]:
    """(names that load, [{"model", "install"}] for those that need a trained model that is not installed:
    the model itself, or the one whose tokenizer a ``random:...@<trained>`` model reads)."""
    from mppm_ext.models.loading import TRAINED, install_command, installed_gguf

    ok, skipped = [], []
    for name in names:
        needs = name.partition("@")[2] if name.startswith("random:") else name
        if needs in TRAINED and installed_gguf(needs) is None:
            skipped.append({"model": name, "install": install_command(needs)})
        else:
            ok.append(name)
    return ok, skipped


def _corpora(names: Sequence[str]) -> tuple[dict[str, list[str]], list[dict]]:
    """({corpus: documents} for the fetched ones, [{"corpus", "install"}] for the others)."""
    from mppm_ext import data

    ok, missing = {}, []
    for name in names:
        try:
            ok[name] = data.load_corpus(name)
        except FileNotFoundError:
            missing.append({"corpus": name, "install": f"mppm setup {name}"})
    return ok, missing


def _checkpoint(loaded, dtype) -> dict:
    """What a reader needs to name the weights: the published checkpoint, file, package and dtype."""
    from mppm_ext.models.loading import TRAINED

    spec = TRAINED.get(loaded.name)
    if spec is None:
        return {"model": loaded.name, "weights": loaded.source, "dtype": str(dtype).replace("torch.", "")}
    return {"model": loaded.name, "checkpoint": spec.checkpoint, "file": spec.gguf, "package": spec.requirement,
            "dtype": str(dtype).replace("torch.", "")}


def _merge_results(results: list, cfg) -> object:
    """One ScanResult (one scan directory) from the per-model results of one corpus."""
    from dataclasses import replace

    from .engine import ScanResult

    merged = ScanResult(config=replace(cfg, models=tuple(m.label for r in results for m in r.models),
                                       controls=CONTROLS),
                        world=results[0].world, device=results[0].device, heldout=results[0].heldout)
    for r in results:
        merged.models += r.models
        merged.summary += r.summary
        merged.quantiles += r.quantiles
        merged.histograms += r.histograms
    return merged


def run_findings(out: Path, report: Path, *, models: Sequence[str], corpora: Sequence[str], window: int,
                 max_tokens: int, batch_size: int, progress: bool = True) -> Path:
    """Scan ``models`` on each fetched corpus of ``corpora`` with every control into ``out/scan/<corpus>``,
    then write the plots into ``out`` and the report to ``report``.

    Each model loads once and scans every corpus (loading a random 0.5B model takes about 8 s); a trained
    model's random twin is scanned right after it."""
    import torch

    from mppm_ext import models as M

    from .engine import ScanConfig, check_writable, run_scan
    from .output import write_outputs
    from .windows import split_windows

    names, skipped = _available(models)
    documents, missing = _corpora(corpora)
    if not names:
        raise ValueError(f"none of the models {list(models)} is installed")
    if not documents:
        raise ValueError(f"none of the corpora {list(corpora)} is fetched")
    started, cpu_started = time.perf_counter(), time.process_time()
    scan_root = out / "scan"
    for corpus in documents:
        check_writable(scan_root / corpus)
    per_corpus: dict[str, list] = {c: [] for c in documents}
    heldout: dict[str, dict[str, list[int]]] = {c: {} for c in documents}
    checkpoints, configs = [], {}
    for name in names:
        loaded = M.load(name)
        group = [loaded] + ([M.random_twin(loaded)] if loaded.trained else [])
        checkpoints += [_checkpoint(m, torch.float32) for m in group]
        for corpus, docs in documents.items():
            cfg = ScanConfig(models=tuple(group), corpus=docs, window=window, max_tokens=max_tokens,
                             batch_size=batch_size, controls=tuple(c for c in CONTROLS if c != "random-twin"),
                             layers=LAYERS, progress=progress)
            configs[corpus] = cfg
            result = run_scan(cfg, scan_root / corpus, write=False)
            if result is None:  # a non-zero torchrun rank
                return report
            per_corpus[corpus].append(result)
            # The held-out tokens (the token-mean control's coverage), from the split the scan used.
            split = split_windows(loaded.tokenizer, docs, window, max_tokens=max_tokens, holdout=True)
            ids = sorted({t for w in split.heldout for t in w.tokens})
            for m in group:
                heldout[corpus][m.name] = ids
        del loaded, group
    for corpus, results in per_corpus.items():
        merged = _merge_results(results, configs[corpus])
        write_outputs(merged, scan_root / corpus)
        meta_path = scan_root / corpus / "metadata.json"
        meta = json.loads(meta_path.read_text())
        meta["args"]["corpus"] = corpus
        meta_path.write_text(json.dumps(meta, indent=2, default=str))
    run = {"corpora": list(documents), "missing_corpora": missing, "skipped": skipped, "checkpoints": checkpoints,
           "heldout_tokens": heldout, "elapsed_s": time.perf_counter() - started,
           # CPU seconds of this process (all its threads) and the load at the end: a wall time on shared
           # cores says little without them.
           "cpu_s": time.process_time() - cpu_started, "cpus": os.cpu_count(), "loadavg": list(os.getloadavg()),
           "command": " ".join(["mppm", "findings", *sys.argv[2:]]) if sys.argv[1:2] == ["findings"] else None}
    (scan_root / RUN_FILE).write_text(json.dumps(run))
    return write_findings(scan_root, report, plots=out)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=Path("docs/findings"), help="tables and plots (default docs/findings)")
    p.add_argument("--report", type=Path, default=Path("docs/findings.md"), help="the report (default docs/findings.md)")
    p.add_argument("--models", nargs="+", default=list(DEFAULT_TRAINED + DEFAULT_RANDOM),
                   help="models to scan (default: the trained models that are installed, their twins, and "
                        f"{', '.join(DEFAULT_RANDOM)})")
    p.add_argument("--corpora", nargs="+", default=list(DEFAULT_CORPORA),
                   help=f"corpora, each scanned separately (default: those of {', '.join(DEFAULT_CORPORA)} that "
                        "are fetched)")
    p.add_argument("--window", type=int, default=DEFAULT_WINDOW, help=f"tokens per window (default {DEFAULT_WINDOW})")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                   help=f"scanned tokens per model and corpus (default {DEFAULT_MAX_TOKENS}; "
                        f"{LARGE_MAX_TOKENS} is the larger setting, about four times as long)")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH, help=f"windows per batch (default {DEFAULT_BATCH})")
    p.add_argument("--from-scan", type=Path, default=None,
                   help="only rewrite the report and plots from an existing findings scan directory "
                        "(OUT/scan; no model runs)")
    p.add_argument("--no-progress", action="store_true")


def run_command(args: argparse.Namespace) -> int:
    if args.from_scan is not None:
        path = write_findings(args.from_scan, args.report, plots=args.out)
    else:
        path = run_findings(args.out, args.report, models=args.models, corpora=args.corpora, window=args.window,
                            max_tokens=args.max_tokens, batch_size=args.batch_size, progress=not args.no_progress)
    print(f"wrote {path}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mppm_ext.scan.findings", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run_command(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
