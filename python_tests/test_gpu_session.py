"""bench/gpu_session.sh: its dry run walks every stage here, without a device, and fails when something a
stage names is missing; the session deadline skips stages instead of overrunning."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["gpu", "build", "selftest", "bench-energy", "bench-linear", "bench-steer", "graph", "profile", "tests-cuda",
          "tests-triton", "memcheck", "racecheck"]


def session(out: Path, *args, timeout=600, **env):
    run = subprocess.run(["bash", str(ROOT / "bench" / "gpu_session.sh"), *args, str(out)], capture_output=True,
                         text=True, timeout=timeout, env={**os.environ, "PYTHON": sys.executable, **env})
    stages = json.loads((out / "session.json").read_text())["stages"] if (out / "session.json").exists() else None
    return run, stages


def test_dry_run_walks_every_stage(tmp_path):
    run, stages = session(tmp_path, "--dry-run")
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert [s["stage"] for s in stages] == STAGES and all(s["status"] == "checked" for s in stages), stages
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["profile.csv", "session.json", "session.log"]  # at most 8 come back from a device machine
    log = (tmp_path / "session.log").read_text()
    for selection in ("'python_tests -k cuda'", "'python_tests/test_triton_cg.py", "test_masks_and_ignore_index"):
        line = next(line for line in log.splitlines() if line.startswith("pytest selection") and selection in line)
        assert int(line.rsplit(": ", 1)[1].split()[0]) > 0, line
    assert log.count("'parse_only': True") == 3 and "'batch': [1, 8]" in log and "'linear_n': 8192" in log
    assert run.stdout.rstrip().splitlines()[-1].startswith("profile cpp:")  # the short table comes last


def test_dry_run_fails_when_a_selection_names_no_test(tmp_path):
    run, stages = session(tmp_path, "--dry-run", "--stages", "memcheck",
                          MPPM_SESSION_MEMCHECK_TESTS="python_tests/test_energy.py::test_no_such_test")
    assert run.returncode == 1
    assert [(s["stage"], s["status"]) for s in stages] == [("memcheck", "failed")]
    assert "CHECK FAILED: pytest selection 'python_tests/test_energy.py::test_no_such_test'" in stages[0]["note"]


def test_deadline_skips_the_stages_it_cannot_fit(tmp_path):
    run, stages = session(tmp_path, "--dry-run", "--stages", "gpu,build", MPPM_SESSION_BUDGET="30")
    assert run.returncode == 0, run.stdout[-3000:]
    assert [(s["stage"], s["status"]) for s in stages] == [("gpu", "skipped"), ("build", "skipped")]
    assert "session deadline" in stages[0]["note"]


def test_unknown_stage_is_refused(tmp_path):
    run, _ = session(tmp_path, "--dry-run", "--stages", "gpu,nonsense")
    assert run.returncode == 2 and "unknown stage 'nonsense'" in run.stderr
