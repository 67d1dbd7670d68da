"""bench/run.py runs every op end to end at toy sizes and writes its files (speed itself is never
asserted in tests: the numbers are for bench/results/, measured on a quiet machine)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_runs_every_op_and_writes_results(tmp_path):
    args = ["--n", "40", "--batch", "1", "4", "--vocab", "97", "--hidden", "16", "--linear-n", "12", "--linear-hidden", "8",
            "--steer-batch", "2", "--steer-hidden", "8", "--steer-vocab", "97", "--steer-targets", "1", "3",
            "--dtypes", "fp32", "--repeats", "1", "--warmup", "0", "--skip", "compile", "--out", str(tmp_path)]
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), *args], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    (result,) = tmp_path.glob("*.json")
    rows = json.loads(result.read_text())["rows"]
    cases = {r["case"] for r in rows}
    assert {c.split()[0] for c in cases} == {"energy", "energy_from_hidden", "steer_step"}
    assert "energy_from_hidden backward N=12 V=97 d=8 fp32" in cases
    assert {c for c in cases if c.startswith("energy ")} == {"energy N=40 B=1 V=97 d=16 fp32", "energy N=40 B=4 V=97 d=16 fp32"}
    for case in cases:
        providers = {r["provider"] for r in rows if r["case"] == case}
        assert "reference (eager)" in providers and any(p.startswith("mppm_ext cpp") for p in providers), providers
        assert all(r["fraction_of_ceiling"] > 0 and r["median_ms"] > 0 for r in rows if r["case"] == case)
    assert len(list(tmp_path.glob("*.csv"))) == 1


def test_bench_parse_only_checks_options_without_a_device():
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--device", "cuda", "--n", "32", "--batch", "1",
                          "8", "--parse-only"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "'batch': [1, 8]" in run.stdout, run.stderr[-2000:]
    bad = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--n", "32", "--batch", "3", "--parse-only"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--batch values must divide --n 32" in bad.stderr
