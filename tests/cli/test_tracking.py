"""--report-to: metrics reach the experiment trackers, with files under the output."""

import json
import os
from pathlib import Path

import pytest
from conftest import assert_one_line_error
from typer.testing import CliRunner

from tipcli.cli import app
from tipcli.tracking import flatten

runner = CliRunner()
TRAIN = ["--strategy", "soft-or", "--keep", "0.5", "--lr", "1e-3", "--train-batch-size", "4",
         "--max-steps", "3", "--train-chunk-size", "16"]


def _scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the TensorBoard event files under ``logdir``, read back by
    tensorboard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted(logdir.rglob("events.out.tfevents.*"))
    assert files, f"no event files under {logdir}"
    out: dict[str, list[tuple[int, float]]] = {}
    for f in files:
        acc = EventAccumulator(str(f))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return out


def test_flatten_nested_metrics():
    assert flatten({"step": 3, "loss": 0.5, "loss_by_quadrant": {"Q1": 0.25, "Q3": 1.0},
                    "note": "x", "ok": True}) == {"loss": 0.5, "loss_by_quadrant/Q1": 0.25,
                                                  "loss_by_quadrant/Q3": 1.0}


def test_train_writes_tensorboard_events_equal_to_metrics(tiny_score, tmp_path):
    pytest.importorskip("tensorboard")  # in the dev extra, so CI runs this
    out = tmp_path / "t"
    r = runner.invoke(app, ["train", str(tiny_score), "-o", str(out), *TRAIN,
                            "--report-to", "tensorboard"])
    assert r.exit_code == 0, r.output
    metrics = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    scalars = _scalars(out / "logs")
    for name in ("loss", "kept_tokens", "grad_norm", "lr", "tokens_per_s", "tokens"):
        assert [s for s, _ in scalars[name]] == [1, 2, 3], name
        assert [v for _, v in scalars[name]] == pytest.approx([m[name] for m in metrics],
                                                              rel=1e-6), name
    quadrant_tags = {t for t in scalars if t.startswith(("loss_by_quadrant/",
                                                         "kept_by_quadrant/"))}
    assert quadrant_tags and quadrant_tags == {f"{k}/{q}" for m in metrics
                                               for k in ("loss_by_quadrant", "kept_by_quadrant")
                                               for q in m[k]}


def test_distill_logs_training_and_evaluation(tiny_pair, prompts_file, tmp_path):
    pytest.importorskip("tensorboard")
    from tipcli.configs import DistillConfig, resolve
    from tipcli.stages.distill import run_distill

    run = run_distill(resolve(
        DistillConfig, student=str(tiny_pair[0]), teacher=str(tiny_pair[1]),
        prompts=str(prompts_file), output=str(tmp_path / "run"), iterations=2, num_samples=2,
        max_new_tokens=8, sample_batch_size=4, train_batch_size=2, max_steps=2, lr=1e-3,
        eval_prompts=str(prompts_file), eval_max_prompts=3, group_size=4,
        report_to="tensorboard"))
    scalars = _scalars(run / "logs")
    assert [s for s, _ in scalars["loss"]] == [1, 2, 3, 4]  # two steps per iteration
    assert [s for s, _ in scalars["eval/accuracy"]] == [0, 2, 4]
    history = json.loads((run / "manifest.json").read_text())["summary"]["history"]
    assert [v for _, v in scalars["eval/accuracy"]] == pytest.approx(
        [h["accuracy"] for h in history])
    for i in range(2):  # the iterations' own train directories hold no tracker files
        assert not (run / f"iter-{i:03d}" / "train" / "logs").exists()


def test_missing_tracker_package_names_the_extra(tiny_score, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real(name, *a))
    r = runner.invoke(app, ["train", str(tiny_score), "-o", str(tmp_path / "t"), *TRAIN,
                            "--report-to", "wandb"])
    assert_one_line_error(r, "--report-to wandb", "pip install 'tipcli[wandb]'")
    assert not (tmp_path / "t").exists()


def test_wandb_offline_run_under_the_output(tiny_score, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "t"
    r = runner.invoke(app, ["train", str(tiny_score), "-o", str(out), *TRAIN,
                            "--report-to", "wandb"])
    assert r.exit_code == 0, r.output
    runs = list((out / "logs").rglob("offline-run-*"))
    assert runs and any(f.suffix == ".wandb" for f in runs[0].iterdir()), os.listdir(out / "logs")
