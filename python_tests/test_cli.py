"""The assembled ``mppm`` command: every feature's subcommands are listed, and a feature whose optional
dependencies are missing says which extra to install instead of breaking the whole command."""

import subprocess
import sys

import pytest

from mppm_ext import cli

BLOCKED_RUN = """
import sys
sys.modules[{module!r}] = None  # as if the package were not installed
from mppm_ext import cli
sys.exit(cli.main({argv!r}))
"""


def test_every_command_is_listed():
    parser = cli.build_parser()
    commands = set(parser._subparsers._group_actions[0].choices)
    assert commands == set(cli.CORE) | {c for _, names, _ in cli.FEATURES for c in names}


@pytest.mark.parametrize("module,command,extra", [("transformers", "setup", "models"),
                                                  ("transformers", "scan", "scan,plots"),
                                                  ("transformers", "steer-eval", "steer")])
def test_missing_extra_names_what_to_install(tmp_path, module, command, extra):
    argv = [command, "--model", "random:gpt2-tiny", "--corpus", "tiny", "--out", str(tmp_path / "out")]
    if command != "scan":
        argv = [command, "--out", str(tmp_path / "out")]
    run = subprocess.run([sys.executable, "-P", "-c", BLOCKED_RUN.format(module=module, argv=argv)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr
    assert f"pip install 'mppm_ext[{extra}]'" in run.stderr and module in run.stderr


def test_version_prints_the_package_version_and_its_build(capsys):
    import mppm_ext

    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
    out = capsys.readouterr().out.strip()
    info = mppm_ext.build_info()
    assert out.startswith(f"mppm_ext {mppm_ext.__version__} (") and "\n" not in out
    assert info["compiler"] in out and f"using {info['cpu_isa']}" in out
    assert "/".join(info["cpu_isas_compiled"]) in out
    assert ("built without CUDA" in out) != bool(info["cuda"])


def test_steer_eval_help_is_plain_text_with_defaults(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["steer-eval", "--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "``" not in text and ":func:" not in text and ":mod:" not in text
    for default in ("(default: smollm2-135m)", "(default: 24)", "(default: 2.0)", "(default: all)", "(default: 0)"):
        assert default in text, default
