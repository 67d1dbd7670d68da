"""The findings report: its statistics against direct computations, and its verdicts against the intervals
it prints, on a small saved scan built here (two corpora, three models whose answers are known), plus one
end-to-end run on tiny models."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

from mppm_ext.scan import findings_report as F
from mppm_ext.scan import intervals as I
from mppm_ext.scan import output

WINDOWS, T = 12, 48


def _model_tokens(rng, model: str, kind: str, variant: str = "base") -> dict:
    """One model's token rows: 'conserved' has log K = 3 - s + small noise (E nearly constant), 'free' has
    log K independent of s, 'pinned' has s near log V = 10 (a random model's signature). The entropy H is
    independent of log K except for 'free', where log K + H = 8 + small noise (conserved with H as the
    potential)."""
    n = WINDOWS * T
    if kind == "pinned":
        s = 10 + 0.05 * rng.standard_normal(n)
    else:
        s = rng.gamma(2.0, 1.5, n)
    log_k = 3 - s + 0.05 * rng.standard_normal(n) if kind == "conserved" else 5 + 0.6 * rng.standard_normal(n)
    h = 8 - log_k + 0.05 * rng.standard_normal(n) if kind == "free" else rng.gamma(3.0, 1.0, n)
    t = np.tile(np.arange(T), WINDOWS)
    lp, kin = -s, np.exp(log_k)
    # The energy is undefined at the first and last positions of a window (as in a real scan).
    edge = (t == 0) | (t == T - 1)
    lp = np.where(t == T - 1, np.nan, lp)
    kin = np.where(t == 0, np.nan, kin)
    q = I.quantities(lp, kin)
    return {"model": np.array([model] * n, dtype=object), "variant": np.array([variant] * n, dtype=object),
            "window": np.repeat(np.arange(WINDOWS), T), "document": np.repeat(np.arange(WINDOWS), T),
            "position": t, "t": t, "token": rng.integers(0, 50, n), "log_prob": lp, "surprisal": -lp,
            "kinetic": kin, "log_kinetic": q["log_kinetic"], "log_energy": q["log_energy"],
            "additive_energy": q["additive_energy"], "log_lagrangian": q["log_lagrangian"], "entropy": np.where(t == T - 1, np.nan, h),
            "valid": ~edge}


MODELS = (("cons", True, "conserved"), ("free", True, "free"), ("random:x@smollm2-135m", False, "pinned"))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("scan")
    rng = np.random.default_rng(7)
    corpora = ["c1", "c2"]
    for corpus in corpora:
        d = root / corpus
        d.mkdir()
        cols = [_model_tokens(rng, m, kind, v) for m, _, kind in MODELS for v in ("base", "token_mean")]
        tokens = {c: np.concatenate([x[c] for x in cols]) for c in output.TOKEN_COLUMNS}
        with (d / "tokens.csv").open("w") as f:
            f.write(",".join(output.TOKEN_COLUMNS) + "\n")
            for row in zip(*(tokens[c].tolist() for c in output.TOKEN_COLUMNS)):
                f.write(",".join(str(v) for v in row) + "\n")
        summary = [{"model": m, "variant": v, "pairing": p, "trained": str(tr), "log_vocab": 10.0, "tokens": WINDOWS * T,
                    "forward_ms_per_1k": 10.0, "energy_ms_per_1k": 5.0}
                   for m, tr, _ in MODELS for v in ("base", "token_mean") for p in ("same", "shifted")]
        output.write_csv(d / "summary.csv", summary)
        (d / "quantiles.csv").write_text("model,variant,pairing,quantity,quantile,value\n")
        (d / "metadata.json").write_text(json.dumps({
            "args": {"window": T, "max_tokens": WINDOWS * T, "batch_size": 2, "dtype": "torch.float32",
                     "controls": ["token-mean"], "layers": []},
            "device": "cpu", "heldout_split": "every 5th window", "versions": {}, "git_sha": None,
            "models": [{"label": m, "wall_s": 1.0} for m, _, _ in MODELS]}))
    (root / "findings_run.json").write_text(json.dumps({
        "corpora": corpora, "skipped": [{"model": "gemma3-270m", "install": "mppm setup gemma3-270m --accept-gemma-terms"}],
        "heldout_tokens": {c: {m: list(range(25)) for m, _, _ in MODELS} for c in corpora}, "elapsed_s": 1.0}))
    return root


def test_sample_statistics_match_a_direct_computation(saved):
    r = F.load(saved, replicates=50)
    tok = output.read_tokens(saved / "c1")
    rows = (tok["model"] == "free") & (tok["variant"] == "base") & tok["valid"] & (tok["kinetic"] > 0)
    e = tok["kinetic"][rows] * np.exp(tok["surprisal"][rows])
    assert r.get("free", "pooled_cv_energy", scope="c1")[0] == pytest.approx(e.std() / e.mean(), rel=1e-12)
    corr = np.corrcoef(tok["log_kinetic"][rows], tok["surprisal"][rows])[0, 1]
    assert r.get("free", "pooled_corr", scope="c1")[0] == pytest.approx(corr, rel=1e-10)
    # Per window: the mean over windows of each window's CV.
    w = tok["window"][rows]
    cvs = [e[w == i].std() / e[w == i].mean() for i in np.unique(w)]
    assert r.get("free", "seq_cv_energy", scope="c1")[0] == pytest.approx(np.mean(cvs), rel=1e-12)
    # Both corpora pooled = the positions of both together.
    both = []
    for c in ("c1", "c2"):
        tk = output.read_tokens(saved / c)
        rw = (tk["model"] == "free") & (tk["variant"] == "base") & tk["valid"] & (tk["kinetic"] > 0)
        both.append(tk["kinetic"][rw] * np.exp(tk["surprisal"][rw]))
    both = np.concatenate(both)
    assert r.get("free", "pooled_cv_energy")[0] == pytest.approx(both.std() / both.mean(), rel=1e-12)
    # The entropy reading: H's mean, and std(log K + H) / sqrt(std^2(log K) + std^2(H)) per window.
    h = tok["entropy"][rows]
    assert r.get("free", "pooled_mean_entropy", scope="c1")[0] == pytest.approx(h.mean(), rel=1e-12)
    lk = tok["log_kinetic"][rows]
    ratios = [(lk[w == i] + h[w == i]).std() / np.hypot(lk[w == i].std(), h[w == i].std()) for i in np.unique(w)]
    got = r.get("free", "seq_std_ratio_entropy", scope="c1")[0]
    # The per-window stds average before the ratio is taken (as for std(log E)), not the ratios.
    want = np.mean([(lk[w == i] + h[w == i]).std() for i in np.unique(w)]) / np.hypot(
        np.mean([lk[w == i].std() for i in np.unique(w)]), np.mean([h[w == i].std() for i in np.unique(w)]))
    assert got == pytest.approx(want, rel=1e-10) and got < 0.2 and max(ratios) < 0.3


def test_bootstrap_interval_covers_and_is_seeded(saved):
    a, b = F.load(saved, replicates=200), F.load(saved, replicates=200)
    point, lo, hi = I.interval(a.get("free", "seq_cv_energy"))
    assert lo < point < hi and I.interval(b.get("free", "seq_cv_energy")) == (point, lo, hi)


def test_verdict_reads_the_whole_interval():
    assert F.verdict(np.array([-1.0, -0.5, -0.2, -0.1])) == "yes"
    assert F.verdict(np.array([1.0, 0.5, 0.2, 0.1])) == "no"
    assert F.verdict(np.array([0.1, -0.5, 0.2, 0.4])) == "undecided"
    assert F.verdict(np.array([0.6, 0.4, 0.9]), 0.5) == "undecided"
    assert F.verdict(np.array([0.3, 0.6, 0.9]), 0.5) == "no"  # index 0 is the sample, not a replicate


def _cells(text: str, model: str, head_start: str) -> dict[str, str]:
    """The row of ``model`` in the first table whose header starts with ``head_start``, by column name."""
    lines = text.splitlines()
    i = next(k for k, line in enumerate(lines) if line.startswith(head_start))
    head = [c.strip() for c in lines[i].strip("|").split("|")]
    for line in lines[i + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] == model:
            return dict(zip(head, cells))
    raise AssertionError(f"{model} not in the table")


def _interval(cell: str) -> tuple[float, float]:
    lo, hi = re.search(r"\[(\S+), (\S+)\]", cell).groups()
    return tuple(float(x.replace("−", "-")) for x in (lo, hi))


def _follows(cell: str, threshold: float = 0.0) -> str:
    lo, hi = _interval(cell)
    return "yes" if hi < threshold else ("no" if lo > threshold else "undecided")


def test_report_verdicts_follow_from_the_printed_intervals(saved, tmp_path):
    report = tmp_path / "docs" / "findings.md"
    F.write(saved, report, plots=tmp_path / "docs" / "findings", replicates=300)
    text = report.read_text()
    assert "- gemma3-270m: install with `mppm setup gemma3-270m --accept-gemma-terms`" in text.split("## Setup")[0]
    expected = {"cons": "yes", "free": "no", "random:x@smollm2-135m": "no"}
    for model, want in expected.items():
        row = _cells(text, model, "| model | kind | tokens read")
        assert row["E conserved?"] == _follows(row["CV(E) − min(CV(K), CV(PPL))"]) == want
        assert row["log E far below?"] == _follows(row["ratio"], F.FAR_BELOW)
    assert _cells(text, "cons", "| model | kind | tokens read")["log E far below?"] == "yes"
    # ℓ = log K - s: the conserved model's ℓ sits at 3 with a tiny spread; the free one's CV is undefined or not.
    assert "**1. Is E conserved (CV(E) below both CV(K) and CV(PPL))?** **Not for every model.**" in text
    assert "for 1 of 3 models" in text
    # The entropy as the potential: only 'free' has log K + H nearly constant.
    paper = text.split("predictive entropy H, nats (mean)")[1]
    assert "far below 1 (< 0.5, whole interval) for 1 of them (1 yes, 2 no)" in paper
    assert "conserves it for 1 of 3 models" in paper
    # Every number is printed with at most 3 significant digits (no 16-digit floats).
    assert not re.search(r"\d\.\d{6,}", text)
    # Every local link resolves from the report's folder.
    for target in re.findall(r"\]\(([^)]+)\)", text):
        assert (report.parent / target).exists(), target


def test_cv_rule_marks_offsets_inside_the_spread():
    stats = {"seq_cv_additive_energy": np.array([2.5]), "seq_cv_log_lagrangian": np.array([0.4])}
    assert not I.cv_defined(stats, "additive_energy") and I.cv_defined(stats, "log_lagrangian")
    assert I.cv_defined({}, "energy")


def test_findings_end_to_end_on_tiny_models(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    from mppm_ext.models import loading
    from mppm_ext.scan import cli

    # Whether SmolLM2 is installed here or not, the test scans tiny models only and reports it as skipped.
    monkeypatch.setattr(loading, "installed_gguf", lambda name: None)
    report = tmp_path / "findings.md"
    args = ["findings", "--out", str(tmp_path / "findings"), "--report", str(report), "--models", "smollm2-135m",
            "random:gpt2-tiny", "random:pythia-tiny", "--corpora", "tiny", "--window", "24", "--max-tokens", "120",
            "--batch-size", "4", "--no-progress"]
    assert cli.main(args) == 0
    text = report.read_text()
    summary = output.read_csv(tmp_path / "findings" / "scan" / "tiny" / "summary.csv")
    assert [r["model"] for r in summary if r["variant"] == "base" and r["pairing"] == "same"] == \
        ["random:gpt2-tiny", "random:pythia-tiny"]
    assert "**120 scanned tokens per model and corpus**" in text
    assert "- smollm2-135m: install with `mppm setup smollm2-135m`" in text
    meta = json.loads((tmp_path / "findings" / "scan" / "tiny" / "metadata.json").read_text())
    assert {m["scanned_tokens"] for m in meta["models"]} == {120}
    assert {m["forwarded_tokens"] for m in meta["models"]} == {240}  # the shuffle control's second pass
    assert "![Per-window CVs with intervals](findings/cv_bars.png)" in text
    assert sorted(p.name for p in (tmp_path / "findings").glob("*.png")) == [
        "cv_bars.png", "logk_vs_surprisal.png", "sequence_random_gpt2-tiny.png", "sequence_random_pythia-tiny.png"]
    again = tmp_path / "again.md"
    assert cli.main(["findings", "--from-scan", str(tmp_path / "findings" / "scan"), "--out",
                     str(tmp_path / "findings"), "--report", str(again)]) == 0
    assert again.read_text() == text
    assert math.isfinite(float(summary[0]["pooled_cv_energy"]))


def test_random_models_can_read_another_tokenizer():
    pytest.importorskip("transformers")
    from mppm_ext import models
    from mppm_ext.models import registry
    from mppm_ext.models.tokenizer import byte_tokenizer

    config = registry.with_tokenizer(registry.config_for("gpt2-tiny")[1], byte_tokenizer())
    assert config.vocab_size == 257 and config.pad_token_id == 256
    with pytest.raises(ValueError, match="not a trained model"):
        models.load("random:gpt2-tiny@no-such-model")
