"""``mppm scan`` and ``mppm report`` end to end on tiny random models, and their answers
to bad input: one line on stderr and exit status 2, never a traceback."""

from __future__ import annotations

import csv
import json
import math

import pytest

pytest.importorskip("transformers")

from mppm_ext.scan import cli, output  # noqa: E402
from mppm_ext.scan._optional import MissingDependencyError  # noqa: E402

SCAN = ["scan", "--model", "random:gpt2-tiny", "--model", "random:opt-tiny", "--corpus", "tiny", "--window", "32",
        "--max-tokens", "160", "--batch-size", "4", "--controls", "shuffle", "pre-norm", "token-mean",
        "--layers", "1", "--no-progress"]
PNG = b"\x89PNG\r\n\x1a\n"


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def scanned(tmp_path_factory):
    out = tmp_path_factory.mktemp("scan")
    assert cli.main(SCAN + ["--out", str(out)]) == 0
    return out


def test_scan_writes_tables_and_metadata(scanned):
    summary = _rows(scanned / "summary.csv")
    variants = {"base", "pre_norm", "layer_1", "token_mean", "shuffled"}
    assert {(r["model"], r["variant"], r["pairing"]) for r in summary} == {
        (m, v, p) for m in ("random:gpt2-tiny", "random:opt-tiny") for v in variants for p in ("same", "shifted")}
    for r in summary:
        assert int(r["tokens"]) == 160 and int(r["positions"]) > 0
        assert float(r["forward_ms_per_1k"]) > 0 and float(r["energy_ms_per_1k"]) > 0
        assert math.isfinite(float(r["pooled_cv_energy"]))
    assert (scanned / "summary.md").read_text().count("| random:") == len(summary)
    meta = json.loads((scanned / "metadata.json").read_text())
    assert meta["args"]["controls"] == ["shuffle", "pre-norm", "token-mean"]
    assert meta["world_size"] == 1 and "torch" in meta["versions"] and "git_sha" in meta
    assert meta["heldout_split"].startswith("every 5th window")
    tokens = output.read_tokens(scanned)
    assert len(tokens["token"]) == 2 * len(variants) * 160
    quantiles = _rows(scanned / "quantiles.csv")
    assert {q["quantity"] for q in quantiles} >= {"energy", "kinetic", "ppl", "surprisal", "log_kinetic"}
    assert _rows(scanned / "histograms.csv")


def test_report_writes_plots_and_markdown(scanned, tmp_path):
    assert cli.main(["report", str(scanned), "--out", str(tmp_path)]) == 0
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert pngs == ["cv_bars.png", "logk_vs_surprisal.png", "sequence_random_gpt2-tiny.png",
                    "sequence_random_opt-tiny.png"]
    for p in tmp_path.glob("*.png"):
        assert p.read_bytes()[:8] == PNG
    text = (tmp_path / "report.md").read_text()
    assert "![CV bars](cv_bars.png)" in text and "random:opt-tiny" in text


def test_csv_fallback_without_pyarrow(tmp_path, monkeypatch):
    monkeypatch.setattr(output, "available", lambda name: name != "pyarrow")
    args = ["scan", "--model", "random:llama-tiny", "--corpus", "tiny", "--window", "16", "--max-tokens", "48",
            "--no-progress", "--out", str(tmp_path)]
    assert cli.main(args) == 0
    assert (tmp_path / "tokens.csv").exists() and not (tmp_path / "tokens.parquet").exists()
    tokens = output.read_tokens(tmp_path)
    assert len(tokens["token"]) == 48 and tokens["valid"].dtype == bool


@pytest.mark.parametrize("argv, message", [
    (["--model", "no-such-model"], "no-such-model"),
    (["--model", "{file}"], "not a .gguf"),
    (["--corpus", "{empty}"], "empty"),
    (["--corpus", "{binary}"], "corpus"),
    (["--out", "{file}/sub"], "cannot write to the output directory"),
    (["--layers", "99"], "layers holds 99; each must be 'mid' or an int in [-3, 2] (this model has 2 blocks) "
                         "or 'final'"),
])
def test_scan_bad_inputs_fail_with_one_line(argv, message, tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "binary.bin").write_bytes(bytes(range(256)) * 4 + b"\x00\xff\xfe")
    (tmp_path / "file").write_text("not a directory")
    base = {"--model": "random:gpt2-tiny", "--corpus": "tiny", "--out": str(tmp_path / "out")}
    fill = {"{empty}": str(tmp_path / "empty.txt"), "{binary}": str(tmp_path / "binary.bin"),
            "{file}": str(tmp_path / "file")}
    for flag, value in zip(argv[::2], argv[1::2]):
        for key, path in fill.items():
            value = value.replace(key, path)
        base[flag] = value
    args = ["scan", "--window", "16", "--max-tokens", "32", "--no-progress"]
    for flag, value in base.items():
        args += [flag, value]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("mppm scan: error:") and message in err and "Traceback" not in err


@pytest.mark.parametrize("flag, value", [("--window", "2"), ("--batch-size", "0"), ("--max-tokens", "x"),
                                         ("--controls", "reverse"), ("--layers", "one")])
def test_scan_bad_argument_values_are_usage_errors(flag, value, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["scan", "--model", "random:gpt2-tiny", "--corpus", "tiny", "--out", str(tmp_path), flag, value])
    assert exc.value.code == 2
    assert flag.lstrip("-").split("-")[0] in capsys.readouterr().err


def test_report_of_a_directory_that_is_no_scan(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path)]) == 2
    assert "no summary.csv" in capsys.readouterr().err


def test_report_without_matplotlib_says_which_extra(scanned, tmp_path, monkeypatch, capsys):
    from mppm_ext.scan import report

    def missing(*a, **k):
        raise MissingDependencyError("mppm report (PNG plots) needs the optional package 'matplotlib' ... "
                                     "pip install 'mppm_ext[plots]'")

    monkeypatch.setattr(report, "_pyplot", missing)
    assert cli.main(["report", str(scanned), "--out", str(tmp_path)]) == 2
    assert "mppm_ext[plots]" in capsys.readouterr().err


def test_require_names_the_extra():
    from mppm_ext.scan._optional import require

    with pytest.raises(MissingDependencyError, match=r"pip install 'mppm_ext\[plots\]'"):
        require("no_such_module_for_mppm", "plots", "plotting")
