"""Flags mean one thing: every flag name is the same setting in every command that has it,
and the old spellings of tip 0.1 still work for one release, each with a one-line notice."""

from __future__ import annotations

import json

import pytest
from conftest import assert_one_line_error
from typer.testing import CliRunner

from tipcli.cli import app
from tipcli.configs import STAGE_CONFIGS, ScoreConfig, resolve
from tipcli.errors import ConfigError
from tipcli.settings import leaves, old_names

runner = CliRunner()


def test_every_flag_is_one_setting_across_commands():
    """A name that belongs to a shared group (sampling, scoring, optimisation, ...) is
    that group's one field everywhere, and no top-level setting of any stage uses it."""
    owner: dict[str, set] = {}
    for cls in STAGE_CONFIGS.values():
        for leaf in leaves(cls):
            group = cls if len(leaf.path) == 1 else type(getattr(cls(), leaf.path[0]))
            owner.setdefault(leaf.name, set()).add(
                ("top-level", leaf.path[0]) if len(leaf.path) == 1 else (group.__name__,
                                                                         leaf.path[1]))
    twice = {name: places for name, places in owner.items() if len(places) > 1}
    assert twice == {}
    for name in ("top_k", "batch_size", "chunk_size"):  # what used to mean several things
        assert name not in owner


@pytest.mark.parametrize("command,old,new", [
    (cmd, o, n) for cmd, cls in STAGE_CONFIGS.items() for o, n in old_names(cls).items()])
def test_old_names_map_per_command(command, old, new):
    cls = STAGE_CONFIGS[command]
    assert new in {leaf.name for leaf in leaves(cls)}
    assert old not in {leaf.name for leaf in leaves(cls)}


def test_old_spelling_is_read_with_a_notice(capsys):
    cfg = resolve(ScoreConfig, rollout="r", teacher="t", output="o", top_k=3, temperature=2.0)
    assert (cfg.scoring.teacher_top_k, cfg.scoring.score_temperature) == (3, 2.0)
    err = capsys.readouterr().err.splitlines()
    assert err == ["warning: --top-k is deprecated: it is now --teacher-top-k (the old name "
                   "works until the next release)",
                   "warning: --temperature is deprecated: it is now --score-temperature (the "
                   "old name works until the next release)"]


def test_old_and_new_spelling_together_are_refused():
    with pytest.raises(ConfigError, match="give --teacher-top-k only"):
        resolve(ScoreConfig, rollout="r", teacher="t", output="o", top_k=3, teacher_top_k=4)


def test_old_key_in_a_settings_file(tmp_path, capsys):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"batch_size": 3, "chunk_size": 5}))
    cfg = resolve(ScoreConfig, f, rollout="r", teacher="t", output="o")
    assert (cfg.scoring.score_batch_size, cfg.scoring.score_chunk_size) == (3, 5)
    assert f"in {f} is deprecated" in capsys.readouterr().err


@pytest.mark.parametrize("command,flag,setting", [
    ("rollout", "--top-k", "sample_top_k"), ("score", "--top-k", "teacher_top_k"),
    ("train", "--batch-size", "train_batch_size"), ("distill", "--top-k", "teacher_top_k"),
    ("distill", "--rollout-batch-size", "sample_batch_size")])
def test_old_flag_on_the_command_line(command, flag, setting, tmp_path, monkeypatch):
    """The hidden old flag reaches the new setting: captured at the library call."""
    import importlib

    from tipcli.cli import COMMANDS

    module, func = COMMANDS[command][0].split(":")
    seen = {}

    def capture(cfg, **kw):
        from tipcli.settings import to_flat

        seen.update(to_flat(cfg))
        return tmp_path

    monkeypatch.setattr(importlib.import_module(module), func, capture)
    args = {"rollout": ["rollout", "-s", "m", "-p", "p.jsonl"],
            "score": ["score", "r", "-t", "m"], "train": ["train", "r"],
            "distill": ["distill", "-s", "m", "-t", "m", "-p", "p.jsonl"]}[command]
    r = runner.invoke(app, [*args, "-o", str(tmp_path / "o"), flag, "7"])
    assert r.exit_code == 0, r.output
    assert seen[setting] == 7
    assert f"warning: {flag} is deprecated" in r.stderr
    assert flag not in runner.invoke(app, [command, "--help"]).stdout  # hidden


def test_old_manifest_names_are_read_as_the_new_ones(tiny_score, tmp_path):
    """A directory tip 0.1 wrote keeps the old names in its manifest: read under the new."""
    import shutil

    from tipcli.store.stagedir import StageDir

    old = tmp_path / "score"
    shutil.copytree(tiny_score, old)
    m = json.loads((old / "manifest.json").read_text())
    c = m["config"]
    for new, was in (("teacher_top_k", "top_k"), ("score_temperature", "temperature"),
                     ("score_batch_size", "batch_size"), ("score_chunk_size", "chunk_size")):
        c[was] = c.pop(new)
    (old / "manifest.json").write_text(json.dumps(m))
    cfg = StageDir.open(old, stage="score").config
    assert cfg["teacher_top_k"] == 8 and "top_k" not in cfg


def test_flag_renames_in_help(tmp_path):
    out = runner.invoke(app, ["score", "--help"]).stdout
    assert "--teacher-top-k" in out and "--score-batch-size" in out
    r = runner.invoke(app, ["select", str(tmp_path), "-o", str(tmp_path / "o"), "--top-k", "3"])
    assert_one_line_error(r, "No such option: --top-k")
