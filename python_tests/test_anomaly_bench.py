"""``mppm anomaly-bench`` end to end on a tiny random model and the shipped corpus (the --quick sizes with
fewer items), its files and report, and its bad-input errors."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

from mppm_ext.anomaly import features as F  # noqa: E402
from mppm_ext.anomaly import tasks as T  # noqa: E402
from mppm_ext.anomaly.bench import evaluate_task  # noqa: E402
from mppm_ext.cli import main  # noqa: E402

COMMON = ["anomaly-bench", "--quick", "--model", "random:llama-tiny", "--donor", "tiny", "--n", "6", "--no-progress"]
ARGS = COMMON + ["--host", "tiny"]


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    assert main(ARGS + ["--out", str(out)]) == 0
    return out


def test_quick_run_writes_every_file(bench_dir):
    rows = [json.loads(line) for line in (bench_dir / "tasks.jsonl").read_text().splitlines()]
    assert {r["task"] for r in rows} == set(T.TASKS)
    for task in T.TASKS:
        group = [r for r in rows if r["task"] == task]
        assert sum(r["label"] for r in group) == 12 and sum(1 - r["label"] for r in group) == 12
        for r in group:
            assert (r["span"] is None) == (r["label"] == 0)
            if r["span"]:
                assert 0 <= r["span"][0] < r["span"][1] <= len(r["text"])
        assert not ({r["doc"] for r in group if r["split"] == "calibration"}
                    & {r["doc"] for r in group if r["split"] == "test"})
    results = json.loads((bench_dir / "results.json").read_text())
    assert len(results["rows"]) == len(T.TASKS) * (len(F.SINGLE) + len(F.LOGISTIC))
    assert {d["verdict"] for d in results["deltas"]} <= {"helps", "hurts", "does not help"}
    for r in results["rows"]:
        assert r["auroc_low"] <= r["auroc"] <= r["auroc_high"]
    with open(bench_dir / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == len(results["rows"])
    assert all((bench_dir / f"roc_{t}.png").stat().st_size > 1000 for t in T.TASKS)
    report = (bench_dir / "report.md").read_text()
    assert "## Answer" in report and "## Verdict per task" in report and "**Overall:" in report
    ov = results["overhead"]
    assert ov["monitored_ms_per_token"] > 0 and ov["monitored_cpu_ms_per_token"] > 0
    # Generation: the prefill is scored from the states, every later step from the model's logits.
    assert ov["computed_from"] == {"logits": ov["new_tokens"] - 1, "hidden": 1}
    # The report is a function of results.json: rewriting it from the file gives the same text.
    from mppm_ext.anomaly import report as report_mod
    assert report_mod.main([str(bench_dir)]) == 0
    assert (bench_dir / "report.md").read_text() == report


def test_evaluate_task_direction_and_calibration_only():
    """A feature that is lower for positives gets direction 'lower'; thresholds come from the calibration
    negatives (a test split shifted upwards shows a test FPR far above 1%)."""
    rng = np.random.default_rng(0)
    n = 200
    y = np.r_[np.zeros(n), np.ones(n)].astype(int)
    docs = np.arange(2 * n) // 2
    split = np.where(docs % 2 == 0, 0, 1)
    agg = {name: rng.normal(size=(2 * n, 3)) for name in F.SINGLE}
    agg["log_kinetic"][:, 1] -= 3.0 * y  # positives have a lower minimum window
    agg["surprisal"][:, 0] += 2.0 * y  # informative, higher for positives
    agg["surprisal"][split == 1] += 5.0  # test texts shifted: a calibration threshold flags them all
    cal, test = np.flatnonzero(split == 0), np.flatnonzero(split == 1)
    rows, delta, _ = evaluate_task(agg, cal, test, y, docs, reps=50, seed=0)
    by = {r["feature"]: r for r in rows}
    assert by["log_kinetic"]["direction"] == "lower" and by["log_kinetic"]["auroc"] > 0.9
    assert by["surprisal"]["direction"] == "higher" and by["surprisal"]["test_fpr"] > 0.9
    assert 0.3 < by["entropy"]["auroc"] < 0.7
    assert delta["verdict"] == "helps" and delta["delta_auroc_low"] > 0


def test_bad_input(tmp_path, capsys):
    blocked = tmp_path / "file"
    blocked.write_text("")
    assert main(ARGS + ["--out", str(blocked / "sub")]) == 2
    assert "not a writable directory" in capsys.readouterr().err
    if __import__("mppm_ext.models.loading", fromlist=["x"]).installed_gguf("gemma3-270m") is None:
        assert main(["anomaly-bench", "--model", "gemma3-270m", "--out", str(tmp_path / "o")]) == 2
        assert "mppm setup gemma3-270m --accept-gemma-terms" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    assert main(COMMON + ["--host", str(empty), "--out", str(tmp_path / "o2")]) == 2
    assert "is empty" in capsys.readouterr().err
    short = tmp_path / "short.txt"
    short.write_text("a few words")
    assert main(COMMON + ["--host", str(short), "--out", str(tmp_path / "o3")]) == 2
    assert "no passage of 48 tokens" in capsys.readouterr().err


def test_matched_splice_sentence_follows_the_interval(bench_dir):
    """The report's matched-splice check says chance-level only when surprisal's interval covers 0.5, and
    gives the reason that fits when it does not; the construction sentence quotes the recorded pairing."""
    from mppm_ext.anomaly.report import _f, _nan, construction_checks

    results = _nan(json.loads((bench_dir / "results.json").read_text()))
    model = results["config"]["task_model"]
    row = next(r for r in results["rows"] if r["model"] == model and r["task"] == "splice_matched"
               and r["feature"] == "surprisal")
    row.update(auroc=0.52, auroc_low=0.45, auroc_high=0.6)
    first = construction_checks(results, model)
    assert "does not detectably separate" in first[0] and "0.520 [0.450, 0.600]" in first[0]
    match = results["config"]["splice_match"]["test"]
    assert any(f"took {match['pool']} further natural passages" in c and _f(match["max_gap"], 2) in c for c in first)
    row.update(auroc=0.8, auroc_low=0.7, auroc_high=0.9)
    assert "still differ in surprisal" in construction_checks(results, model)[0]
    results["config"]["task_model"] = "another"
    assert "not the task model" in construction_checks(results, model)[0]
