"""`mppm selftest`: it passes on this machine, and it fails (exit status 1, naming the output) when a
backend is made wrong; the comparison rule it shares with the test suite catches what it must."""

import dataclasses
import json
import subprocess
import sys

import pytest
import torch

import mppm_ext
from mppm_ext import STAT_QUANTITIES, TOKEN_QUANTITIES, selftest


def test_selftest_passes_here(tmp_path):
    out = tmp_path / "selftest.json"
    run = subprocess.run([sys.executable, "-P", "-m", "mppm_ext.cli", "selftest", "--json", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    expected = {f"cpp [{isa}]" for isa in mppm_ext.cpu_isas()} | {"reference"}
    if torch.cuda.is_available():
        expected |= {"cuda", "triton"}
    else:
        assert "triton: skipped: CPU tensors run only in Triton's interpreter" in run.stdout
    assert {r["backend"] for r in rows} == expected
    assert len(rows) == len(expected) * len(selftest.OPS) * len(selftest.DTYPES)
    assert all(r["ok"] and r["worst"]["ratio"] <= 1 for r in rows)
    assert "worst error / allowed" in run.stdout and f"{len(rows)} checks, 0 disagree" in run.stdout


def _perturbed(fn, impl, edit):
    """``fn`` whose results for ``impl`` pass through ``edit``."""
    def call(*args, **kwargs):
        result = fn(*args, **kwargs)
        return edit(result) if kwargs.get("impl") == impl else result
    return call


WRONG = {
    # (public function, the edit, the output it breaks)
    "energy": (lambda r: dataclasses.replace(r, log_energy=r.log_energy * (1 + 1e-5)), "log_energy"),
    "energy_from_hidden": (lambda r: dataclasses.replace(r, stats=dataclasses.replace(
        r.stats, mean={**r.stats.mean, "ppl": r.stats.mean["ppl"] * (1 + 1e-5)})), "stats.mean[ppl]"),
    # delta_h ~ 0.1: its bound is mostly ATOL = 1e-6, so 1e-5 relative would hide in it.
    "steer_step": (lambda r: dataclasses.replace(r, delta_h=r.delta_h * (1 + 1e-4)), "delta_h"),
}


@pytest.mark.parametrize("op", sorted(WRONG))
def test_selftest_fails_and_names_a_wrong_backend(op, monkeypatch, capsys):
    edit, broken = WRONG[op]
    monkeypatch.setattr(mppm_ext, op, _perturbed(getattr(mppm_ext, op), "cpp", edit))
    assert selftest.main(["--ops", op, "--dtypes", "fp32"]) == 1
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("DISAGREES:")]
    assert lines and all(line.startswith(f"DISAGREES: cpp [") and f" {op} fp32: {broken}: " in line for line in lines), out
    assert len(lines) == len(mppm_ext.cpu_isas())  # every instruction set's row, and no other output
    assert f"{len(mppm_ext.cpu_isas()) + 1} checks, {len(lines)} disagree" in out


def test_selftest_reports_a_backend_that_raises(monkeypatch, capsys):
    def broken(*args, **kwargs):
        if kwargs.get("impl") == "cpp":
            raise RuntimeError("kernel exploded")
        return real(*args, **kwargs)

    real = mppm_ext.energy
    monkeypatch.setattr(mppm_ext, "energy", broken)
    assert selftest.main(["--ops", "energy", "--dtypes", "bf16"]) == 1
    assert "energy bf16: raised RuntimeError: kernel exploded" in capsys.readouterr().out


def test_every_output_of_a_result_is_compared():
    hidden, logits = torch.randn(2, 5, 3), torch.randn(2, 5, 11)
    result = mppm_ext.energy(hidden, logits, torch.randint(0, 11, (2, 5)))
    names = {name for name, _ in selftest.named_tensors(result)}
    expected = set(TOKEN_QUANTITIES) | {"valid", "stats.count", "stats.zero_kinetic", "stats.corr_log_kinetic_surprisal"}
    expected |= {f"stats.{kind}[{q}]" for kind in ("mean", "std", "cv") for q in STAT_QUANTITIES}
    assert names == expected
    agreements = selftest.compare_results(result, result, result)
    assert {a.name for a in agreements} == expected and all(a.problem is None for a in agreements)


def test_compare_applies_the_rule():
    truth = torch.tensor([1.0, 2.0, float("nan"), float("inf")], dtype=torch.float64)
    ref = truth + torch.tensor([1e-4, 0, 0, 0], dtype=torch.float64)
    bound = selftest.K * 1e-4 + selftest.ATOL + selftest.RTOL * 2.0
    inside = truth + torch.tensor([0, 0.99 * bound, 0, 0], dtype=torch.float64)
    outside = truth + torch.tensor([0, 1.01 * bound, 0, 0], dtype=torch.float64)
    ok = selftest.compare(inside.float(), ref, truth, "x")
    assert ok.problem is None and 0.98 < ok.ratio < 1
    bad = selftest.compare(outside.float(), ref, truth, "x")
    assert bad.problem is not None and bad.problem.startswith("[1]: ") and bad.ratio > 1
    nan_where_defined = truth.clone()
    nan_where_defined[0] = float("nan")
    assert "NaN pattern" in selftest.compare(nan_where_defined, ref, truth, "x").problem
    signs = torch.tensor([1.0, float("inf")], dtype=torch.float64)
    assert "infinities of different sign" in selftest.compare(-signs, signs, signs, "x").problem
    assert selftest.compare(torch.tensor([1, 2]), torch.tensor([1, 2]), torch.tensor([1, 3]), "n").problem.startswith("[1]")
