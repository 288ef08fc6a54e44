"""`tip score --teacher-url` against a real `vllm serve` (vLLM's CPU build, in its own
environment: `make test-vllm`) on 127.0.0.1 with a tiny model: the teacher's side equals
in-process scoring of the same model, a server that dies mid-run is resumed, and a
mismatched tokenizer or a too-small --max-logprobs is refused before any scoring."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from conftest import free_port

from tipcli.store.stagedir import StageDir

pytestmark = pytest.mark.vllm
ENV = {**os.environ, "TIP_QUIET": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}


@pytest.fixture(scope="module")
def unpadded_pair(tmp_path_factory) -> tuple[Path, Path]:
    """Tiny models vLLM serves (head size 32) with no logit columns past the tokenizer:
    a server's log-softmax spans every column of the model, tip's the real vocabulary."""
    pytest.importorskip("vllm")
    from tipcli.models.tiny import build_model, build_tokenizer

    out, tok = tmp_path_factory.mktemp("served-models"), build_tokenizer()
    for name, seed in (("student", 0), ("teacher", 1)):
        build_model(tok, hidden=64, layers=2, heads=2, seed=seed).save_pretrained(out / name)
        tok.save_pretrained(out / name)
    return out / "student", out / "teacher"


class Server:
    """`vllm serve MODEL` on 127.0.0.1 (a process of its own, stopped with the test)."""

    def __init__(self, model: Path, port: int, max_logprobs: int = 16, name: str = "teacher"):
        self.url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
             "--served-model-name", name, "--host", "127.0.0.1", "--port", str(port),
             "--dtype", "float32", "--max-logprobs", str(max_logprobs), "--max-model-len",
             "512", "--enforce-eager"], env=ENV, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True, start_new_session=True)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(self.proc.stderr.read()[-3000:])
            try:
                urllib.request.urlopen(self.url + "/v1/models", timeout=5)
                return
            except OSError:
                time.sleep(1)
        raise RuntimeError("vllm serve did not start in 10 minutes")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def server(unpadded_pair):
    s = Server(unpadded_pair[1], free_port())
    yield s
    s.stop()


@pytest.fixture(scope="module")
def rollout(unpadded_pair, prompts_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("served") / "rollout"
    tip("rollout", "-s", unpadded_pair[0], "-p", prompts_file, "-o", out, "--num-samples", 2,
        "--max-new-tokens", 12, "--sample-batch-size", 2, "--shard-size", 4)
    return out


def tip(*args, ok: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "tipcli", *map(str, args)], capture_output=True,
                       text=True, env=ENV, timeout=900)
    assert (r.returncode == 0) == ok, r.stderr[-3000:]
    return r


def test_served_scores_equal_in_process(unpadded_pair, rollout, server, tmp_path):
    """The sampled token's and the top-k log-probs from the server within 1e-4 of tip's
    own scoring of the same teacher; the student's side identical."""
    tip("score", rollout, "-t", unpadded_pair[1], "-o", tmp_path / "here", "--teacher-top-k", 8)
    tip("score", rollout, "-t", "teacher", "--teacher-url", server.url, "-o", tmp_path / "there",
        "--teacher-top-k", 8)
    here, there = StageDir.open(tmp_path / "here"), StageDir.open(tmp_path / "there")
    assert there.manifest["summary"]["statistics"]["rkl"] == "top-k estimate"
    for a, b in zip(here.iter_shards(), there.iter_shards()):
        torch.testing.assert_close(b["teacher_logprob"], a["teacher_logprob"], rtol=0,
                                   atol=1e-4)
        torch.testing.assert_close(b["teacher_topk_logprobs"], a["teacher_topk_logprobs"],
                                   rtol=0, atol=1e-4)
        assert (b["teacher_topk_ids"] == a["teacher_topk_ids"]).float().mean() > 0.99
        torch.testing.assert_close(b["student_entropy"], a["student_entropy"], rtol=0, atol=0)


def test_server_dies_mid_run_and_the_run_resumes(unpadded_pair, rollout, tmp_path):
    """The server is killed once the first shard is written: the run stops with one
    line, incomplete; the same command, the server back, ends byte for byte as a run the
    server never left."""
    port = free_port()
    first = Server(unpadded_pair[1], port)
    args = ("score", rollout, "-t", "teacher", "--teacher-url", first.url, "--teacher-top-k",
            8, "--score-batch-size", 1, "--teacher-concurrency", 1)
    whole = tip(*args, "-o", tmp_path / "whole")
    assert whole.returncode == 0
    cut = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "-m", "tipcli", *map(str, args), "-o", cut],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not list(cut.glob("shard-*.safetensors")):
        time.sleep(0.05)
    first.stop()
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2 and "does not answer" in err
    assert not json.loads((cut / "manifest.json").read_text())["complete"]
    second = Server(unpadded_pair[1], port)
    try:
        tip(*args, "-o", cut)
    finally:
        second.stop()
    a, b = StageDir.open(tmp_path / "whole"), StageDir.open(cut)
    assert [s["sha256"] for s in a.shards] == [s["sha256"] for s in b.shards]


