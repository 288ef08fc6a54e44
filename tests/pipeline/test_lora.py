"""LoRA students (peft): `tip train --lora-r` writes an adapter that peft loads on its base,
every command takes an adapter directory as its student, the loop trains the adapter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import assert_one_line_error, interrupt_at_call
from safetensors.torch import load_file
from typer.testing import CliRunner

from tipcli.cli import app
from tipcli.configs import DistillConfig, TrainConfig, resolve
from tipcli.errors import TipError
from tipcli.stages.distill import run_distill
from tipcli.stages.train import run_train

runner = CliRunner()


def _lora(tiny_score, out, **kw) -> Path:
    kw = {"lora_r": 8, **kw}
    return run_train(resolve(TrainConfig, input=str(tiny_score), output=str(out), max_steps=3,
                             train_batch_size=4, lr=1e-2, seed=0, **kw))


@pytest.fixture(scope="module")
def adapter(tiny_score, tmp_path_factory) -> Path:
    return _lora(tiny_score, tmp_path_factory.mktemp("lora") / "adapter", save_every=2,
                 lora_r=2)


def test_train_writes_an_adapter_peft_loads_on_the_base(adapter, tiny_pair):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    files = {p.name for p in adapter.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json",
            "manifest.json", "metrics.jsonl", "state"} <= files
    assert not any(f.startswith("model") for f in files)  # no full weights
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(Path(tiny_pair[0]).resolve())
    assert config["r"] == 2
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    base_weights = load_file(str(tiny_pair[0] / "model.safetensors"))
    size = sum(t.numel() for t in weights.values())
    # rank 2 on the tiny student (hidden size 16): 8% of its weights
    assert 0 < size < 0.1 * sum(t.numel() for t in base_weights.values())
    assert all("lora_" in k for k in weights)
    # peft loads it as it is; the adapter changed the model (B is no longer zero)
    base = AutoModelForCausalLM.from_pretrained(tiny_pair[0])
    model = PeftModel.from_pretrained(base, str(adapter))
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        adapted = model(ids).logits
        with model.disable_adapter():
            plain = model(ids).logits
    assert not torch.allclose(adapted, plain)
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in weights.items())
    summary = json.loads((adapter / "manifest.json").read_text())["summary"]
    assert summary["lora"]["rank"] == 2 and summary["lora"]["adapter_parameters"] == size
    # the base was frozen: only the adapters and their AdamW state were checkpointed
    ckpt = load_file(str(adapter / "checkpoints" / "step-000002" / "model.safetensors"))
    assert ckpt and all("lora_" in k for k in ckpt)


def test_rollout_and_score_take_the_adapter_directory(adapter, tiny_pair, prompts_file,
                                                      tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tipcli.store.stagedir import StageDir

    out = tmp_path / "rollout"
    r = runner.invoke(app, ["rollout", "--student", str(adapter), "-p", str(prompts_file),
                            "-o", str(out), "--num-samples", "1", "--max-new-tokens", "6",
                            "--temperature", "0"])
    assert r.exit_code == 0, r.output
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_pair[0]),
                                       str(adapter)).merge_and_unload()
    seq = next(StageDir.open(out).iter_sequences())
    ids = torch.cat([seq["prompt_ids"], seq["response_ids"]]).long()[None]
    with torch.no_grad():
        logits = merged(ids).logits[0, seq["prompt_ids"].numel() - 1:-1, :100]
    assert torch.equal(logits.argmax(-1), seq["response_ids"].long())  # greedy: the adapter's
    r = runner.invoke(app, ["score", str(out), "--teacher", str(tiny_pair[1]),
                            "-o", str(tmp_path / "score"), "--teacher-top-k", "4"])
    assert r.exit_code == 0, r.output


def test_merged_output_is_an_ordinary_model(tiny_score, tmp_path):
    from transformers import AutoModelForCausalLM

    out = _lora(tiny_score, tmp_path / "a", merged_output=str(tmp_path / "merged"))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("lora" in n for n, _ in merged.named_parameters())
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(
        json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"])
    again = PeftModel.from_pretrained(base, str(out)).merge_and_unload()
    ids = torch.tensor([[3, 9, 27, 4]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, again(ids).logits, rtol=0, atol=1e-5)


def test_resume_of_a_lora_run_equals_an_uninterrupted_one(tiny_score, tmp_path, monkeypatch):
    import tipcli.trainer.loop as loop

    whole = run_train(resolve(TrainConfig, input=str(tiny_score), output=str(tmp_path / "w"),
                              max_steps=4, train_batch_size=4, lr=1e-2, lora_r=4,
                              save_every=2, seed=0))
    save = loop.save_checkpoint

    def save_then_stop(tr):
        save(tr)
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "save_checkpoint", save_then_stop)
    cfg = resolve(TrainConfig, input=str(tiny_score), output=str(tmp_path / "cut"), max_steps=4,
                  train_batch_size=4, lr=1e-2, lora_r=4, save_every=2, seed=0)
    with pytest.raises(KeyboardInterrupt):
        run_train(cfg)
    monkeypatch.setattr(loop, "save_checkpoint", save)
    run_train(cfg, resume=True)
    a, b = (load_file(str(d / "adapter_model.safetensors")) for d in (whole, tmp_path / "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_distill_trains_the_adapter_across_iterations(tiny_pair, prompts_file, tmp_path):
    run = run_distill(resolve(
        DistillConfig, student=str(tiny_pair[0]), teacher=str(tiny_pair[1]),
        prompts=str(prompts_file), output=str(tmp_path / "run"), iterations=2, num_samples=2,
        max_new_tokens=8, max_steps=2, train_batch_size=4, teacher_top_k=8, lr=1e-2,
        prompts_per_iteration=4, group_size=4, lora_r=8))
    first, second = (load_file(str(run / f"iter-{i:03d}" / "train" /
                                   "adapter_model.safetensors")) for i in range(2))
    assert first.keys() == second.keys()
    assert any(not torch.equal(first[k], second[k]) for k in first)
    # iteration 2 sampled from iteration 1's adapter and continued its AdamW state
    rollout = json.loads((run / "iter-001" / "rollout" / "manifest.json").read_text())
    assert rollout["config"]["student"] == str(run / "iter-000" / "train")
    assert json.loads((run / "iter-001" / "train" / "state" / "trainer.json").read_text())[
        "global_step"] == 4


def test_lora_bad_inputs(adapter, tiny_score, tiny_pair, tmp_path):
    base = ["train", str(tiny_score), "--max-steps", "1", "--train-batch-size", "4"]

    def refused(*args: str, says: str) -> None:
        assert_one_line_error(runner.invoke(app, [*base, *args]), says)

    refused("-o", str(tmp_path / "a"), "--lora-r", "-1", says="--lora-r")
    refused("-o", str(tmp_path / "b"), "--lora-r", "x", says="--lora-r")
    refused("-o", str(tmp_path / "c"), "--lora-r", "4", "--lora-alpha", "0", says="--lora-alpha")
    refused("-o", str(tmp_path / "d"), "--lora-r", "4", "--lora-targets", "q_proj,nope",
            says="nope, which matches no module")
    refused("-o", str(tmp_path / "e"), "--student", str(adapter), says="--lora-r 2")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "mine.txt").write_text("keep me")
    refused("-o", str(tmp_path / "f"), "--lora-r", "4", "--merged-output",
            str(tmp_path / "taken"), says="already exists and is not empty")
    assert (tmp_path / "taken" / "mine.txt").read_text() == "keep me"
    refused("-o", str(tmp_path / "g"), "--merged-output", str(tmp_path / "m"),
            says="needs --lora-r")
    # an adapter whose base is gone
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in adapter.iterdir():
        if f.is_file():
            (broken / f.name).write_bytes(f.read_bytes())
    config = json.loads((broken / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "no-such-base")
    (broken / "adapter_config.json").write_text(json.dumps(config))
    refused("-o", str(tmp_path / "h"), "--student", str(broken), "--lora-r", "2",
            says="is for the base model")
    # a full-weights run resumed with --lora-r: another run
    full = tmp_path / "full"
    assert runner.invoke(app, [*base, "-o", str(full), "--save-every", "1",
                               "--max-steps", "2"]).exit_code == 0
    manifest = json.loads((full / "manifest.json").read_text())
    manifest["complete"] = False
    (full / "manifest.json").write_text(json.dumps(manifest))
    refused("-o", str(full), "--resume", "--lora-r", "4", "--save-every", "1", "--max-steps",
            "2", says="its settings differ: --lora-r was 0, now 4")


def test_a_lora_loop_resumed_from_disk_ends_where_an_uninterrupted_one_does(
        tiny_pair, prompts_file, tmp_path, monkeypatch):
    """Killed before iteration 2 samples: the rerun loads iteration 1's adapter from disk
    on its base, trainable, and continues its AdamW state: the same adapter at the end."""
    import tipcli.stages.distill as distill_mod

    def cfg(out):
        return resolve(DistillConfig, student=str(tiny_pair[0]), teacher=str(tiny_pair[1]),
                       prompts=str(prompts_file), output=str(out), iterations=2, num_samples=2,
                       max_new_tokens=8, max_steps=2, train_batch_size=4, teacher_top_k=8,
                       lr=1e-2, prompts_per_iteration=4, group_size=4, lora_r=4)

    whole = run_distill(cfg(tmp_path / "whole"))
    interrupt_at_call(monkeypatch, distill_mod, "run_rollout", 2)  # before iteration 2 samples
    with pytest.raises(KeyboardInterrupt):
        run_distill(cfg(tmp_path / "cut"))
    monkeypatch.undo()
    cut = run_distill(cfg(tmp_path / "cut"))
    a, b = (load_file(str(r / "iter-001" / "train" / "adapter_model.safetensors"))
            for r in (whole, cut))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


def test_vllm_engine_rank_is_one_vllm_takes():
    """The engine's max_lora_rank: the adapter's rank rounded up to one vLLM accepts; past
    vLLM's largest, one line."""
    from tipcli.engines.vllm_engine import _served_rank

    assert [_served_rank(r) for r in (1, 2, 8, 9, 16, 48, 64, 512)] == \
        [1, 8, 8, 16, 16, 64, 64, 512]
    with pytest.raises(TipError, match="up to rank 512"):
        _served_rank(513)
