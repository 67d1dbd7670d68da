"""The files a scan writes (rank 0) and reads back for ``mppm report``:

- ``tokens.parquet`` (``tokens.csv`` without pyarrow): one row per scanned token, model and variant, with
  the parts and the derived quantities under the "same" pairing (the other pairing is a shift of log_prob);
- ``summary.csv`` / ``summary.md``: one row per (model, variant, pairing), see :func:`stats.summarize`;
- ``quantiles.csv``, ``histograms.csv``: the distribution of each quantity;
- ``metadata.json``: versions, git SHA, arguments, world size, device, held-out split."""

from __future__ import annotations

import csv
import json
import math
import platform
import subprocess
import sys
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import torch

from ._optional import available, require
from .stats import paired

TOKEN_COLUMNS = ("model", "variant", "window", "document", "position", "t", "token", "log_prob", "surprisal",
                 "kinetic", "log_kinetic", "log_energy", "additive_energy", "log_lagrangian", "entropy", "valid")
#: The columns of summary.md (summary.csv has every column).
MARKDOWN_COLUMNS = ("model", "variant", "pairing", "trained", "tokens", "positions", "zero_kinetic",
                    "pooled_mean_surprisal", "pooled_mean_log_kinetic", "pooled_cv_energy", "pooled_cv_log_energy",
                    "pooled_cv_kinetic", "pooled_cv_ppl", "pooled_cv_additive_energy", "seq_cv_energy",
                    "seq_cv_kinetic", "seq_cv_ppl", "pooled_corr", "seq_corr", "forward_ms_per_1k",
                    "energy_ms_per_1k")


def token_columns(scans) -> dict[str, np.ndarray]:
    """Column name -> 1-D array over every (model, variant, window, real token)."""
    cols: dict[str, list] = {c: [] for c in TOKEN_COLUMNS}
    for scan in scans:
        for variant, (toks, lp, kin, ent) in scan.parts.items():
            q = paired(lp, kin, "same")
            real = toks >= 0
            n = int(real.sum())
            t_index = torch.arange(toks.shape[1]).expand_as(toks)
            window = torch.tensor([w.index for w in scan.windows]).unsqueeze(1).expand_as(toks)
            doc = torch.tensor([w.document for w in scan.windows]).unsqueeze(1).expand_as(toks)
            start = torch.tensor([w.start for w in scan.windows]).unsqueeze(1).expand_as(toks)
            cols["model"].append(np.array([scan.label] * n, dtype=object))
            cols["variant"].append(np.array([variant] * n, dtype=object))
            cols["window"].append(window[real].numpy())
            cols["document"].append(doc[real].numpy())
            cols["position"].append((start + t_index)[real].numpy())
            cols["t"].append(t_index[real].numpy())
            cols["token"].append(toks[real].numpy())
            for name in ("log_prob", "surprisal", "kinetic", "log_kinetic", "log_energy", "additive_energy",
                         "log_lagrangian"):
                cols[name].append(getattr(q, name)[real].numpy())
            cols["entropy"].append(ent[real].numpy())
            cols["valid"].append(q.valid[real].numpy())
    return {c: (np.concatenate(v) if v else np.array([])) for c, v in cols.items()}


