"""`tip train --fsdp`: FSDP2 on 2 CPU processes over gloo against one process, what each
process holds, checkpoint and resume, the saved model; one process; `tip distill --fsdp`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import free_port, kill_every_process_of
from safetensors.torch import load_file

from tipcli.configs import resolve
from tipcli.stages.train import TrainConfig, run_train

ENV = {**os.environ, "TIP_QUIET": "1", "OMP_NUM_THREADS": "1"}
# clipping at 0.3 is active in every step of these runs (their gradient norms are ~0.5)
TRAIN = ["--strategy", "all", "--lr", "1e-3", "--train-chunk-size", "16", "--warmup", "1",
         "--max-grad-norm", "0.3"]
STEPS = ["--train-batch-size", "2", "--max-steps", "6", "--save-every", "2"]  # 2 epochs of 3 steps


def _torchrun(*args) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "--master_port", str(free_port()), "-m", "tipcli", "train", *map(str, args)]


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=ENV)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def _one_process(score, out, resume: bool = False, **kw) -> Path:
    """A run in this process (the reference: without --fsdp, the same global batch)."""
    base = dict(input=str(score), output=str(out), strategy="all", lr=1e-3,
                train_chunk_size=16,
                warmup=1, max_grad_norm=0.3)
    return run_train(resolve(TrainConfig, **{**base, **kw}), resume=resume)


def _weights(out) -> dict[str, torch.Tensor]:
    return load_file(str(Path(out) / "model.safetensors"))


def _metrics(out) -> list[dict]:
    return [json.loads(ln) for ln in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def _summary(out) -> dict:
    return json.loads((Path(out) / "manifest.json").read_text())["summary"]


def _assert_close(a, b, atol: float, rtol_metrics: float) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=0, atol=atol, msg=name)
    ma, mb = _metrics(a), _metrics(b)
    assert [m["step"] for m in ma] == [m["step"] for m in mb]
    for x, y in zip(ma, mb):
        assert (x["kept_tokens"], x["tokens"]) == (y["kept_tokens"], y["tokens"])
        for key in ("loss", "grad_norm", "lr"):
            assert y[key] == pytest.approx(x[key], rel=rtol_metrics, abs=1e-12), key


@pytest.fixture(scope="module")
def fsdp_run(tiny_score, tmp_path_factory) -> Path:
    """torchrun, 2 processes, --fsdp: 6 steps of 2 x 2 sequences, a checkpoint every 2."""
    out = tmp_path_factory.mktemp("fsdp") / "two"
    r = _run(_torchrun(tiny_score, "-o", out, *TRAIN, *STEPS, "--fsdp"))
    assert r.stdout.strip().splitlines()[-1] == str(out)
    return out


# ----------------------------------------------------------------------------- exactness


def test_two_processes_equal_one_process(fsdp_run, tiny_score, tmp_path):
    """Sharded gradients averaged by the reduce-scatter, the loss over the global kept
    tokens, clipping by the global norm: the weights of one unsharded process."""
    one = _one_process(tiny_score, tmp_path / "one", train_batch_size=4, max_steps=6)
    assert all(m["grad_norm"] > 0.3 for m in _metrics(fsdp_run))  # clipping was active
    _assert_close(one, fsdp_run, atol=1e-5, rtol_metrics=1e-5)


def test_gradient_accumulation_through_accelerate_launch(tiny_score, tmp_path):
    """2 processes x 2 micro-batches of 1 = one process's micro-batch of 4; launched with
    `accelerate launch --multi_gpu` (two CPU processes over gloo on this machine)."""
    two = tmp_path / "two"
    _run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
          "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
          "--main_process_port", str(free_port()), "--dynamo_backend", "no",
          "-m", "tipcli", "train", str(tiny_score), "-o", str(two), *TRAIN,
          "--train-batch-size", "1", "--grad-accum", "2", "--max-steps", "3", "--fsdp"])
    one = _one_process(tiny_score, tmp_path / "one", train_batch_size=4, max_steps=3)
    _assert_close(one, two, atol=1e-5, rtol_metrics=1e-5)


def test_each_process_holds_half_of_the_parameters_and_adamw_state(fsdp_run, tiny_pair):
    from transformers import AutoModelForCausalLM

    total = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_pair[0])
                .parameters())
    held = _summary(fsdp_run)["numel_per_process"]
    assert len(held["parameters"]) == len(held["optimizer_state"]) == 2
    assert sum(held["parameters"]) == total
    for params, state in zip(held["parameters"], held["optimizer_state"]):
        assert 0.4 * total < params < 0.6 * total
        # exp_avg and exp_avg_sq shards, plus one step counter per parameter tensor
        assert 0.4 * 2 * total < state < 0.6 * 2 * total + 100


# ----------------------------------------------------------------------------- resume


@pytest.mark.slow
def test_kill_9_and_resume_equals_an_uninterrupted_run(fsdp_run, tiny_score, tmp_path):
    """SIGKILL to the launcher's process group once the step-4 checkpoint is there, then
    --resume: the same weights, bit for bit, as the uninterrupted run."""
    out = tmp_path / "cut"
    args = (tiny_score, "-o", out, *TRAIN, *STEPS, "--fsdp")
    proc = subprocess.Popen(_torchrun(*args), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=ENV, start_new_session=True)
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        if any(out.glob("checkpoints/step-000004")):
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait()
    kill_every_process_of(str(out))  # its workers too, before reading their output
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not json.loads((out / "manifest.json").read_text())["complete"]
    assert not (out / "model.safetensors").exists()
    ckpt = next((out / "checkpoints").glob("step-*"))
    assert {"rng-0.safetensors", "rng-1.safetensors"} <= {p.name for p in ckpt.iterdir()}
    _run(_torchrun(*args, "--resume"))
    _assert_close(fsdp_run, out, atol=0, rtol_metrics=0)
    assert _summary(out)["numel_per_process"] == _summary(fsdp_run)["numel_per_process"]


def test_optimizer_state_keys_survive_the_round_trip():
    """Index keys (one process, DDP) stay ints; FSDP's parameter names keep their dots."""
    from tipcli.trainer.checkpoint import _join_optimizer, _split_optimizer

    for keys in ([0, 1, 10], ["student.model.layers.0.mlp.up_proj.weight", "student.lm_head.w"]):
        sd = {"state": {k: {"step": torch.tensor(3.0), "exp_avg": torch.full((2,), float(i)),
                            "flag": i} for i, k in enumerate(keys)},
              "param_groups": [{"lr": 0.1, "params": keys}]}
        tensors, meta = _split_optimizer(sd)
        back = _join_optimizer(tensors, json.loads(json.dumps(meta)))
        assert list(back["state"]) == keys and back["param_groups"] == sd["param_groups"]
        for k in keys:
            assert back["state"][k]["flag"] == sd["state"][k]["flag"]
            assert torch.equal(back["state"][k]["exp_avg"], sd["state"][k]["exp_avg"])


