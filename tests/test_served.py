"""A teacher on its own server (--teacher-url), against a stand-in for vLLM's server on
127.0.0.1 (tests/fake_vllm.py; the real vLLM server's tests: tests/test_vllm_server.py,
`make test-vllm`): the teacher's side equals in-process scoring, the divergences are the
stated top-k estimates, and the server's faults end in one line and a resumable run."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_one_line_error
from fake_vllm import FakeVLLM
from typer.testing import CliRunner

import tipcli.served as served
from tipcli.cli import app
from tipcli.configs import ScoreConfig, resolve
from tipcli.score import run_score
from tipcli.shards import StageDir

runner = CliRunner()


@pytest.fixture
def fast_retries(monkeypatch):
    monkeypatch.setattr(served, "BACKOFF_SECONDS", 0.01)


@pytest.fixture
def server(tiny_pair):
    from tipcli.models import load_model, load_tokenizer

    fake = FakeVLLM(load_model(str(tiny_pair[1])), load_tokenizer(str(tiny_pair[1])))
    yield fake
    fake.close()


def score(tiny_rollout, out, teacher, **kw):
    return run_score(resolve(ScoreConfig, rollout=str(tiny_rollout), teacher=str(teacher),
                             output=str(out), teacher_top_k=8, score_batch_size=3,
                             score_chunk_size=7, **kw))


def test_served_teacher_equals_in_process_scoring(tiny_pair, tiny_rollout, tiny_score,
                                                  server, tmp_path):
    """Exact where the server gives exactness: the sampled token's and the top-k log-probs
    within 1e-5 of in-process scoring, every student statistic equal; the divergences the
    top-k + tail estimate of the same numbers; the manifest says which is which."""
    from tipcli.losses import divergence, student_buckets, teacher_buckets

    out = score(tiny_rollout, tmp_path / "s", "teacher", teacher_url=server.url)
    got, want = StageDir.open(out), StageDir.open(tiny_score)
    stats = got.manifest["summary"]["statistics"]
    assert stats["rkl"] == "top-k estimate" and stats["teacher_entropy"] == "absent"
    assert stats["teacher_logprob"] == stats["student_entropy"] == "exact"
    assert want.manifest["summary"]["statistics"]["rkl"] == "exact"
    assert got.manifest["models"]["teacher"]["url"] == server.url
    for a, b in zip(got.iter_shards(), want.iter_shards()):
        assert "teacher_entropy" not in a
        for k in ("student_logprob", "student_entropy"):
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
        for k in ("teacher_logprob", "teacher_topk_logprobs"):
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5, msg=k)
        assert torch.equal(a["teacher_topk_ids"], b["teacher_topk_ids"])
    # the estimates, from the in-process top-k and the student's own logits
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(tiny_pair[0]).double()
    for seq, mine in zip(want.iter_sequences(), got.iter_sequences()):
        ids = torch.cat([seq["prompt_ids"], seq["response_ids"]]).long()[None]
        lp, lr = seq["prompt_ids"].numel(), seq["response_ids"].numel()
        with torch.no_grad():
            s = student(ids).logits[0, lp - 1:lp + lr - 1, :100]
        q = student_buckets(s, seq["teacher_topk_ids"].long())
        r = teacher_buckets(seq["teacher_topk_logprobs"])
        for kind in ("rkl", "fkl", "jsd"):
            torch.testing.assert_close(mine[kind].double(), divergence(kind, q, r).clamp_min(0),
                                       rtol=1e-4, atol=1e-5, msg=kind)
        # a lower bound of the exact divergence (coarser buckets lose information)
        assert (mine["rkl"] <= seq["rkl"] + 1e-5).all()


def test_selection_on_estimates_refuses_an_absolute_scale(tiny_rollout, server, tmp_path):
    out = score(tiny_rollout, tmp_path / "s", "teacher", teacher_url=server.url)
    ok = runner.invoke(app, ["select", str(out), "-o", str(tmp_path / "sel")])
    assert ok.exit_code == 0, ok.output
    for cmd in (["select", str(out), "-o", str(tmp_path / "b")], ["report", str(out)],
                ["train", str(out), "-o", str(tmp_path / "t")]):
        r = runner.invoke(app, [*cmd, "--normalize", "bound"])
        assert_one_line_error(r, "--normalize bound reads the exact rkl")


def test_unreachable_server_is_one_line_and_writes_nothing(tiny_rollout, tmp_path,
                                                           fast_retries):
    from conftest import free_port

    url = f"http://127.0.0.1:{free_port()}"
    r = runner.invoke(app, ["score", str(tiny_rollout), "-t", "teacher", "--teacher-url", url,
                            "-o", str(tmp_path / "s")])
    assert_one_line_error(r, url, "does not answer")
    assert not (tmp_path / "s").exists()


def test_tokenizer_and_max_logprobs_are_checked_first(tiny_pair, tiny_rollout, tmp_path):
    from tipcli.models import load_model
    from tipcli.tiny import build_tokenizer

    other = FakeVLLM(load_model(str(tiny_pair[1])), build_tokenizer(chars="abc"))
    try:
        r = runner.invoke(app, ["score", str(tiny_rollout), "-t", "teacher", "--teacher-url",
                                other.url, "-o", str(tmp_path / "a")])
        assert_one_line_error(r, "tokenizes", "the same vocabulary")
    finally:
        other.close()
    small = FakeVLLM(load_model(str(tiny_pair[1])), build_tokenizer(), max_logprobs=5)
    try:
        r = runner.invoke(app, ["score", str(tiny_rollout), "-t", "teacher", "--teacher-url",
                                small.url, "--teacher-top-k", "8", "-o", str(tmp_path / "b")])
        assert_one_line_error(r, "--max-logprobs 8")
        r = runner.invoke(app, ["score", str(tiny_rollout), "-t", "other", "--teacher-url",
                                small.url, "-o", str(tmp_path / "c")])
        assert_one_line_error(r, "not --teacher other")
    finally:
        small.close()
    assert not any((tmp_path / d).exists() for d in "abc")


def test_busy_answers_are_retried(tiny_rollout, server, tmp_path, fast_retries):
    server.fail_next = 3  # 503, 503, 503, then answers
    out = score(tiny_rollout, tmp_path / "s", "teacher", teacher_url=server.url)
    assert StageDir.open(out).manifest["complete"]


def test_a_server_that_dies_mid_run_resumes_byte_identical(tiny_pair, tiny_rollout, server,
                                                          tmp_path, fast_retries):
    """The server dies after 4 responses: the finished shards stay, the run is marked
    incomplete; the same command with the server back ends as an uninterrupted run."""
    from tipcli.models import load_model, load_tokenizer

    whole = score(tiny_rollout, tmp_path / "whole", "teacher", teacher_url=server.url,
                  teacher_concurrency=1)
    server.stop_after = server.completions + 1 + 4  # the top-k probe, then 4 responses
    args = ["score", str(tiny_rollout), "-t", "teacher", "--teacher-url", server.url,
            "--teacher-top-k", "8", "--score-batch-size", "3", "--score-chunk-size", "7",
            "--teacher-concurrency", "1", "-o", str(tmp_path / "cut")]
    r = runner.invoke(app, args)
    assert_one_line_error(r, "does not answer", "run the same command again")
    cut = json.loads((tmp_path / "cut" / "manifest.json").read_text())
    assert not cut["complete"] and len(cut["shards"]) == 1
    back = FakeVLLM(load_model(str(tiny_pair[1])), load_tokenizer(str(tiny_pair[1])),
                    port=server.port)
    try:
        r = runner.invoke(app, args)
        assert r.exit_code == 0, r.output
    finally:
        back.close()
    a, b = StageDir.open(whole), StageDir.open(tmp_path / "cut")
    assert [s["sha256"] for s in a.shards] == [s["sha256"] for s in b.shards]


def test_distill_with_a_served_teacher(tiny_pair, prompts_file, server, tmp_path):
    from tipcli.distill import DistillConfig, run_distill

    run = run_distill(resolve(DistillConfig, student=str(tiny_pair[0]), teacher="teacher",
                              teacher_url=server.url, prompts=str(prompts_file),
                              output=str(tmp_path / "run"), iterations=2, num_samples=2,
                              max_new_tokens=8, max_steps=2, train_batch_size=4,
                              teacher_top_k=8, lr=1e-3, eval_prompts=str(prompts_file),
                              eval_max_prompts=3, prompts_per_iteration=4, group_size=4))
    history = json.loads((run / "manifest.json").read_text())["summary"]["history"]
    assert [h["iteration"] for h in history] == ["initial", 0, 1]
    s = StageDir.open(run / "iter-001" / "score")
    assert s.manifest["summary"]["statistics"]["rkl"] == "top-k estimate"


def test_served_teacher_refusals(tiny_pair, prompts_file, tmp_path):
    r = runner.invoke(app, ["distill", "-s", str(tiny_pair[0]), "-t", "teacher",
                            "--teacher-url", "http://127.0.0.1:9", "-p", str(prompts_file),
                            "-o", str(tmp_path / "d"), "--loss", "rkl-full",
                            "--eval-prompts", str(prompts_file), "--eval-metric", "kl"])
    assert_one_line_error(r, "--eval-metric kl needs", "--loss rkl-full needs the teacher")
    r = runner.invoke(app, ["score", str(prompts_file), "-t", "t", "--teacher-url", "ftp://x",
                            "-o", str(tmp_path / "s")])
    assert_one_line_error(r, "--teacher-url must start with http://")
