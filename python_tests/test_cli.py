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
    assert commands == {c for _, names, _ in cli.FEATURES for c in names}


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
