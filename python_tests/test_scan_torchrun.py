"""Sharding with torchrun: two CPU processes (gloo) give the same tables as one process."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("transformers")

from mppm_ext.scan.output import read_tokens  # noqa: E402

ARGS = ["--model", "random:gpt2-tiny", "--model", "random:llama-tiny", "--window", "24", "--batch-size", "2",
        "--max-tokens", "400", "--controls", "shuffle", "token-mean", "--no-progress"]
#: Columns that depend on how long each process took, not on what it computed.
TIMING = {"forward_ms_per_1k", "energy_ms_per_1k"}


def _run(cmd, out, cwd):
    # One BLAS thread in every process: the single-process run must do the same arithmetic as each rank
    # (torchrun sets OMP_NUM_THREADS=1 for its workers).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run(cmd + ["--out", str(out)], cwd=cwd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, f"{cmd} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def _summary(path):
    with open(path / "summary.csv", newline="") as f:
        return [{k: v for k, v in row.items() if k not in TIMING} for row in csv.DictReader(f)]


@pytest.mark.slow
def test_two_ranks_merge_to_the_single_process_result(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
                      "must be in want of a wife. " * 6)
    scan = ["--corpus", str(corpus)] + ARGS
    _run([sys.executable, "-m", "mppm_ext.scan"] + scan, tmp_path / "one", tmp_path)
    two = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                "-m", "mppm_ext.scan"] + scan, tmp_path / "two", tmp_path)
    assert "on 2 process(es)" in two.stdout
    assert not (tmp_path / "two" / "parts").exists(), "rank 0 removes the parts once merged"

    a, b = read_tokens(tmp_path / "one"), read_tokens(tmp_path / "two")
    assert set(a) == set(b) and len(a["token"]) == len(b["token"])
    mean_sub = a["variant"] == "token_mean"
    assert mean_sub.any() and (a["variant"] == "shuffled").any()
    for col in a:
        x, y = a[col], b[col]
        if x.dtype.kind == "f":
            # Every rank adds its share of the held-out sums, so the token means (and only they) differ
            # from the single process by the order of float64 additions.
            np.testing.assert_array_equal(x[~mean_sub], y[~mean_sub], err_msg=col)
            np.testing.assert_allclose(x[mean_sub], y[mean_sub], rtol=1e-9, atol=1e-12, err_msg=col)
        else:
            np.testing.assert_array_equal(x, y, err_msg=col)

    one, two_rows = _summary(tmp_path / "one"), _summary(tmp_path / "two")
    assert len(one) == len(two_rows) == 2 * 3 * 2  # models x variants x pairings
    for r1, r2 in zip(one, two_rows):
        for key in r1:
            if r1["variant"] == "token_mean" and key.startswith(("pooled_", "seq_")):
                assert float(r1[key]) == pytest.approx(float(r2[key]), rel=1e-9, nan_ok=True), key
            else:
                assert r1[key] == r2[key], (r1["model"], r1["variant"], key)
