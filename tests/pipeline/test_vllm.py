"""--backend vllm, in vLLM's own environment (``make test-vllm``): the same shards as the
hf sampler writes, log-probs under the truncated sampling distribution, responses that do
not depend on how they are batched, and a distillation loop whose engine samples from
each newly trained student."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tipcli.store.stagedir import StageDir

pytestmark = pytest.mark.vllm
ENV = {**os.environ, "TIP_QUIET": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
V = 100  # the tiny tokenizer's vocabulary; the models have 13 padded output rows


@pytest.fixture(scope="module")
def vllm_pair(tmp_path_factory) -> tuple[Path, Path]:
    """Tiny models vLLM's CPU attention serves (head size 32; it refuses 8)."""
    pytest.importorskip("vllm")
    from tipcli.models.tiny import build_model, build_tokenizer

    out, tok = tmp_path_factory.mktemp("vllm-models"), build_tokenizer()
    for name, seed in (("student", 0), ("teacher", 1)):
        build_model(tok, hidden=64, layers=2, heads=2, vocab_pad=13, seed=seed).save_pretrained(
            out / name)
        tok.save_pretrained(out / name)
    return out / "student", out / "teacher"


def _tip(*args) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "tipcli", *map(str, args)], capture_output=True,
                       text=True, env=ENV, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _truncated_logprobs(model, seq, temperature, top_k, top_p) -> torch.Tensor:
    """log p(token) under logits / T, top-k, then top-p: a plain full forward, no cache."""
    from transformers import TopKLogitsWarper, TopPLogitsWarper

    ids = torch.cat([seq["prompt_ids"], seq["response_ids"]]).long()[None]
    lp, lr = seq["prompt_ids"].numel(), seq["response_ids"].numel()
    with torch.no_grad():
        x = model(ids).logits[0, lp - 1:lp + lr - 1, :V].double() / temperature
    if top_k:
        x = TopKLogitsWarper(top_k)(None, x)
    if top_p < 1:
        x = TopPLogitsWarper(top_p)(None, x)
    return torch.log_softmax(x, -1).gather(-1, seq["response_ids"].long()[:, None])[:, 0]


def test_rollout_log_probs_are_the_truncated_sampling_distribution(vllm_pair, prompts_file,
                                                                   tmp_path):
    from tipcli.models.loading import load_model

    args = ["rollout", "-s", vllm_pair[0], "-p", prompts_file, "--backend", "vllm",
            "--num-samples", "3", "--max-new-tokens", "16", "--temperature", "0.7",
            "--sample-top-k", "5", "--top-p", "0.9", "--seed", "4"]
    _tip(*args, "-o", tmp_path / "a", "--sample-batch-size", "6", "--shard-size", "18")
    _tip(*args, "-o", tmp_path / "b", "--sample-batch-size", "2", "--shard-size", "4")
    a, b = StageDir.open(tmp_path / "a"), StageDir.open(tmp_path / "b")
    seqs_a, seqs_b = list(a.iter_sequences()), list(b.iter_sequences())
    assert len(seqs_a) == len(seqs_b) == 18
    model = load_model(str(vllm_pair[0]))
    for x, y in zip(seqs_a, seqs_b):  # each response is its own seeded request
        assert torch.equal(x["response_ids"], y["response_ids"])
        assert int(x["response_ids"].max()) < V  # padded columns are never sampled
        ref = _truncated_logprobs(model, x, 0.7, 5, 0.9)
        torch.testing.assert_close(x["rollout_logprob"].double(), ref, atol=2e-4, rtol=0)
        if int(x["finish_reason"]) == 0:
            assert int(x["response_ids"][-1]) == 2  # </s>, kept as the hf sampler keeps it


