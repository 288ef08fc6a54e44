"""The CLI contract: every command listed and its help exits 0, instantly."""

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from tipcli.cli import app

runner = CliRunner()
COMMANDS = ["rollout", "score", "select", "report", "train", "eval", "distill", "demo"]


def test_help_lists_every_command():
    r = runner.invoke(app, ["--help"])
    assert r.exit_code == 0
    for cmd in COMMANDS:
        assert cmd in r.stdout


@pytest.mark.parametrize("cmd", COMMANDS)
def test_command_help(cmd):
    r = runner.invoke(app, [cmd, "--help"])
    assert r.exit_code == 0, r.output
    assert "Usage" in r.stdout


def test_help_does_not_import_torch():
    code = "import sys; from tipcli.cli import app; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_python_dash_m():
    out = subprocess.run([sys.executable, "-m", "tipcli", "--help"], capture_output=True,
                         text=True)
    assert out.returncode == 0 and "rollout" in out.stdout
