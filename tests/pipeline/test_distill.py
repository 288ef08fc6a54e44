"""`tip distill`: the on-policy loop on the tiny pair, its directories and its resume."""

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from tipcli.configs import DemoConfig, resolve
from tipcli.stages.distill import DistillConfig, run_distill
from tipcli.store.stagedir import StageDir

STAGES = {"prompts.jsonl", "rollout", "score", "select", "train", "eval", "iteration.json"}


def _cfg(tiny_pair, prompts_file, out, **kw):
    base = dict(student=str(tiny_pair[0]), teacher=str(tiny_pair[1]), prompts=str(prompts_file),
                output=str(out), iterations=2, num_samples=2, max_new_tokens=8, max_steps=2,
                train_batch_size=4, teacher_top_k=8, lr=1e-3, eval_prompts=str(prompts_file),
                eval_max_prompts=3, prompts_per_iteration=4, group_size=4)
    base.update(kw)
    return resolve(DistillConfig, **base)


def test_two_iterations_leave_every_stage(tiny_pair, prompts_file, tmp_path, capsys):
    run = run_distill(_cfg(tiny_pair, prompts_file, tmp_path / "run"))
    said = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith(("initial", "iter"))]
    assert [ln.split(":")[0] for ln in said] == ["initial student", "iteration 1/2",
                                                 "iteration 2/2"]
    assert "accuracy" in said[0] and all("train loss" in ln and "accuracy" in ln
                                         for ln in said[1:])
    assert {p.name for p in run.iterdir()} == {"manifest.json", "eval-initial", "iter-000",
                                               "iter-001"}
    for i in range(2):
        d = run / f"iter-{i:03d}"
        assert {p.name for p in d.iterdir()} == STAGES
        assert len((d / "prompts.jsonl").read_text().splitlines()) == 4
        for stage in ("rollout", "score", "select", "train"):
            assert StageDir.open(d / stage, stage=stage).manifest["complete"]
    # iteration 1 samples from the student trained in iteration 0
    r1 = StageDir.open(run / "iter-001" / "rollout", stage="rollout")
    assert r1.manifest["models"]["student"]["id"] == str(run / "iter-000" / "train")
    m = json.loads((run / "manifest.json").read_text())
    assert m["complete"] and m["stage"] == "distill"
    history = m["summary"]["history"]
    assert [h["iteration"] for h in history] == ["initial", 0, 1]
    for h, where in zip(history, ("eval-initial", "iter-000/eval", "iter-001/eval")):
        summary = json.loads((run / where / "manifest.json").read_text())["summary"]
        assert summary["n"] == 3 and h["accuracy"] == summary["correct"] / 3


