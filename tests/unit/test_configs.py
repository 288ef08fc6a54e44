"""The config layer: every setting declared once, layered defaults < file < flags, checked
strictly, and the CLI generated from it."""

import dataclasses
import json
import math
import subprocess
import sys

import pytest
from conftest import assert_one_line_error
from typer.testing import CliRunner

from tipcli import __version__
from tipcli.cli import app
from tipcli.configs import (
    STAGE_CONFIGS,
    DistillConfig,
    RolloutConfig,
    SelectConfig,
    Selection,
    TrainConfig,
    from_flat,
    resolve,
    to_flat,
)
from tipcli.errors import ConfigError
from tipcli.settings import leaves, problems

runner = CliRunner()
SELECTION_FLAGS = [leaf.flag for leaf in leaves(Selection)]


@pytest.mark.parametrize("name", sorted(STAGE_CONFIGS))
def test_every_setting_has_one_name_help_and_a_valid_default(name):
    cls = STAGE_CONFIGS[name]
    names = [leaf.name for leaf in leaves(cls)]
    assert len(names) == len(set(names))
    assert all(leaf.help.strip() for leaf in leaves(cls))
    # the defaults break no rule but "required"
    assert all("is required" in p for p in problems(cls())), problems(cls())


@pytest.mark.parametrize("name", sorted(STAGE_CONFIGS))
def test_help_offers_exactly_the_config_settings(name):
    r = runner.invoke(app, [name, "--help"], terminal_width=300)
    assert r.exit_code == 0, r.output
    for leaf in leaves(STAGE_CONFIGS[name]):
        shown = leaf.meta["argument"] or leaf.flag
        assert shown in r.stdout, (name, shown)


@pytest.mark.parametrize("cmd", ["train", "distill", "select"])
def test_every_selection_setting_is_a_flag(cmd):
    r = runner.invoke(app, [cmd, "--help"], terminal_width=300)
    for flag in SELECTION_FLAGS:
        assert flag in r.stdout, (cmd, flag)
    assert {"--alpha", "--tau-h", "--tau-d"} <= set(SELECTION_FLAGS)


def test_layering_defaults_then_file_then_flags(tmp_path):
    f = tmp_path / "s.toml"
    f.write_text('keep = 0.2\ngroup-size = 8\n[selection]\nstrategy = "q3"\n')
    cfg = resolve(SelectConfig, f, score="s", output="o", group_size=16)
    assert (cfg.selection.keep, cfg.selection.group_size, cfg.selection.strategy) == \
        (0.2, 16, "q3")
    assert cfg.selection.divergence == "rkl"  # a default
    y = tmp_path / "s.yaml"
    y.write_text("keep: 0.3\n")
    assert resolve(SelectConfig, y, score="s", output="o").selection.keep == 0.3


def test_stage_defaults_of_a_shared_group_differ_where_declared():
    d = resolve(DistillConfig, student="s", teacher="t", prompts="p", output="o")
    r = resolve(RolloutConfig, student="s", prompts="p", output="o")
    assert (d.sampling.num_samples, d.sampling.sample_batch_size, d.optim.lr) == (4, 16, 1e-5)
    assert (r.sampling.num_samples, r.sampling.sample_batch_size) == (1, 8)
    flat = to_flat(d)
    assert flat["sample_batch_size"] == 16 and flat["teacher_top_k"] == 64 and \
        flat["sample_top_k"] == 0


def test_flat_round_trip_and_manifest_config_is_a_settings_file(tmp_path):
    cfg = resolve(TrainConfig, input="i", output="o", keep=0.3, lr=2e-5, tau_h=0.4,
                  report_to="tensorboard", device="cpu")
    flat = to_flat(cfg)
    assert from_flat(TrainConfig, flat) == cfg
    f = tmp_path / "cfg.json"
    f.write_text(json.dumps(flat))
    assert resolve(TrainConfig, f) == cfg


def _assert_left_out(err: str, path, names: list[str]) -> None:
    if not names:
        assert err == "", err
        return
    assert err.count("\n") == 1 and err.startswith(f"notice: {path}: left out"), err
    assert err.strip().endswith(", ".join("--" + n.replace("_", "-") for n in names)), err


def test_a_manifest_or_its_config_is_a_settings_file_for_its_command_and_the_next(
        tiny_pair, tiny_rollout, tiny_score, tmp_path, capsys):
    """Each stage's manifest, and its config object saved alone, serve as --config for the
    command that wrote it (the same settings) and for the next stage's; what a command does
    not take (another stage's settings, what train records beside its own) is left out
    with one notice on stderr listing it."""
    from tipcli.configs import ScoreConfig
    from tipcli.stages.select import run_select
    from tipcli.stages.train import run_train

    sel = run_select(resolve(SelectConfig, score=str(tiny_score), output=str(tmp_path / "s")))
    trained = run_train(resolve(TrainConfig, input=str(sel), output=str(tmp_path / "t"),
                                strategy="all", max_steps=1, train_batch_size=4, lr=1e-3))
    paths = {"student": str(tiny_pair[0]), "prompts": "p", "rollout": str(tiny_rollout),
             "teacher": str(tiny_pair[1]), "score": str(tiny_score), "input": str(sel),
             "output": str(tmp_path / "next")}
    chain = [(tiny_rollout, RolloutConfig, ScoreConfig), (tiny_score, ScoreConfig, SelectConfig),
             (sel, SelectConfig, TrainConfig), (trained, TrainConfig, RolloutConfig)]
    for d, same, after in chain:
        record = json.loads((d / "manifest.json").read_text())["config"]
        (tmp_path / "config.json").write_text(json.dumps(record))
        for f in (d / "manifest.json", tmp_path / "config.json"):
            capsys.readouterr()
            taken = to_flat(resolve(same, f))
            assert taken == {k: record[k] for k in taken}, (d, f)  # the settings it ran with
            left = [k for k in record if k not in taken]  # train's: --score-temperature ...
            _assert_left_out(capsys.readouterr().err, f, left)
            nxt = to_flat(resolve(after, f, **{k.name: paths[k.name] for k in leaves(after)
                                               if k.meta["required"]}))
            assert nxt["output"] == paths["output"]
            _assert_left_out(capsys.readouterr().err, f, [k for k in record if k not in nxt])
    r = runner.invoke(app, ["select", str(tiny_score), "--config", str(sel / "manifest.json")])
    assert r.exit_code == 0 and r.stdout.strip() == str(sel)  # the same run: done already


