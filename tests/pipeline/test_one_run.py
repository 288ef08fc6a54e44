"""`tip distill` trains one run: one AdamW and one learning-rate schedule across its
iterations, and `tip train --continue-from` does the same stage by stage."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import assert_one_line_error, interrupt_at_call
from safetensors.torch import load_file
from typer.testing import CliRunner

from tipcli.cli import app
from tipcli.configs import DistillConfig, TrainConfig, resolve
from tipcli.stages.distill import run_distill, train_config
from tipcli.stages.train import run_train

runner = CliRunner()
LR = 1e-3


def _cfg(tiny_pair, prompts_file, out, **kw):
    base = dict(student=str(tiny_pair[0]), teacher=str(tiny_pair[1]), prompts=str(prompts_file),
                output=str(out), iterations=3, num_samples=2, max_new_tokens=8, max_steps=2,
                warmup=2, train_batch_size=4, teacher_top_k=8, lr=LR, prompts_per_iteration=4,
                group_size=4)
    base.update(kw)
    return resolve(DistillConfig, **base)


def _metrics(train: Path) -> list[dict]:
    return [json.loads(line) for line in (train / "metrics.jsonl").read_text().splitlines()]


def _optimizer_state(tr) -> dict:
    """AdamW's per-parameter state, copied: {parameter index: {name: tensor}}."""
    return {i: {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
            for i, s in tr.optimizer.state_dict()["state"].items()}


def test_three_iterations_follow_one_schedule_and_keep_adams_state(tiny_pair, prompts_file,
                                                                   tmp_path, monkeypatch):
    import tipcli.stages.train as train_mod

    ends, starts = [], []
    real_save, real_load = train_mod.save_state, train_mod.load_state

    def saving(tr):  # each iteration's AdamW as it ends
        ends.append(_optimizer_state(tr))
        return real_save(tr)

    def loading(tr, path):  # and as the next one starts, once its state is loaded
        real_load(tr, path)
        starts.append(_optimizer_state(tr))

    monkeypatch.setattr(train_mod, "save_state", saving)
    monkeypatch.setattr(train_mod, "load_state", loading)
    run = run_distill(_cfg(tiny_pair, prompts_file, tmp_path / "run"))

    # the learning rate logged at each of the 6 global steps: warmup 2, then one cosine
    logged = [(m["global_step"], m["lr"]) for i in range(3)
              for m in _metrics(run / f"iter-{i:03d}" / "train")]
    expected = [s / 2 if s < 2 else 0.5 * (1 + math.cos(math.pi * (s - 2) / 4))
                for s in range(6)]
    assert [s for s, _ in logged] == [1, 2, 3, 4, 5, 6]
    assert [lr for _, lr in logged] == pytest.approx([LR * e for e in expected], rel=1e-12)
    # iterations 2 and 3 start where the one before ended: Adam's moments and its step count
    assert len(ends) == 3 and len(starts) == 2
    for end, start in zip(ends, starts):
        assert end.keys() == start.keys() and len(end) > 0
        for i in end:
            for k in end[i]:
                assert torch.equal(torch.as_tensor(end[i][k]),
                                   torch.as_tensor(start[i][k])), (i, k)
    assert [float(e[0]["step"]) for e in ends] == [2.0, 4.0, 6.0]
    summaries = [json.loads((run / f"iter-{i:03d}" / "train" / "manifest.json").read_text())
                 ["summary"] for i in range(3)]
    assert [s["global_step"] for s in summaries] == [2, 4, 6]
    assert {s["schedule_steps"] for s in summaries} == {6}
    # each iteration's state went once the next one had continued it; the last stays
    assert [(run / f"iter-{i:03d}" / "train" / "state").is_dir() for i in range(3)] == \
        [False, False, True]


def test_a_shell_loop_with_continue_from_trains_what_distill_does(tiny_pair, prompts_file,
                                                                  tmp_path, monkeypatch):
    """`tip train --continue-from` on the loop's own second selection, with the settings the
    loop gives its training: the weights of the loop's second iteration, bit for bit."""
    import tipcli.stages.distill as distill_mod

    cfg = _cfg(tiny_pair, prompts_file, tmp_path / "run", iterations=2)
    interrupt_at_call(monkeypatch, distill_mod, "train_model", 2)  # before the 2nd training
    with pytest.raises(KeyboardInterrupt):
        run_distill(cfg)
    monkeypatch.undo()
    run = tmp_path / "run"
    # the loop trains its iterations with one schedule over 2 x 2 steps
    assert train_config(cfg, run / "iter-001" / "select", tmp_path / "x").optim \
        .schedule_steps == 4
    r = runner.invoke(app, ["train", str(run / "iter-001" / "select"),
                            "-o", str(tmp_path / "shell"),
                            "--continue-from", str(run / "iter-000" / "train"),
                            "--max-steps", "2", "--warmup", "2", "--schedule-steps", "4",
                            "--lr", str(LR), "--train-batch-size", "4"])
    assert r.exit_code == 0, r.output
    run_distill(cfg)
    a, b = (load_file(str(d / "model.safetensors"))
            for d in (run / "iter-001" / "train", tmp_path / "shell"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [m["global_step"] for m in _metrics(tmp_path / "shell")] == [3, 4]


def _trained(tiny_score, out, **kw) -> Path:
    return run_train(resolve(TrainConfig, input=str(tiny_score), output=str(out), max_steps=2,
                             train_batch_size=4, lr=LR, **kw))


def test_continue_from_refusals(tiny_score, tmp_path):
    first = _trained(tiny_score, tmp_path / "first", schedule_steps=4)
    base = ["train", str(tiny_score), "--max-steps", "2", "--train-batch-size", "4",
            "--lr", str(LR)]

    def refused(out: str, *extra: str, says: str) -> None:
        assert_one_line_error(runner.invoke(app, [*base, "-o", str(tmp_path / out), *extra]),
                              says)
        assert not (tmp_path / out / "manifest.json").exists()  # refused before writing

    # the input was sampled from the tiny student, not from the run named
    refused("a", "--continue-from", str(first), says="was sampled from")
    refused("b", "--continue-from", str(tmp_path / "nothing"), says="not a finished tip train")
    no_state = _trained(tiny_score, tmp_path / "no-state", save_state=False)
    assert not (no_state / "state").exists()
    refused("c", "--continue-from", str(no_state), "--student", str(no_state),
            says="holds no optimizer state")
    refused("d", "--continue-from", str(first), "--student", str(first), "--lr", "2e-3",
            says="--lr 0.001")
    refused("e", "--continue-from", str(first), "--student", str(first), "--max-steps", "3",
            says="set --schedule-steps to at least 5")
    # without --continue-from a run cannot outgrow its own schedule either
    refused("f", "--schedule-steps", "1", says="the learning-rate schedule spans 1")
    # a changed state file is found before anything is trained
    (first / "state" / "scheduler.json").write_text("{}")
    refused("g", "--continue-from", str(first), "--student", str(first),
            says="the state was changed or damaged: drop --continue-from")


def test_continue_from_takes_the_schedule_of_the_run_it_continues(tiny_score, tmp_path):
    first = _trained(tiny_score, tmp_path / "first", schedule_steps=6, warmup=1)
    second = _trained(tiny_score, tmp_path / "second", warmup=1, continue_from=str(first),
                      student=str(first))
    lrs = [m["lr"] for m in _metrics(first) + _metrics(second)]
    expected = [0.0] + [0.5 * (1 + math.cos(math.pi * (s - 1) / 5)) for s in range(1, 4)]
    assert lrs == pytest.approx([LR * e for e in expected], rel=1e-12)
    assert json.loads((second / "manifest.json").read_text())["summary"]["global_step"] == 4