# ----------------------------------------------------------------------------- output


def test_output_is_one_ordinary_checkpoint(fsdp_run):
    from transformers import AutoModelForCausalLM

    assert {p.name for p in fsdp_run.iterdir()} == {
        "manifest.json", "metrics.jsonl", "checkpoints", "config.json",
        "generation_config.json", "model.safetensors", "tokenizer.json",
        "tokenizer_config.json", "chat_template.jinja", "state"}
    # the AdamW state at the end, for --continue-from: each process's shards, no weights
    assert {p.name for p in (fsdp_run / "state").iterdir()} == {
        "sharded", "optimizer.json", "scheduler.json", "trainer.json", "checkpoint.json"}
    assert len(list((fsdp_run / "state" / "sharded").glob("*.safetensors"))) == 2
    assert json.loads((fsdp_run / "config.json").read_text())["architectures"] == \
        ["LlamaForCausalLM"]
    model = AutoModelForCausalLM.from_pretrained(fsdp_run)
    for name, w in _weights(fsdp_run).items():
        assert torch.equal(model.state_dict()[name], w)
    m = json.loads((fsdp_run / "manifest.json").read_text())
    assert m["complete"] and m["config"]["fsdp"] is True and _summary(fsdp_run)["steps"] == 6
    assert [x["step"] for x in _metrics(fsdp_run)] == list(range(1, 7))


# ----------------------------------------------------------------------------- one process


def test_one_process_is_a_mesh_of_one(tiny_score, tmp_path):
    """--fsdp without a launcher: the same weights as without it, and no process group
    left behind."""
    import torch.distributed as dist

    a = _one_process(tiny_score, tmp_path / "a", train_batch_size=4, max_steps=3)
    b = _one_process(tiny_score, tmp_path / "b", train_batch_size=4, max_steps=3, fsdp=True,
                     save_every=2)
    assert not dist.is_initialized()
    _assert_close(a, b, atol=0, rtol_metrics=0)
    assert _summary(b)["numel_per_process"] == _summary(a)["numel_per_process"]


