"""A teacher on its own server (--teacher-url), against a stand-in for vLLM's server on
127.0.0.1 (tests/fake_vllm.py; the real vLLM server's tests: tests/pipeline/test_vllm_server.py,
`make test-vllm`): the teacher's side equals in-process scoring, the divergences are the
stated top-k estimates, and the server's faults end in one line and a resumable run."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_one_line_error
from fake_vllm import FakeVLLM
from typer.testing import CliRunner

import tipcli.engines.served as served
from tipcli.cli import app
from tipcli.configs import ScoreConfig, resolve
from tipcli.stages.score import run_score
from tipcli.store.stagedir import StageDir

runner = CliRunner()


@pytest.fixture
def fast_retries(monkeypatch):
    monkeypatch.setattr(served, "BACKOFF_SECONDS", 0.01)


@pytest.fixture
def server(tiny_pair):
    from tipcli.models.loading import load_model, load_tokenizer

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
    from tipcli.ops.losses import divergence, student_buckets, teacher_buckets

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
    from tipcli.models.loading import load_model
    from tipcli.models.tiny import build_tokenizer

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
    from tipcli.models.loading import load_model, load_tokenizer

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


@pytest.mark.parametrize("lora_r", [0, 8], ids=["full", "lora"])
def test_distill_with_a_served_teacher(tiny_pair, prompts_file, server, tmp_path, lora_r):
    """The loop with the teacher served; a LoRA student too (its adapter trained across
    the iterations, the served teacher scoring what it samples)."""
    from tipcli.stages.distill import DistillConfig, run_distill

    run = run_distill(resolve(DistillConfig, student=str(tiny_pair[0]), teacher="teacher",
                              teacher_url=server.url, prompts=str(prompts_file),
                              output=str(tmp_path / "run"), iterations=2, num_samples=2,
                              max_new_tokens=8, max_steps=2, train_batch_size=4,
                              teacher_top_k=8, lr=1e-3, eval_prompts=str(prompts_file),
                              eval_max_prompts=3, prompts_per_iteration=4, group_size=4,
                              lora_r=lora_r))
    history = json.loads((run / "manifest.json").read_text())["summary"]["history"]
    assert [h["iteration"] for h in history] == ["initial", 0, 1]
    s = StageDir.open(run / "iter-001" / "score")
    assert s.manifest["summary"]["statistics"]["rkl"] == "top-k estimate"
    trained = run / "iter-001" / "train"
    assert (trained / "adapter_model.safetensors").is_file() == bool(lora_r)
    if lora_r:
        assert not (trained / "model.safetensors").exists()
        rollout = StageDir.open(run / "iter-001" / "rollout")
        assert rollout.manifest["config"]["student"] == str(run / "iter-000" / "train")


def test_served_teacher_refusals(tiny_pair, prompts_file, tmp_path):
    r = runner.invoke(app, ["distill", "-s", str(tiny_pair[0]), "-t", "teacher",
                            "--teacher-url", "http://127.0.0.1:9", "-p", str(prompts_file),
                            "-o", str(tmp_path / "d"), "--loss", "rkl-full",
                            "--eval-prompts", str(prompts_file), "--eval-metric", "kl"])
    assert_one_line_error(r, "--eval-metric kl needs", "--loss rkl-full needs the teacher")
    r = runner.invoke(app, ["score", str(prompts_file), "-t", "t", "--teacher-url", "ftp://x",
                            "-o", str(tmp_path / "s")])
    assert_one_line_error(r, "--teacher-url must start with http://")


# ---------------------------------------------------------------------- a server that misbehaves

# (misbehaviour of tests/fake_vllm.py, what the one line says about it)
SPOILT = [("nan", "log-prob NaN"), ("inf", "log-prob Infinity"), ("bad-json", "is not JSON"),
          ("fewer-top-k", "7 ranked log-probs at position"),
          ("fewer-positions", "for {less} positions where {sent} were sent"),
          ("more-positions", "for {more} positions where {sent} were sent"),
          ("out-of-vocab", "outside the student's vocabulary of 100 ids"),
          ("close-mid-body", "the answer was cut short"), ("hang", "timed out")]


def _cut_args(tiny_rollout, url, out, *extra) -> list[str]:
    return ["score", str(tiny_rollout), "-t", "teacher", "--teacher-url", url,
            "--teacher-top-k", "8", "--score-batch-size", "3", "--score-chunk-size", "7",
            "--teacher-concurrency", "1", "-o", str(out), *extra]


@pytest.mark.parametrize("kind,needle", SPOILT, ids=[f"served-{k}" for k, _ in SPOILT])
def test_a_served_answer_that_cannot_be_used_stops_the_run_resumably(
        kind, needle, tiny_rollout, server, tmp_path, fast_retries):
    """Shard 0 is answered well, then every answer is spoilt: tried again, then one line
    naming the server, the response and what was wrong; shard 0 is kept, the directory is
    not complete, and once the server is fixed the same command completes it."""
    from fake_vllm import MISBEHAVIOURS

    from tipcli.store.stagedir import split_sequences

    assert kind in MISBEHAVIOURS
    first = split_sequences(StageDir.open(tiny_rollout).load_shard(1))[0]
    sent = first["prompt_ids"].numel() + first["response_ids"].numel()
    needle = needle.format(sent=sent, less=sent - 3, more=sent + 1)
    server.misbehave, server.good = kind, server.completions + 1 + 4  # the probe, shard 0
    args = _cut_args(tiny_rollout, server.url, tmp_path / "s", "--teacher-timeout", "0.5")
    r = runner.invoke(app, args)
    assert_one_line_error(r, server.url, "shard 1, sequence 0", needle,
                          "run the same command again")
    cut = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert not cut["complete"] and len(cut["shards"]) == 1
    server.misbehave = None
    server.release.set()
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    done = StageDir.open(tmp_path / "s")
    assert done.manifest["complete"] and len(done.shards) == 3
    assert all(torch.isfinite(s[k]).all() for s in done.iter_shards()
               for k in ("teacher_logprob", "teacher_topk_logprobs", "rkl", "fkl", "jsd"))


def test_a_bad_answer_is_tried_again_a_bounded_number_of_times(tiny_rollout, server, tmp_path,
                                                               fast_retries):
    server.misbehave, server.good = "nan", server.completions + 1
    r = runner.invoke(app, _cut_args(tiny_rollout, server.url, tmp_path / "s"))
    assert_one_line_error(r, f"({served.RETRIES} tries)", "shard 0, sequence 0 (prompt 0)")
    assert server.completions == 1 + served.RETRIES  # the probe, then one response's tries


def test_a_plain_web_server_is_one_line_and_writes_nothing(tiny_rollout, server, tmp_path,
                                                           fast_retries):
    server.misbehave = "html"
    r = runner.invoke(app, _cut_args(tiny_rollout, server.url, tmp_path / "s"))
    assert_one_line_error(r, server.url, "/v1/models", "is not JSON", "<html>")
    assert not (tmp_path / "s").exists()


def test_a_hung_server_gives_up_within_the_deadline(tiny_rollout, server, tmp_path,
                                                    fast_retries):
    """--teacher-timeout 0.4: one response's tries stop after 3 x 0.4 s in all; a larger
    --teacher-timeout on the resume is the same run (it decides nothing stored)."""
    import time

    server.misbehave, server.good = "hang", server.completions + 1 + 4
    start = time.monotonic()
    r = runner.invoke(app, _cut_args(tiny_rollout, server.url, tmp_path / "s",
                                     "--teacher-timeout", "0.4"))
    took = time.monotonic() - start
    assert_one_line_error(r, "does not answer", "timed out", "--teacher-timeout, now 0.4 s")
    assert server.hung <= served.DEADLINE_TIMEOUTS + 1 and took < 60
    server.misbehave = None
    r = runner.invoke(app, _cut_args(tiny_rollout, server.url, tmp_path / "s",
                                     "--teacher-timeout", "30"))
    assert r.exit_code == 0, r.output
    assert StageDir.open(tmp_path / "s").manifest["complete"]


def test_a_url_ending_in_v1_is_the_server(tiny_rollout, server, tmp_path):
    """OpenAI clients take http://HOST:8000/v1 (vLLM's docs say so): the same server."""
    out = score(tiny_rollout, tmp_path / "s", "teacher", teacher_url=server.url + "/v1/")
    m = StageDir.open(out).manifest
    assert m["complete"] and m["models"]["teacher"]["url"] == server.url
    assert m["config"]["teacher_url"] == server.url


def test_ctrl_c_stops_tip_while_the_server_hangs(tiny_rollout, server, tmp_path):
    """tip score in a process of its own, its requests held by a hung server: SIGINT ends
    it within seconds (no thread waited for), exit code 130 and one line."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    server.misbehave, server.good = "hang", 1  # the top-k probe answered, then nothing
    code = ("import signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
            "from tipcli.cli import main; main()")
    proc = subprocess.Popen([sys.executable, "-c", code, "score", str(tiny_rollout), "-t",
                             "teacher", "--teacher-url", server.url, "--teacher-top-k", "8",
                             "-o", str(tmp_path / "s")],
                            cwd=Path(__file__).parents[2], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TIP_QUIET": "1", "HF_HUB_OFFLINE": "1"})
    try:
        deadline = time.monotonic() + 300  # a loaded machine imports torch slowly
        while server.hung == 0:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no request reached the server"
            time.sleep(0.1)
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert took < 10, f"{took:.1f} s after SIGINT"
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: interrupted"), err
    assert "run the same command again" in lines[0]
    assert not json.loads((tmp_path / "s" / "manifest.json").read_text())["complete"]
