"""The CLI contract: every command listed and its help exits 0, instantly."""

import re
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from tipcli.cli import app

runner = CliRunner()
COMMANDS = ["rollout", "score", "select", "train", "report", "eval", "distill", "demo",
            "student"]  # in the order tip --help lists them


def listed_commands(help_text: str) -> list[str]:
    """The command names in the Commands panel of ``tip --help``, in order (a name that only
    appears inside another command's description is not one)."""
    panel = help_text.split("Commands", 1)[1]
    return re.findall(r"^\W*([a-z]+)  +\S", panel, re.M)


def test_help_lists_every_command():
    r = runner.invoke(app, ["--help"])
    assert r.exit_code == 0
    assert listed_commands(r.stdout) == COMMANDS


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


def _readme_commands():
    """Every `tip CMD ...` line in the README's code blocks, joined across backslashes."""
    from pathlib import Path

    text = Path(__file__).resolve().parents[2].joinpath("README.md").read_text()
    blocks = text.split("```")[1::2]
    lines = " ".join(b.replace("\\\n", " ") for b in blocks).replace("|", "\n").splitlines()
    for line in " \n".join(lines).split("\n"):
        words = line.split()
        while words and words[0] != "tip":
            words.pop(0)
        if len(words) > 1:
            yield words[1], [w.split("=")[0] for w in words[2:] if w.startswith("--")]


def test_readme_commands_and_flags_exist():
    seen = 0
    for cmd, flags in _readme_commands():
        r = runner.invoke(app, [cmd, "--help"], terminal_width=400)
        assert r.exit_code == 0, f"README uses unknown command tip {cmd}"
        for flag in flags:
            assert flag in r.stdout, f"README uses tip {cmd} {flag}, which does not exist"
        seen += 1
    assert seen >= 6
