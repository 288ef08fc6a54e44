"""rollout -> score end to end: files written, pipes, resume, exactness on real models."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tipcli.cli import app
from tipcli.configs import resolve
from tipcli.store.stagedir import StageDir, StageWriter

runner = CliRunner()
SCORE_TENSORS = {"prompt_ids", "prompt_offsets", "response_ids", "response_offsets",
                 "response_mask", "rollout_logprob", "finish_reason", "prompt_index",
                 "sample_index", "prompt_lengths", "student_logprob", "teacher_logprob",
                 "student_entropy", "teacher_entropy", "rkl", "fkl", "jsd",
                 "teacher_topk_ids", "teacher_topk_logprobs"}


def _files(d: Path) -> set[str]:
    return {p.name for p in Path(d).iterdir()}


def _invoke(args):
    result = runner.invoke(app, [str(a) for a in args])
    return result


def test_cli_rollout_then_score_files(tiny_pair, prompts_file, tmp_path):
    student, teacher = tiny_pair
    r = _invoke(["rollout", "--student", student, "--prompts", prompts_file, "-o",
                 tmp_path / "r", "--max-new-tokens", 8, "--sample-batch-size", 4,
                 "--shard-size", 8,
                 "--num-samples", 2])
    assert r.exit_code == 0, r.output
    assert r.stdout.strip().splitlines()[-1] == str(tmp_path / "r")
    assert _files(tmp_path / "r") == {"manifest.json", "shard-00000.safetensors",
                                      "shard-00001.safetensors", "prompts.jsonl"}
    s = _invoke(["score", tmp_path / "r", "--teacher", teacher, "-o", tmp_path / "s",
                 "--teacher-top-k", 4])
    assert s.exit_code == 0, s.output
    assert s.stdout.strip().splitlines()[-1] == str(tmp_path / "s")
    assert _files(tmp_path / "s") == _files(tmp_path / "r") - {"prompts.jsonl"}
    d = StageDir.open(tmp_path / "s", stage="score")
    assert d.num_sequences == 12
    shard = d.load_shard(0)
    assert set(shard) == SCORE_TENSORS
    assert shard["teacher_topk_ids"].shape == (shard["response_ids"].numel(), 4)
    m = d.manifest
    assert m["complete"] and m["parent"]["stage"] == "rollout"
    assert m["models"]["student"]["id"] == str(student)
    assert m["models"]["teacher"]["id"] == str(teacher)
    assert m["config"]["teacher_top_k"] == 4 and m["tokenizer"]["vocab_size"] == 100


def test_pipe_rollout_into_score(tiny_pair, prompts_file, tmp_path):
    student, teacher = tiny_pair
    tip = f"{sys.executable} -m tipcli"
    cmd = (f"{tip} rollout --student {student} --prompts {prompts_file} -o {tmp_path}/r "
           f"--max-new-tokens 6 | {tip} score - --teacher {teacher} -o {tmp_path}/s "
           "--teacher-top-k 2")
    out = subprocess.run(cmd, shell=True, capture_output=True, text=True,
                         env={**os.environ, "TIP_QUIET": "1"}, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == f"{tmp_path}/s"
    d = StageDir.open(tmp_path / "s", stage="score")
    assert d.num_sequences == 6 and d.num_tokens > 0


def test_score_equals_full_logits_reference(tiny_pair, tiny_score):
    """Stored statistics equal float64 statistics from the models' full logits."""
    from reference import reference_stats
    from transformers import AutoModelForCausalLM

    models = [AutoModelForCausalLM.from_pretrained(p).eval() for p in tiny_pair]
    V = 100  # tokenizer size; the models have 13 padded output rows
    assert models[0].lm_head.weight.shape[0] == V + 13
    d = StageDir.open(tiny_score, stage="score")
    for seq in list(d.iter_sequences())[:5]:
        ids = torch.cat([seq["prompt_ids"], seq["response_ids"]]).long()[None]
        Lp, Lr = seq["prompt_ids"].numel(), seq["response_ids"].numel()
        with torch.no_grad():
            logits = [m(ids).logits[0, Lp - 1:Lp + Lr - 1, :V] for m in models]
        ref = reference_stats(logits[0], logits[1], seq["response_ids"])
        for name, value in ref.items():
            torch.testing.assert_close(seq[name].double(), value, atol=1e-5, rtol=1e-5,
                                       msg=name)
        top = torch.log_softmax(logits[1].double(), -1).topk(8, dim=-1)
        assert torch.equal(seq["teacher_topk_ids"].long(), top.indices)
        torch.testing.assert_close(seq["rollout_logprob"], seq["student_logprob"],
                                   atol=1e-4, rtol=0)