def test_resume_after_kill_between_stages(tiny_pair, prompts_file, tmp_path, monkeypatch):
    import tipcli.stages.distill as select_mod  # where the loop looks run_select up

    cfg = _cfg(tiny_pair, prompts_file, tmp_path / "run", eval_prompts="")
    real = select_mod.run_select
    calls = {"n": 0}

    def select_then_die(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:  # killed after iteration 1's score, before its select
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(select_mod, "run_select", select_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_distill(cfg)
    monkeypatch.undo()
    it1 = tmp_path / "run" / "iter-001"
    assert {p.name for p in it1.iterdir()} == {"prompts.jsonl", "rollout", "score"}
    assert not json.loads((tmp_path / "run" / "manifest.json").read_text())["complete"]
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*.safetensors")}
    run_distill(cfg)
    after = {p: p.stat().st_mtime_ns for p in before if p.exists()}
    # iteration 1's optimizer state, which iteration 2 continued, is all that went
    assert set(before) - set(after) == {tmp_path / "run" / "iter-000" / "train" / "state" /
                                        "optimizer.safetensors"}
    assert {p: before[p] for p in after} == after  # finished stages were not redone
    assert StageDir.open(it1 / "train", stage="train").manifest["complete"]
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["complete"]




def _load_counter(monkeypatch):
    """Every model load, by name: tip loads models through ``tipcli.models.loading``'s
    ``load_model`` alone, so counting there counts them all."""
    import tipcli.models.loading as models_mod

    loads: list[str] = []
    real = models_mod.load_model

    def counting(name, *a, **kw):
        loads.append(name)
        return real(name, *a, **kw)

    monkeypatch.setattr(models_mod, "load_model", counting)
    return loads


def _weights(path):
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def test_models_stay_loaded_and_match_a_reload_from_disk(tiny_pair, prompts_file, tmp_path,
                                                         monkeypatch):
    """Each model is loaded once for the whole run, and keeping the trained student in
    memory gives the same rollouts and weights as reloading it from its checkpoint."""
    import tipcli.stages.distill as rollout_mod  # where the loop looks run_rollout up

    loads = _load_counter(monkeypatch)
    kept = run_distill(_cfg(tiny_pair, prompts_file, tmp_path / "kept"))
    assert sorted(loads) == sorted([str(tiny_pair[0]), str(tiny_pair[1])])

    cfg = _cfg(tiny_pair, prompts_file, tmp_path / "reloaded")
    real, calls = rollout_mod.run_rollout, {"n": 0}

    def die_at_second_rollout(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:  # killed after iteration 0 finished training
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(rollout_mod, "run_rollout", die_at_second_rollout)
    with pytest.raises(KeyboardInterrupt):
        run_distill(cfg)
    monkeypatch.setattr(rollout_mod, "run_rollout", real)
    loads.clear()
    reloaded = run_distill(cfg)  # iteration 1 samples from iter-000/train read from disk
    assert str(reloaded / "iter-000" / "train") in loads

    # Every sample and every statistic is identical. The one exception: the log-prob
    # generate records at its first (prefill) step can differ in the last float32 bit
    # between a model object that was just trained and the same weights loaded from disk.
    for i in range(2):
        for stage in ("rollout", "score"):
            a = sorted((kept / f"iter-{i:03d}" / stage).glob("*.safetensors"))
            b = sorted((reloaded / f"iter-{i:03d}" / stage).glob("*.safetensors"))
            assert a and len(a) == len(b), (i, stage)
            for x, y in zip(a, b):
                ta, tb = load_file(str(x)), load_file(str(y))
                assert ta.keys() == tb.keys()
                for k in ta:
                    if k == "rollout_logprob":
                        torch.testing.assert_close(ta[k], tb[k], rtol=0, atol=1e-6)
                    else:
                        assert torch.equal(ta[k], tb[k]), (i, stage, k)
    wa, wb = _weights(kept / "iter-001" / "train"), _weights(reloaded / "iter-001" / "train")
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    for i in range(2):
        ea, eb = (json.loads((run / f"iter-{i:03d}" / "eval" / "manifest.json").read_text())
                  ["summary"] for run in (kept, reloaded))
        assert ea["accuracy"] == eb["accuracy"]


def test_bf16_sampling_trains_from_float32_checkpoints(tiny_pair, prompts_file, tmp_path,
                                                      monkeypatch):
    """Where sampling runs in bf16 (the GPU default; --dtype bfloat16 here on CPU), training
    never starts from bf16-rounded weights: it reloads the float32 checkpoint instead."""
    loads = _load_counter(monkeypatch)
    run = run_distill(_cfg(tiny_pair, prompts_file, tmp_path / "run", eval_prompts="",
                           dtype="bfloat16"))
    student, teacher = str(tiny_pair[0]), str(tiny_pair[1])
    # teacher and bf16 student once; training reloads float32 weights in each iteration
    assert sorted(loads) == sorted([teacher, student, student, str(run / "iter-000" / "train")])
    weights = _weights(run / "iter-001" / "train")
    assert {w.dtype for w in weights.values()} == {torch.float32}
    r1 = StageDir.open(run / "iter-001" / "rollout", stage="rollout")
    assert r1.manifest["complete"] and r1.num_tokens > 0


def test_full_vocabulary_loss_uses_the_loaded_teacher(tiny_pair, prompts_file, tmp_path,
                                                      monkeypatch):
    loads = _load_counter(monkeypatch)
    run = run_distill(_cfg(tiny_pair, prompts_file, tmp_path / "run", loss="rkl-full",
                           eval_prompts=""))
    assert sorted(loads) == sorted([str(tiny_pair[0]), str(tiny_pair[1])])
    train = StageDir.open(run / "iter-001" / "train", stage="train")
    assert train.manifest["complete"] and train.manifest["config"]["loss"] == "rkl-full"


def test_other_settings_in_same_run_dir_refused(tiny_pair, prompts_file, tmp_path):
    from tipcli.cli import app

    out = tmp_path / "run"
    run_distill(_cfg(tiny_pair, prompts_file, out, iterations=1, eval_prompts=""))
    r = CliRunner().invoke(app, ["distill", "--student", str(tiny_pair[0]), "--teacher",
                                 str(tiny_pair[1]), "--prompts", str(prompts_file), "-o",
                                 str(out), "--iterations", "1"])
    assert r.exit_code == 2 and "different distill run (its settings differ: " in r.stderr
    assert "--num-samples was 2, now 4" in r.stderr  # each setting that differs, both values
    # a planted manifest that is no distill run tip wrote is refused too
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "manifest.json").write_text(json.dumps({"stage": "distill"}))
    r = CliRunner().invoke(app, ["distill", "--student", str(tiny_pair[0]), "--teacher",
                                 str(tiny_pair[1]), "--prompts", str(prompts_file), "-o",
                                 str(tmp_path / "other"), "--iterations", "1"])
    assert r.exit_code == 2 and "holds another tip run" in r.stderr


def test_demo_quick_form(tiny_pair, tmp_path):
    """The demo's quick form, on the tiny pair instead of the embedded task's models."""
    from tipcli.stages.demo import run_demo

    run = run_demo(resolve(DemoConfig, output=str(tmp_path / "demo"), quick=True),
                   models=tiny_pair)
    assert {p.name for p in (tmp_path / "demo").iterdir()} == {"train.jsonl", "heldout.jsonl",
                                                                "distill"}
    history = json.loads((run / "manifest.json").read_text())["summary"]["history"]
    assert [h["iteration"] for h in history] == ["initial", 0]


def test_demo_cross_teacher_quick_form(tmp_path):
    """--cross-teacher: the shipped student distilled from the shipped teacher of another
    tokenizer (teacher-bpe), aligned, with the sampled-token loss."""
    from tipcli.models.loading import load_tokenizer
    from tipcli.stages.demo import SHIPPED_MODELS, run_demo

    s_tok = load_tokenizer(str(SHIPPED_MODELS / "student"))
    t_tok = load_tokenizer(str(SHIPPED_MODELS / "teacher-bpe"))
    assert s_tok.get_vocab() != t_tok.get_vocab() and len(t_tok) > len(s_tok)
    run = run_demo(resolve(DemoConfig, output=str(tmp_path / "demo"), quick=True,
                           cross_teacher=True))
    m = json.loads((run / "manifest.json").read_text())
    assert m["config"]["loss"] == "rkl-sampled"
    assert m["config"]["teacher"] == str(SHIPPED_MODELS / "teacher-bpe")
    score = StageDir.open(run / "iter-000" / "score")
    assert score.manifest["summary"]["statistics"]["rkl"] == "aligned estimate"


@pytest.mark.slow
def test_demo_cross_teacher_lifts_the_student(tmp_path):
    """The real cross-tokenizer demo on the shipped models: at least +0.10 accuracy."""
    from tipcli.stages.demo import run_demo

    run = run_demo(resolve(DemoConfig, output=str(tmp_path / "demo"), cross_teacher=True))
    history = json.loads((run / "manifest.json").read_text())["summary"]["history"]
    assert history[-1]["accuracy"] >= history[0]["accuracy"] + 0.10


@pytest.mark.slow
def test_demo_improves_the_embedded_student(tmp_path):
    """The real demo: builds (or reuses) the addition models; the student gets better."""
    from tipcli.stages.demo import run_demo

    run = run_demo(resolve(DemoConfig, output=str(tmp_path / "demo")))
    history = json.loads((run / "manifest.json").read_text())["summary"]["history"]
    assert history[0]["accuracy"] <= 0.6
    assert history[-1]["accuracy"] > history[0]["accuracy"]


def _plain_mean_kl(p_model, q_model, rollout) -> float:
    """Mean over response tokens of KL(p || q), p the sampling model: plain full forwards."""
    V, total, n = 100, 0.0, 0
    for seq in StageDir.open(rollout).iter_sequences():
        ids = torch.cat([seq["prompt_ids"], seq["response_ids"]]).long()[None]
        lp, lr = seq["prompt_ids"].numel(), seq["response_ids"].numel()
        with torch.no_grad():
            a, b = (torch.log_softmax(m(ids).logits[0, lp - 1:lp + lr - 1, :V].double(), -1)
                    for m in (p_model, q_model))
        total += float((a.exp() * (a - b)).sum())
        n += lr
    return total / n


def test_held_out_kl_every_other_iteration_and_pruning(tiny_pair, prompts_file, tmp_path):
    """--eval-metric kl: the student's reverse KL on its own samples of the eval prompts and
    the forward KL on the teacher's samples, before training, after every 2nd iteration and
    after the last; --keep-students last keeps only the last student's weights."""
    from tipcli.models.loading import load_model

    run = run_distill(_cfg(tiny_pair, prompts_file, tmp_path / "run", iterations=3,
                           eval_metric="kl", eval_every=2, keep_students="last"))
    history = json.loads((run / "manifest.json").read_text())["summary"]["history"]
    measured = [h["iteration"] for h in history if "heldout_rkl" in h]
    assert measured == ["initial", 1, 2]
    assert "accuracy" not in history[0]
    teacher = load_model(str(tiny_pair[1]))
    for h, where, student in ((history[0], run / "eval-initial-kl", tiny_pair[0]),
                              (history[-1], run / "iter-002" / "eval-kl",
                               run / "iter-002" / "train")):
        student = load_model(str(student))
        assert h["heldout_rkl"] == pytest.approx(
            _plain_mean_kl(student, teacher, where / "rollout"), rel=1e-5)
        assert h["heldout_fkl"] == pytest.approx(
            _plain_mean_kl(teacher, student, run / "eval-teacher" / "rollout"), rel=1e-5)
    assert history[-1]["heldout_rkl"] != history[0]["heldout_rkl"]
    assert not list(run.glob("iter-*/train/checkpoints"))
    kept = sorted(p.parent.parent.name for p in run.glob("iter-*/train/model.safetensors"))
    assert kept == ["iter-002"]


def test_resume_with_pruned_students_and_rerun_of_a_finished_run(tiny_pair, prompts_file,
                                                                 tmp_path, monkeypatch):
    """--keep-students last deletes the weights each finished iteration started from; a
    run interrupted in iteration 2 resumes without them (finished iterations are skipped)
    and ends as an uninterrupted run does; re-running a finished run loads no model."""
    import tipcli.stages.distill as loop_mod

    kw = dict(iterations=3, eval_metric="kl", eval_every=2, keep_students="last")
    whole = run_distill(_cfg(tiny_pair, prompts_file, tmp_path / "whole", **kw))
    cfg = _cfg(tiny_pair, prompts_file, tmp_path / "run", **kw)
    real = loop_mod.sample_score_select

    def die_in_iteration_2(c, i, *a, **k):
        if i == 2:
            raise KeyboardInterrupt
        return real(c, i, *a, **k)

    monkeypatch.setattr(loop_mod, "sample_score_select", die_in_iteration_2)
    with pytest.raises(KeyboardInterrupt):
        run_distill(cfg)
    monkeypatch.undo()
    run = tmp_path / "run"
    assert not (run / "iter-000" / "train" / "model.safetensors").exists()  # pruned
    assert (run / "iter-001" / "iteration.json").is_file()
    run_distill(cfg)
    history = json.loads((run / "manifest.json").read_text())["summary"]["history"]
    expected = json.loads((whole / "manifest.json").read_text())["summary"]["history"]
    assert [h["iteration"] for h in history] == ["initial", 0, 1, 2]
    assert history[-1]["heldout_rkl"] == pytest.approx(expected[-1]["heldout_rkl"], rel=1e-5)
    final, reference = _weights(run / "iter-002" / "train"), _weights(whole / "iter-002" / "train")
    for k in reference:
        torch.testing.assert_close(final[k], reference[k], rtol=0, atol=1e-6)

    loads = _load_counter(monkeypatch)
    run_distill(cfg)
    assert loads == []