def write_tokens(scans, out_dir: Path) -> Path:
    cols = token_columns(scans)
    if available("pyarrow"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = out_dir / "tokens.parquet"
        pq.write_table(pa.table({c: (v.astype(str) if v.dtype == object else v) for c, v in cols.items()}), path)
        return path
    path = out_dir / "tokens.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(TOKEN_COLUMNS)
        w.writerows(zip(*(cols[c].tolist() for c in TOKEN_COLUMNS)))
    return path


def read_tokens(out_dir: Path) -> dict[str, np.ndarray]:
    """The token table of a scan directory as column arrays (parquet needs pyarrow; CSV does not)."""
    out_dir = Path(out_dir)
    if (out_dir / "tokens.parquet").exists():
        pq = require("pyarrow.parquet", "scan", f"reading {out_dir / 'tokens.parquet'}")
        table = pq.read_table(out_dir / "tokens.parquet")
        return {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}
    path = out_dir / "tokens.csv"
    if not path.exists():
        raise FileNotFoundError(f"{out_dir} holds no tokens.parquet or tokens.csv: is it the output of `mppm scan`?")
    rows = read_csv(path)
    out = {}
    for c in (c for c in TOKEN_COLUMNS if not rows or c in rows[0]):  # older scans have no entropy column
        values = [r[c] for r in rows]
        if c in ("model", "variant"):
            out[c] = np.array(values, dtype=object)
        elif c == "valid":
            out[c] = np.array([v == "True" for v in values])
        else:
            out[c] = np.array(values, dtype=np.float64 if c not in ("window", "document", "position", "t", "token")
                              else np.int64)
    return out


def _cell(v) -> str:
    """A table cell: numbers (also numbers read back from a CSV as text) to 4 significant digits."""
    if isinstance(v, str):
        try:
            v = float(v)
        except ValueError:
            return v
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def write_csv(path: Path, rows: list[dict]) -> None:
    columns: list[str] = []
    for r in rows:
        columns += [k for k in r if k not in columns]
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if v is None else v) for k, v in r.items()})


def read_csv(path: Path) -> list[dict]:
    with Path(path).open(newline="") as f:
        return list(csv.DictReader(f))


def markdown_table(rows: Iterable[dict], columns: Iterable[str]) -> str:
    columns = list(columns)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(_cell(r.get(c, "")) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def _git_sha() -> Optional[str]:
    here = Path(__file__).resolve().parent
    for cwd in (Path.cwd(), here):
        try:
            out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            continue
        if out.returncode == 0:
            return out.stdout.strip()
    return None


def _versions() -> dict:
    import mppm_ext

    out = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
           "mppm_ext": mppm_ext.__version__, "platform": platform.platform()}
    for name in ("transformers", "pyarrow", "tqdm"):
        mod = sys.modules.get(name)
        if mod is not None or available(name):
            out[name] = getattr(sys.modules[name], "__version__", "?")
    return out


def metadata(result) -> dict:
    cfg = result.config
    return {
        "versions": _versions(),
        "git_sha": _git_sha(),
        "argv": sys.argv,
        "args": {"models": [m if isinstance(m, str) else m.name for m in cfg.models],
                 "corpus": cfg.corpus if isinstance(cfg.corpus, str) else f"({len(cfg.corpus)} documents)",
                 "window": cfg.window, "max_tokens": cfg.max_tokens, "batch_size": cfg.batch_size,
                 "controls": list(cfg.controls), "layers": list(cfg.layers), "dtype": str(cfg.dtype),
                 "seed": cfg.seed},
        "world_size": result.world,
        "device": result.device,
        "heldout_split": result.heldout,
        "tokenisation": "no special tokens; windows never cross a document boundary",
        # "scanned_tokens" is what the tables count; "forwarded_tokens" adds the shuffle control's second pass
        # over the same windows (twice the scanned count when it is on); held-out windows are not counted.
        "models": [{"label": s.label, **s.info, "windows": len(s.windows), "dropped_short_windows": s.dropped_short,
                    "token_mean_coverage": s.coverage, "scanned_tokens":
                    int((s.parts["base"][0] >= 0).sum()), "forwarded_tokens": s.timing["tokens"],
                    **{k: v for k, v in s.timing.items() if k != "tokens"}} for s in result.models],
    }


def write_outputs(result, out_dir: Path) -> dict[str, Path]:
    """Every file of a scan directory; returns them by kind."""
    out_dir = Path(out_dir)
    paths = {"tokens": write_tokens(result.models, out_dir)}
    paths["summary_csv"] = out_dir / "summary.csv"
    write_csv(paths["summary_csv"], result.summary)
    paths["summary_md"] = out_dir / "summary.md"
    paths["summary_md"].write_text("# Scan summary\n\n" + markdown_table(result.summary, MARKDOWN_COLUMNS))
    paths["quantiles"] = out_dir / "quantiles.csv"
    write_csv(paths["quantiles"], result.quantiles)
    paths["histograms"] = out_dir / "histograms.csv"
    write_csv(paths["histograms"], result.histograms)
    paths["metadata"] = out_dir / "metadata.json"
    paths["metadata"].write_text(json.dumps(metadata(result), indent=2, default=str))
    return paths