@pytest.mark.parametrize("setting,value,needle", [
    ("keep", "abc", "--keep must be a number"),
    ("keep", None, "--keep must be a number (got null)"),
    ("train_batch_size", True, "--train-batch-size must be an integer (got true)"),
    ("train_batch_size", 2.5, "--train-batch-size must be an integer"),
    ("strategy", 3, "--strategy must be a string"),
    ("shuffle", "yes", "--shuffle must be true or false"),
    ("lr", float("nan"), "--lr must be a finite number"),
    ("max_grad_norm", float("inf"), "--max-grad-norm must be a finite number"),
])
def test_settings_file_types_are_checked(tmp_path, setting, value, needle):
    f = tmp_path / "bad.json"
    f.write_text(json.dumps({setting: value}))
    with pytest.raises(ConfigError) as exc:
        resolve(TrainConfig, f, input="i", output="o")
    assert any(needle in p for p in exc.value.problems), exc.value.problems


def test_nan_and_inf_flags_are_refused_before_anything_loads(tmp_path):
    for flag, value in (("--temperature", "nan"), ("--temperature", "inf"), ("--top-p", "nan")):
        r = runner.invoke(app, ["rollout", "--student", str(tmp_path / "none"), "--prompts",
                                str(tmp_path / "none.jsonl"), "-o", str(tmp_path / "r"), flag,
                                value])
        assert_one_line_error(r, flag)
        assert not (tmp_path / "r").exists()


def test_unknown_setting_in_a_file_and_unknown_flag(tmp_path):
    f = tmp_path / "c.json"
    f.write_text('{"kepe": 0.5}')
    r = runner.invoke(app, ["select", "s", "-o", "o", "--config", str(f)])
    assert_one_line_error(r, "unknown setting 'kepe'")
    r = runner.invoke(app, ["select", "s", "-o", "o", "--kepe", "0.5"])
    assert_one_line_error(r, "--kepe", "tip select --help")


def test_a_rule_between_settings_and_every_problem_at_once():
    with pytest.raises(ConfigError) as exc:
        resolve(RolloutConfig, student="s", prompts="p", output="o", sample_batch_size=3,
                shard_size=8)
    assert exc.value.problems == ["--shard-size must be a multiple of --sample-batch-size"]
    with pytest.raises(ConfigError) as exc:
        resolve(TrainConfig, input="i", output="o", loss="rkl-full", keep=0, lr=-1)
    assert len(exc.value.problems) == 3


def test_version():
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and r.stdout.strip() == f"tip {__version__}"


def test_distill_device_cpu_reaches_training(monkeypatch, tmp_path):
    """`tip distill --device cpu` trains on the CPU even where a GPU exists."""
    import torch

    from tipcli.stages.distill import train_config
    from tipcli.stages.train import accelerator_kwargs

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cfg = resolve(DistillConfig, student="s", teacher="t", prompts="p", output=str(tmp_path),
                  device="cpu", keep=0.3, alpha=2.0, tau_h=0.1)
    tcfg = train_config(cfg, tmp_path / "select", tmp_path / "train", prompts=64)
    assert tcfg.runtime.device == "cpu" and accelerator_kwargs(tcfg)["cpu"] is True
    # one schedule over the loop: 2 iterations x (64 prompts x 4 samples / 8 a step)
    assert tcfg.selection == cfg.selection and \
        tcfg.optim == dataclasses.replace(cfg.optim, schedule_steps=2 * 32)
    auto = train_config(resolve(DistillConfig, student="s", teacher="t", prompts="p",
                                output=str(tmp_path)), tmp_path / "s", tmp_path / "t")
    assert accelerator_kwargs(auto) == {"cpu": False, "mixed_precision": "bf16"}


def test_the_loops_schedule_spans_every_iteration():
    from tipcli.stages.distill import schedule_steps

    def steps(world=1, prompts=100, **kw):
        return schedule_steps(resolve(DistillConfig, student="s", teacher="t", prompts="p",
                                      output="o", **kw), prompts, world)

    assert steps(iterations=3, max_steps=2) == 6  # --max-steps an iteration
    assert steps(iterations=3, max_steps=2, schedule_steps=10) == 10  # as given
    # one epoch of every sampled sequence: 3 x (100 prompts x 4 samples / 8 a step)
    assert steps(iterations=3) == 3 * 50
    assert steps(iterations=3, world=2) == 3 * 25  # the global batch is 16
    assert steps(iterations=2, epochs=2, prompts_per_iteration=10, grad_accum=2) == 2 * 2 * 2
    assert steps(iterations=2, prompts=1) == 2  # at least a step an iteration


def test_help_imports_no_torch_and_range_text():
    code = ("import sys; from tipcli.cli import app; from tipcli import configs; "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
    r = runner.invoke(app, ["select", "--help"], env={"COLUMNS": "300"})
    assert "(in (0, 1]) [default: 0.5]" in r.stdout
    assert not math.isnan(resolve(SelectConfig, score="s", output="o").selection.keep)