def test_one_process_resume_equals_no_stop(tiny_score, tmp_path, monkeypatch):
    """The FSDP checkpoint path (each process's shards through torch.distributed.checkpoint's
    safetensors storage, AdamW's hyper-parameters as JSON) in one process: stop after step
    4's checkpoint, resume, and get the uninterrupted run's weights bit for bit."""
    import torch.distributed as dist

    import tipcli.trainer.loop as loop

    cfg = dict(train_batch_size=2, max_steps=6, save_every=2, fsdp=True)
    _one_process(tiny_score, tmp_path / "full", **cfg)
    save = loop.save_checkpoint

    def save_then_stop(tr):
        path = save(tr)
        if tr.state.step == 4:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(loop, "save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        _one_process(tiny_score, tmp_path / "cut", **cfg)
    monkeypatch.setattr(loop, "save_checkpoint", save)
    assert not dist.is_initialized()
    step = next((tmp_path / "cut" / "checkpoints").glob("step-*"))
    assert {p.name for p in (step / "sharded").iterdir()} == {
        "shard-00001-model-00001-of-00001.safetensors"}
    assert not (step / "model.safetensors").exists()
    meta = json.loads((step / "optimizer.json").read_text())["sharded"]
    assert meta["param_groups.student.model.embed_tokens.weight.initial_lr"] == pytest.approx(1e-3)
    _one_process(tiny_score, tmp_path / "cut", resume=True, **cfg)
    _assert_close(tmp_path / "full", tmp_path / "cut", atol=0, rtol_metrics=0)


CUT = dict(train_batch_size=2, max_steps=4, save_every=2, fsdp=True)


def _cut_at_step_2(score, out, monkeypatch) -> None:
    """One process, --fsdp, stopped after step 2's checkpoint (of 4)."""
    import tipcli.trainer.loop as loop

    save = loop.save_checkpoint

    def save_then_stop(tr):
        path = save(tr)
        if tr.state.step == 2:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(loop, "save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        _one_process(score, out, **CUT)
    monkeypatch.setattr(loop, "save_checkpoint", save)


def _plant_shifted_copy(sharded: Path, name: str) -> None:
    """A valid shard file beside the real one: the same tensors and header, plus 1.0."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    real = next(sharded.glob("*.safetensors"))
    with safe_open(str(real), framework="pt") as f:
        tensors = {k: f.get_tensor(k) + 1 for k in f.keys()}
        save_file(tensors, str(sharded / name), metadata=f.metadata())


@pytest.mark.parametrize("name,plant", [
    ("extra.safetensors", _plant_shifted_copy),
    ("notes.safetensors", lambda d, n: (d / n).write_bytes(b"not a safetensors file"))])
def test_resume_refuses_a_file_the_checkpoint_does_not_list(tiny_score, tmp_path, monkeypatch,
                                                           name, plant):
    """torch's reader takes every safetensors file in sharded/: one planted there (a
    valid shard that would shift every weight by 1, or garbage) makes resume refuse in one
    line, nothing changed; without it the run resumes."""
    from tipcli.errors import TipError

    out = tmp_path / "cut"
    _cut_at_step_2(tiny_score, out, monkeypatch)
    sharded = next((out / "checkpoints").glob("step-*")) / "sharded"
    plant(sharded, name)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(TipError) as err:
        _one_process(tiny_score, out, resume=True, **CUT)
    assert len(str(err.value).splitlines()) == 1
    assert f"sharded/{name} is not listed in" in str(err.value)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    (sharded / name).unlink()
    _one_process(tiny_score, out, resume=True, **CUT)
    assert _summary(out)["steps"] == 4


def test_distill_passes_fsdp_to_training(tiny_pair, prompts_file, tmp_path):
    from tipcli.stages.distill import DistillConfig, run_distill

    run = run_distill(resolve(DistillConfig, student=str(tiny_pair[0]),
                              teacher=str(tiny_pair[1]), prompts=str(prompts_file),
                              output=str(tmp_path / "run"), iterations=2, num_samples=2,
                              max_new_tokens=8, max_steps=2, train_batch_size=4,
                              teacher_top_k=8, lr=1e-3,
                              prompts_per_iteration=4, group_size=4, fsdp=True))
    for i in range(2):
        m = json.loads((run / f"iter-{i:03d}" / "train" / "manifest.json").read_text())
        assert m["complete"] and m["config"]["fsdp"] is True
    # iteration 1 trained the student iteration 0 wrote
    assert json.loads((run / "iter-001" / "train" / "manifest.json").read_text()
                      )["config"]["student"] == str(run / "iter-000" / "train")


@pytest.mark.parametrize("flags", [["--fsdp"], ["--shard-teacher"], ["--fsdp", "--shard-teacher"]])
def test_distill_says_that_sharding_needs_a_launcher(tiny_pair, prompts_file, tmp_path,
                                                     monkeypatch, flags):
    """Without a launcher --fsdp and --shard-teacher shard over one process: one notice
    line on stderr says so (the run itself is stopped here, once that is decided)."""
    from typer.testing import CliRunner

    import tipcli.stages.distill as distill
    from tipcli.cli import app

    def stop(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(distill, "load_tokenizer", stop)
    args = ["distill", "-s", str(tiny_pair[0]), "-t", str(tiny_pair[1]), "-p",
            str(prompts_file), "-o", str(tmp_path / "run")]
    r = CliRunner().invoke(app, [*args, *flags])
    notices = [ln for ln in r.stderr.splitlines() if ln.startswith("notice:")]
    assert notices == [f"notice: {' and '.join(flags)} shard over the launched processes, and "
                       "this run has one (no launcher), so they save no memory; launch it with "
                       "torchrun or accelerate launch to shard"], r.stderr
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 130 and "notice:" not in r.stderr