def test_mismatched_tokenizer_and_small_max_logprobs(unpadded_pair, rollout, tmp_path):
    from tipcli.models.tiny import build_model, build_tokenizer

    other = tmp_path / "other"
    tok = build_tokenizer(chars="abcdefghij0123456789 ")
    build_model(tok, hidden=64, layers=1, heads=2).save_pretrained(other)
    tok.save_pretrained(other)
    s = Server(other, free_port())
    try:
        r = tip("score", rollout, "-t", "teacher", "--teacher-url", s.url, "-o",
                tmp_path / "a", ok=False)
        assert "tokenizes" in r.stderr and not (tmp_path / "a").exists()
    finally:
        s.stop()
    s = Server(unpadded_pair[1], free_port(), max_logprobs=4)
    try:
        r = tip("score", rollout, "-t", "teacher", "--teacher-url", s.url, "--teacher-top-k",
                8, "-o", tmp_path / "b", ok=False)
        assert "--max-logprobs 8" in r.stderr and not (tmp_path / "b").exists()
    finally:
        s.stop()
    shutil.rmtree(other)


def test_distill_two_iterations_against_the_server(unpadded_pair, prompts_file, server,
                                                   tmp_path):
    tip("distill", "-s", unpadded_pair[0], "-t", "teacher", "--teacher-url", server.url,
        "-p", prompts_file, "-o", tmp_path / "run", "--iterations", 2, "--num-samples", 2,
        "--max-new-tokens", 8, "--max-steps", 2, "--train-batch-size", 4,
        "--teacher-top-k", 8, "--lr", 1e-3, "--prompts-per-iteration", 4, "--group-size", 4,
        "--eval-prompts", prompts_file, "--eval-max-prompts", 3)
    history = json.loads((tmp_path / "run" / "manifest.json").read_text())["summary"]["history"]
    assert [h["iteration"] for h in history] == ["initial", 0, 1]


def test_a_served_teacher_of_another_tokenizer_equals_the_in_process_one(unpadded_pair,
                                                                         rollout, tmp_path):
    """A teacher with a byte-level BPE served under its path (vLLM's default name): tip
    reads its tokenizer from --teacher, sends its own tokens of each prompt (its chat
    template) and response text, and every aligned statistic equals in-process scoring
    (1e-4)."""
    from conftest import PROMPTS

    from tipcli.models.tiny import CHARS, build_bpe_tokenizer, build_model

    bpe = tmp_path / "bpe-teacher"
    tok = build_bpe_tokenizer(PROMPTS * 5 + [CHARS], size=300)
    build_model(tok, hidden=64, layers=2, heads=2, seed=2).save_pretrained(bpe)
    tok.save_pretrained(bpe)
    tip("score", rollout, "-t", bpe, "-o", tmp_path / "here", "--teacher-top-k", 8)
    s = Server(bpe, free_port(), name=str(bpe))
    try:
        tip("score", rollout, "-t", bpe, "--teacher-url", s.url, "-o", tmp_path / "there",
            "--teacher-top-k", 8)
    finally:
        s.stop()
    here, there = StageDir.open(tmp_path / "here"), StageDir.open(tmp_path / "there")
    assert there.manifest["models"]["teacher"]["cross_tokenizer"]
    assert there.manifest["summary"]["statistics"]["rkl"] == "aligned estimate"
    for a, b in zip(here.iter_shards(), there.iter_shards()):
        for name in ("teacher_logprob", "rkl", "fkl", "jsd", "teacher_topk_logprobs"):
            torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-4, msg=name)
        assert (b["teacher_topk_ids"] == a["teacher_topk_ids"]).float().mean() > 0.99
        torch.testing.assert_close(b["student_entropy"], a["student_entropy"], rtol=0, atol=0)


def test_a_served_teacher_among_several(unpadded_pair, rollout, prompts_file, server,
                                        tmp_path):
    """Two teachers, one served by `vllm serve` (--teacher-url b=URL), one in process,
    prompts routed by their field: each served response's teacher log-probs equal
    in-process scoring of that teacher (1e-4)."""
    routed = tmp_path / "routed.jsonl"
    routed.write_text("".join(json.dumps({**json.loads(line), "teacher": "ab"[i % 2]}) + "\n"
                              for i, line in enumerate(prompts_file.read_text().splitlines())))
    r2 = tmp_path / "rollout"
    tip("rollout", "-s", unpadded_pair[0], "-p", routed, "-o", r2, "--num-samples", 2,
        "--max-new-tokens", 12, "--sample-batch-size", 2, "--shard-size", 4)
    tip("score", r2, "-t", f"a={unpadded_pair[0]}", "-t", "b=teacher", "--teacher-url",
        f"b={server.url}", "-o", tmp_path / "both", "--teacher-top-k", 8)
    tip("score", r2, "-t", unpadded_pair[1], "-o", tmp_path / "b", "--teacher-top-k", 8)
    both, alone = StageDir.open(tmp_path / "both"), StageDir.open(tmp_path / "b")
    assert both.manifest["summary"]["teachers"]["b"]["statistics"]["rkl"] == "top-k estimate"
    served = 0
    for x, y in zip(both.iter_shards(), alone.iter_shards()):
        b_T = x["teacher_route"] == 1
        served += int(b_T.sum())
        torch.testing.assert_close(x["teacher_logprob"][b_T], y["teacher_logprob"][b_T],
                                   rtol=0, atol=1e-4)
    assert served > 0