def test_rollout_responses_end_at_eos_and_are_deterministic(tiny_pair, prompts_file, tmp_path):
    from tipcli.stages.rollout import RolloutConfig, run_rollout

    def run(out, seed):
        return run_rollout(resolve(RolloutConfig, student=str(tiny_pair[0]),
                                   prompts=str(prompts_file), output=str(out), max_new_tokens=40,
                                   seed=seed, temperature=1.0, sample_batch_size=3,
                                   shard_size=3))

    a, b, c = run(tmp_path / "a", 1), run(tmp_path / "b", 1), run(tmp_path / "c", 2)
    for name in _files(a) - {"manifest.json"}:
        assert (a / name).read_bytes() == (b / name).read_bytes()
    seqs_a = list(StageDir.open(a).iter_sequences())
    seqs_c = list(StageDir.open(c).iter_sequences())
    assert any(not torch.equal(x["response_ids"], y["response_ids"])
               for x, y in zip(seqs_a, seqs_c))
    eos = 2
    for s in seqs_a:
        ids = s["response_ids"].tolist()
        assert eos not in ids[:-1]
        assert (ids[-1] == eos) == (int(s["finish_reason"]) == 0)
        assert len(ids) <= 40
        assert s["response_mask"].all()


def test_interrupted_score_resumes_byte_identical(tiny_pair, tiny_rollout, tmp_path,
                                                  monkeypatch):
    from tipcli.stages.score import ScoreConfig, run_score

    def cfg(out):
        return resolve(ScoreConfig, rollout=str(tiny_rollout), teacher=str(tiny_pair[1]),
                           output=str(out), teacher_top_k=3, score_batch_size=2)

    full = run_score(cfg(tmp_path / "full"))
    real_write = StageWriter.write_shard

    def write_then_die(self, index, tensors, **kw):
        if index == 1:
            raise KeyboardInterrupt  # killed while computing the second shard
        return real_write(self, index, tensors, **kw)

    monkeypatch.setattr(StageWriter, "write_shard", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_score(cfg(tmp_path / "cut"))
    monkeypatch.undo()
    cut = tmp_path / "cut"
    assert _files(cut) == {"manifest.json", "shard-00000.safetensors"}
    with pytest.raises(Exception, match="incomplete"):
        StageDir.open(cut, stage="score")
    run_score(cfg(cut))
    assert _files(cut) == _files(full)
    for name in _files(full) - {"manifest.json"}:
        assert (cut / name).read_bytes() == (full / name).read_bytes(), name
    m_full, m_cut = (json.loads((p / "manifest.json").read_text()) for p in (full, cut))
    for m in (m_full, m_cut):
        m["config"].pop("output")
    assert m_full == m_cut


def test_rerun_with_other_settings_refuses(tiny_pair, tiny_rollout, tiny_score):
    r = _invoke(["score", tiny_rollout, "--teacher", tiny_pair[1], "-o", tiny_score,
                 "--teacher-top-k", 5])
    assert r.exit_code == 2
    assert "different score run" in r.stderr
    assert StageDir.open(tiny_score, stage="score").manifest["config"]["teacher_top_k"] == 8


def _plain_truncated_logprobs(logits_PV, tokens_P, top_k, top_p):
    """log p(token) after top-k then top-p, written out position by position (float64)."""
    out = []
    for row, tok in zip(logits_PV.double(), tokens_P.tolist()):
        kept = set(range(row.numel()))
        if top_k > 0:
            kth = sorted(row.tolist(), reverse=True)[top_k - 1]
            kept = {v for v in kept if row[v] >= kth}
        if top_p < 1.0:
            order = sorted(kept, key=lambda v: row[v].item())  # ascending, as transformers
            probs = torch.softmax(row[order], -1).tolist()
            cum, dropped = 0.0, set()
            for v, p in zip(order[:-1], probs[:-1]):  # the most likely token always stays
                cum += p
                if cum <= 1 - top_p:
                    dropped.add(v)
            kept -= dropped
        ids = sorted(kept)
        assert tok in kept, "a sampled token lies outside the truncated distribution"
        out.append((row[tok] - torch.logsumexp(row[ids], -1)).item())
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("top_k,top_p,temperature", [(5, 1.0, 0.7), (0, 0.6, 1.0),
                                                     (4, 0.5, 1.3)])
def test_rollout_logprob_is_the_truncated_sampling_distribution(tiny_pair, prompts_file,
                                                                tmp_path, top_k, top_p,
                                                                temperature):
    from tipcli.models.loading import load_model
    from tipcli.stages.rollout import RolloutConfig, run_rollout

    out = run_rollout(resolve(RolloutConfig, student=str(tiny_pair[0]), prompts=str(prompts_file),
                                    output=str(tmp_path / "r"), max_new_tokens=12, seed=3,
                                    temperature=temperature, sample_top_k=top_k, top_p=top_p,
                                    num_samples=2, sample_batch_size=4, shard_size=4))
    model, V = load_model(str(tiny_pair[0])), 100
    raised = 0
    for seq in StageDir.open(out).iter_sequences():
        ids = torch.cat([seq["prompt_ids"], seq["response_ids"]]).long()[None]
        Lp, Lr = seq["prompt_ids"].numel(), seq["response_ids"].numel()
        with torch.no_grad():
            logits = model(ids).logits[0, Lp - 1:Lp + Lr - 1, :V] / temperature
        ref = _plain_truncated_logprobs(logits, seq["response_ids"], top_k, top_p)
        torch.testing.assert_close(seq["rollout_logprob"].double(), ref, atol=1e-4, rtol=0)
        full = torch.log_softmax(logits.double(), -1).gather(
            -1, seq["response_ids"].long()[:, None])[:, 0]
        raised += int((ref > full + 1e-6).sum())
    assert raised > 0  # truncation moved mass onto the kept tokens


def test_model_generation_defaults_do_not_change_sampling(tiny_pair, prompts_file, tmp_path):
    """A generation_config.json with a repetition penalty or min-p (as hub models ship) is
    not applied: rollout_logprob describes temperature / top-k / top-p sampling alone."""
    import shutil

    from tipcli.stages.rollout import RolloutConfig, run_rollout

    shifted = tmp_path / "student"
    shutil.copytree(tiny_pair[0], shifted)
    gen = json.loads((shifted / "generation_config.json").read_text())
    gen.update(repetition_penalty=5.0, min_p=0.5, no_repeat_ngram_size=1)
    (shifted / "generation_config.json").write_text(json.dumps(gen))

    def run(student, out):
        return run_rollout(resolve(RolloutConfig, student=str(student), prompts=str(prompts_file),
                                         output=str(out), max_new_tokens=16, seed=5,
                                         sample_top_k=20, sample_batch_size=3,
                                         shard_size=3))

    a, b = run(tiny_pair[0], tmp_path / "a"), run(shifted, tmp_path / "b")
    for x, y in zip(StageDir.open(a).iter_sequences(), StageDir.open(b).iter_sequences()):
        assert torch.equal(x["response_ids"], y["response_ids"])
        assert torch.equal(x["rollout_logprob"], y["rollout_logprob"])