def test_greedy_eval_gives_the_hf_answers(vllm_pair, prompts_file, tmp_path):
    for backend in ("hf", "vllm"):
        _tip("eval", "-m", vllm_pair[0], "-p", prompts_file, "--backend", backend,
             "--max-new-tokens", "12", "-o", tmp_path / backend)
    rows = {b: [json.loads(ln) for ln in (tmp_path / b / "results.jsonl").open()]
            for b in ("hf", "vllm")}
    assert [r["response"] for r in rows["hf"]] == [r["response"] for r in rows["vllm"]]


def test_distill_samples_each_iteration_from_the_trained_student(vllm_pair, prompts_file,
                                                                 tmp_path):
    """The engine starts with the first student and gets each trained one in place: the
    second iteration's log-probs are the first iteration's trained weights'."""
    from tipcli.models.loading import load_model

    run = tmp_path / "run"
    _tip("distill", "-s", vllm_pair[0], "-t", vllm_pair[1], "-p", prompts_file, "-o", run,
         "--backend", "vllm", "--iterations", "2", "--num-samples", "2",
         "--max-new-tokens", "12", "--sample-batch-size", "4", "--train-batch-size", "4",
         "--max-steps", "2", "--lr", "1e-2", "--eval-prompts", prompts_file)
    history = json.loads((run / "manifest.json").read_text())["summary"]["history"]
    assert history[1]["sampler_reload_seconds"] > 0 and "accuracy" in history[2]
    before, after = load_model(str(vllm_pair[0])), load_model(str(run / "iter-000" / "train"))
    moved = 0.0
    for seq in StageDir.open(run / "iter-001" / "rollout").iter_sequences():
        ref = _truncated_logprobs(after, seq, 1.0, 0, 1.0)
        torch.testing.assert_close(seq["rollout_logprob"].double(), ref, atol=2e-4, rtol=0)
        moved = max(moved, float((_truncated_logprobs(before, seq, 1.0, 0, 1.0) - ref).abs()
                                 .max()))
    assert moved > 1e-2  # training changed the log-probs: the test can tell the two apart


def test_lora_distill_hands_the_engine_each_adapter(vllm_pair, prompts_file, tmp_path):
    """--lora-r: the engine serves the base with LoRA enabled, and each trained adapter
    reaches it as a new LoRA request: the second iteration's log-probs are the first
    iteration's adapter on the base. An adapter directory given to eval samples the same
    answers from vLLM as from transformers."""
    from tipcli.models.loading import load_model

    run = tmp_path / "run"
    _tip("distill", "-s", vllm_pair[0], "-t", vllm_pair[1], "-p", prompts_file, "-o", run,
         "--backend", "vllm", "--iterations", "2", "--num-samples", "2", "--lora-r", "8",
         "--max-new-tokens", "12", "--sample-batch-size", "4", "--train-batch-size", "4",
         "--max-steps", "2", "--lr", "5e-2")
    history = json.loads((run / "manifest.json").read_text())["summary"]["history"]
    assert history[1]["sampler_reload_seconds"] > 0
    adapter = run / "iter-000" / "train"
    assert (adapter / "adapter_model.safetensors").is_file()
    before, after = load_model(str(vllm_pair[0])), load_model(str(adapter))  # merged
    moved = 0.0
    for seq in StageDir.open(run / "iter-001" / "rollout").iter_sequences():
        ref = _truncated_logprobs(after, seq, 1.0, 0, 1.0)
        torch.testing.assert_close(seq["rollout_logprob"].double(), ref, atol=2e-4, rtol=0)
        moved = max(moved, float((_truncated_logprobs(before, seq, 1.0, 0, 1.0) - ref).abs()
                                 .max()))
    assert moved > 1e-2  # the adapter changed the log-probs: the test can tell them apart
    for backend in ("hf", "vllm"):
        _tip("eval", "-m", adapter, "-p", prompts_file, "--backend", backend,
             "--max-new-tokens", "12", "-o", tmp_path / backend)
    rows = {b: [json.loads(ln) for ln in (tmp_path / b / "results.jsonl").open()]
            for b in ("hf", "vllm")}
    assert [r["response"] for r in rows["hf"]] == [r["response"] for r in rows["vllm"]]
