"""`tip train`: exactness of the gathered path, invariance to how a step is split,
resume, learning, the files it writes and its one-line errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_one_line_error, free_port
from safetensors.torch import load_file
from typer.testing import CliRunner

from tipcli.catalog import LOSSES
from tipcli.cli import app
from tipcli.configs import resolve
from tipcli.errors import ConfigError
from tipcli.stages.train import TrainConfig, run_train
from tipcli.store.layout import STAGES
from tipcli.store.stagedir import StageDir, StageWriter

runner = CliRunner()
V = 100  # the tiny tokenizer; the tiny models have 13 padded output rows


def _cfg(score, out, **kw) -> TrainConfig:
    base = dict(input=str(score), output=str(out), strategy="all", lr=1e-3,
                train_batch_size=4, max_steps=2, train_chunk_size=16)
    return resolve(TrainConfig, **{**base, **kw})


def _weights(out) -> dict[str, torch.Tensor]:
    return load_file(str(Path(out) / "model.safetensors"))


def _metrics(out) -> list[dict]:
    return [json.loads(ln) for ln in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def _assert_same_weights(a, b, atol):
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=0, atol=atol, msg=name)


def _assert_same_metrics(a, b, rtol=1e-5):
    ma, mb = _metrics(a), _metrics(b)
    assert len(ma) == len(mb)
    for x, y in zip(ma, mb):
        assert x["kept_tokens"] == y["kept_tokens"] and x["tokens"] == y["tokens"]
        for key in ("loss", "grad_norm", "lr"):
            assert y[key] == pytest.approx(x[key], rel=rtol, abs=1e-9), key


# ----------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("loss", tuple(LOSSES))
def test_gathered_positions_equal_masked_full_logits(tiny_pair, tiny_score, loss):
    """Loss and every parameter gradient of the body -> gather -> chunked head path equal
    those of full logits for every position, masked to the kept tokens (float64, the tiny
    pair; the *-full losses with the tiny teacher's logits)."""
    from reference import reference_token_loss
    from transformers import AutoModelForCausalLM

    from tipcli.ops.forward import body_hidden, head_logits
    from tipcli.stages.train import distill_module, make_micro_batch

    seqs = list(StageDir.open(tiny_score).iter_sequences())[:5]
    g = torch.Generator().manual_seed(0)
    names = ("prompt_ids", "response_ids", "teacher_topk_ids", "teacher_topk_logprobs",
             "teacher_logprob", "rollout_logprob")
    batch = make_micro_batch([{n: s[n] for n in names} | {
        "keep": torch.rand(s["response_ids"].numel(), generator=g) < 0.4,
        "quadrant": torch.zeros(s["response_ids"].numel(), dtype=torch.uint8)} for s in seqs],
        pad_id=0)
    assert 0 < batch.rows_K.numel() < sum(s["response_ids"].numel() for s in seqs)
    ids, mask, rows, cols = batch.input_ids_BT, batch.attention_mask_BT, batch.rows_K, batch.cols_K

    def model(i):
        return AutoModelForCausalLM.from_pretrained(tiny_pair[i], dtype=torch.float64)

    teacher = model(1)
    with torch.no_grad():
        t_hidden = body_hidden(teacher, ids, mask)[rows, cols]
        t_logits = teacher(input_ids=ids, attention_mask=mask).logits[rows, cols][:, :V]

    ours = model(0)
    loss_sum, loss_K = distill_module(ours, loss, V, 1.0, chunk_size=7)(
        ids, mask, rows, cols, batch.targets, t_hidden, head_logits(teacher, V))
    loss_sum.backward()

    ref = model(0)
    logits_BTV = ref(input_ids=ids, attention_mask=mask).logits
    ref_K = reference_token_loss(loss, logits_BTV[rows, cols][:, :V], batch.targets, t_logits)
    ref_K.sum().backward()

    torch.testing.assert_close(loss_K, ref_K.detach(), rtol=1e-9, atol=1e-12)
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-8, atol=1e-12, msg=name)
    assert ours.lm_head.weight.grad[V:].abs().max() == 0


# ----------------------------------------------------------------------------- invariance


def test_one_micro_batch_of_8_equals_4_of_2(tiny_score, tmp_path):
    run_train(_cfg(tiny_score, tmp_path / "a", train_batch_size=8, grad_accum=1))
    run_train(_cfg(tiny_score, tmp_path / "b", train_batch_size=2, grad_accum=4))
    _assert_same_metrics(tmp_path / "a", tmp_path / "b")
    assert _metrics(tmp_path / "a")[0]["kept_tokens"] > 8 * 10
    _assert_same_weights(tmp_path / "a", tmp_path / "b", atol=1e-5)


def test_kept_token_normalisation_is_global(tiny_score, tmp_path):
    """The step loss is the mean over all kept tokens of the step, not a mean of
    micro-batch means: with unequal micro-batches the two differ."""
    run_train(_cfg(tiny_score, tmp_path / "a", train_batch_size=2, grad_accum=4, max_steps=1,
                   shuffle=False))
    m = _metrics(tmp_path / "a")[0]
    from transformers import AutoModelForCausalLM

    from tipcli.stages.train import distill_module, load_sequences, make_micro_batch, open_source

    cfg = _cfg(tiny_score, tmp_path / "x")
    seqs = load_sequences(cfg, open_source(cfg))[:8]
    student = AutoModelForCausalLM.from_pretrained(
        StageDir.open(tiny_score).config["student"], dtype=torch.float32)
    module = distill_module(student, "rkl-topk", V, 1.0, 16)
    total, count = 0.0, 0
    for a in range(0, 8, 2):
        mb = make_micro_batch(seqs[a:a + 2], 0)
        with torch.no_grad():
            s, loss_K = module(mb.input_ids_BT, mb.attention_mask_BT, mb.rows_K, mb.cols_K,
                               mb.targets)
        total, count = total + float(s), count + loss_K.numel()
    assert m["kept_tokens"] == count
    assert m["loss"] == pytest.approx(total / count, rel=1e-5)


def test_two_processes_equal_one(tiny_score, tmp_path):
    """Two CPU processes (gloo) with 2 sequences each equal one process with 4.

    accelerate 1.15 runs `accelerate launch --cpu --num_processes 2` as ONE process (its
    simple launcher); `--multi_gpu` on a machine without GPUs starts torchrun with 2
    processes, and the trainer's Accelerator then runs them as MULTI_CPU over gloo."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
           "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--main_process_port", str(free_port()),
           "--dynamo_backend", "no",
           "-m", "tipcli", "train", str(tiny_score), "-o", str(tmp_path / "two"),
           "--strategy", "all", "--lr", "1e-3", "--train-batch-size", "2", "--max-steps",
           "3", "--train-chunk-size", "16"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "TIP_QUIET": "1", "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == str(tmp_path / "two")
    run_train(_cfg(tiny_score, tmp_path / "one", train_batch_size=4, max_steps=3))
    _assert_same_metrics(tmp_path / "one", tmp_path / "two")
    _assert_same_weights(tmp_path / "one", tmp_path / "two", atol=1e-5)


# ----------------------------------------------------------------------------- resume


def test_resume_after_a_stop_equals_no_stop(tiny_score, tmp_path, monkeypatch):
    import tipcli.trainer.loop as train  # where the loop looks save_checkpoint up

    cfg = dict(max_steps=5, save_every=2, train_batch_size=4, warmup=1)
    run_train(_cfg(tiny_score, tmp_path / "full", **cfg))

    save = train.save_checkpoint

    def save_then_stop(tr):
        path = save(tr)
        if tr.state.step == 4:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(train, "save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        run_train(_cfg(tiny_score, tmp_path / "cut", **cfg))
    monkeypatch.setattr(train, "save_checkpoint", save)
    assert not json.loads((tmp_path / "cut" / "manifest.json").read_text())["complete"]
    assert not (tmp_path / "cut" / "model.safetensors").exists()
    r = runner.invoke(app, ["train", str(tiny_score), "-o", str(tmp_path / "cut"),
                            "--strategy", "all", "--lr", "1e-3", "--train-batch-size", "4",
                            "--max-steps", "5", "--train-chunk-size", "16", "--save-every", "2",
                            "--warmup", "1"])
    assert r.exit_code == 2 and "--resume" in r.stderr
    run_train(_cfg(tiny_score, tmp_path / "cut", **cfg), resume=True)
    _assert_same_weights(tmp_path / "full", tmp_path / "cut", atol=0)
    _assert_same_metrics(tmp_path / "full", tmp_path / "cut", rtol=0)
    assert [m["step"] for m in _metrics(tmp_path / "cut")] == [1, 2, 3, 4, 5]


# ----------------------------------------------------------------------------- learning


def _mean_rkl(student_dir, teacher_dir, score) -> float:
    """Full-vocabulary KL(p_s || p_t) averaged over the response tokens of ``score``."""
    from transformers import AutoModelForCausalLM

    from tipcli.ops.forward import collate, head_logits, response_hidden
    from tipcli.ops.stats import token_stats

    s, t = (AutoModelForCausalLM.from_pretrained(p).eval() for p in (student_dir, teacher_dir))
    batch = collate(list(StageDir.open(score).iter_sequences()), 0)
    with torch.no_grad():
        stats = token_stats(response_hidden(s, batch, "cpu"), response_hidden(t, batch, "cpu"),
                            batch.tokens_P, head_logits(s, V), head_logits(t, V))
    return float(stats["rkl"].mean())


def test_30_steps_lower_the_reverse_kl(tiny_pair, tiny_score, tmp_path):
    out = run_train(_cfg(tiny_score, tmp_path / "t", max_steps=30, lr=3e-3, warmup=3))
    before = _mean_rkl(tiny_pair[0], tiny_pair[1], tiny_score)
    stored = float(torch.cat([sh["rkl"] for sh in StageDir.open(tiny_score).iter_shards()]).mean())
    assert before == pytest.approx(stored, rel=1e-4)
    after = _mean_rkl(out, tiny_pair[1], tiny_score)
    assert after < 0.7 * before, (before, after)
    losses = [m["loss"] for m in _metrics(out)]
    assert sum(losses[-5:]) < sum(losses[:5])


def test_full_loss_with_teacher_online_lowers_its_loss(tiny_pair, tiny_rollout, tmp_path):
    """A rollout directory is enough for a *-full loss: the teacher is loaded in training."""
    out = run_train(_cfg(tiny_rollout, tmp_path / "t", loss="rkl-full", teacher=str(tiny_pair[1]),
                         max_steps=9, lr=3e-3))
    losses = [m["loss"] for m in _metrics(out)]
    assert sum(losses[-3:]) < sum(losses[:3])
    m = json.loads((out / "manifest.json").read_text())
    assert m["models"]["teacher"]["id"] == str(tiny_pair[1]) and m["parent"]["stage"] == "rollout"


@pytest.mark.parametrize("loss", ["fkl-topk", "jsd-topk", "rkl-sampled"])
def test_other_losses_train(tiny_score, tmp_path, loss):
    out = run_train(_cfg(tiny_score, tmp_path / "t", loss=loss, max_steps=3))
    ms = _metrics(out)
    assert len(ms) == 3 and all(m["grad_norm"] > 0 for m in ms)
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in ms)


# ----------------------------------------------------------------------------- selections


def _write_selection(score, out, pick) -> Path:
    """A selection directory parallel to ``score`` with ``pick(shard) -> selected_T``."""
    d = StageDir.open(score)
    w = StageWriter(STAGES["select"], out, {"strategy": "handmade"}).start(
        d.manifest["models"], d.manifest["tokenizer"], parent=d)
    for i, shard in enumerate(d.iter_shards()):
        sel = pick(shard)
        quad = (torch.arange(sel.numel()) % 4 + 1).to(torch.uint8)
        w.write_shard(i, {"response_offsets": shard["response_offsets"], "selected": sel,
                          "quadrant": quad})
    return w.finish()


def test_selection_directory_trains_on_its_tokens_only(tiny_score, tmp_path):
    sel = _write_selection(tiny_score, tmp_path / "sel",
                           lambda sh: torch.arange(sh["response_ids"].numel()) % 3 == 0)
    out = run_train(_cfg(sel, tmp_path / "t", train_batch_size=12, max_steps=1))
    m = _metrics(out)[0]
    total = sum(int((torch.arange(sh["response_ids"].numel()) % 3 == 0).sum())
                for sh in StageDir.open(tiny_score).iter_shards())
    assert m["kept_tokens"] == total
    assert set(m["kept_by_quadrant"]) <= {"Q1", "Q2", "Q3", "Q4"}
    assert sum(m["kept_by_quadrant"].values()) == total
    ql = m["loss_by_quadrant"]
    assert m["loss"] == pytest.approx(sum(ql[q] * m["kept_by_quadrant"][q] for q in ql) / total)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["parent"]["stage"] == "select"
    assert manifest["config"]["selection"] == {"strategy": "handmade"}


def test_soft_or_on_the_fly_matches_selection_by_shard(tiny_score, tmp_path):
    from tipcli.configs import Selection
    from tipcli.stages.select import selection_by_shard

    out = run_train(_cfg(tiny_score, tmp_path / "t", strategy="soft-or", keep=0.5,
                         train_batch_size=12, max_steps=1))
    masks = selection_by_shard(StageDir.open(tiny_score), Selection(strategy="soft-or", keep=0.5),
                              seed=0)
    m = _metrics(out)[0]
    assert m["kept_tokens"] == sum(int(x["selected"].sum()) for x in masks)
    assert "unknown" not in m["kept_by_quadrant"]


# ----------------------------------------------------------------------------- CLI


def _files(d: Path) -> set[str]:
    return {p.name for p in Path(d).iterdir()}


def test_cli_writes_exactly_these_files(tiny_score, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "t"
    r = runner.invoke(app, ["train", str(tiny_score), "-o", str(out), "--strategy", "all",
                            "--max-steps", "3", "--save-every", "2", "--train-batch-size", "4",
                            "--lr", "1e-4"])
    assert r.exit_code == 0, r.output
    assert r.stdout.strip().splitlines()[-1] == str(out)
    assert _files(out) == {"manifest.json", "metrics.jsonl", "checkpoints", "config.json",
                           "generation_config.json", "model.safetensors", "tokenizer.json",
                           "tokenizer_config.json", "chat_template.jinja", "state"}
    assert _files(out / "checkpoints") == {"step-000002"}
    # the end's optimizer state and schedule position, for --continue-from: no weights
    assert _files(out / "state") == {"optimizer.safetensors", "optimizer.json",
                                     "scheduler.json", "trainer.json", "checkpoint.json"}
    assert json.loads((out / "state" / "trainer.json").read_text()) == {
        "step": 3, "global_step": 3, "schedule_steps": 3, "warmup": 0, "lr": 1e-4,
        "processes": 1}
    assert _files(out / "checkpoints" / "step-000002") == {
        "model.safetensors", "optimizer.safetensors", "optimizer.json", "scheduler.json",
        "rng-0.safetensors", "trainer.json", "checkpoint.json"}
    m = json.loads((out / "manifest.json").read_text())
    assert m["stage"] == "train" and m["complete"] and m["parent"]["stage"] == "score"
    assert m["config"]["max_steps"] == 3 and m["config"]["loss"] == "rkl-topk"
    assert m["summary"]["steps"] == 3
    ms = _metrics(out)
    assert [x["step"] for x in ms] == [1, 2, 3]
    assert set(ms[0]) == {"step", "global_step", "loss", "kept_tokens", "tokens",
                          "loss_by_quadrant",
                          "kept_by_quadrant", "grad_norm", "lr", "tokens_per_s"}
    model = AutoModelForCausalLM.from_pretrained(out)
    for name, w in _weights(out).items():
        assert torch.equal(model.state_dict()[name], w)
    assert len(AutoTokenizer.from_pretrained(out)) == V
    before = load_file(str(Path(m["config"]["student"]) / "model.safetensors"))
    assert not torch.equal(before["lm_head.weight"], _weights(out)["lm_head.weight"])
    # a second identical run finds the finished directory and leaves it alone
    r2 = runner.invoke(app, ["train", str(tiny_score), "-o", str(out), "--strategy", "all",
                             "--max-steps", "3", "--save-every", "2", "--train-batch-size", "4",
                             "--lr", "1e-4"])
    assert r2.exit_code == 0 and len(_metrics(out)) == 3



def test_error_rollout_has_no_teacher_signal(tiny_rollout, tmp_path):
    r = runner.invoke(app, ["train", str(tiny_rollout), "-o", str(tmp_path / "t")])
    assert_one_line_error(r, "rollout directory", "rkl-topk", "tip score")
    assert not (tmp_path / "t").exists()


def test_error_topk_loss_on_score_without_topk(tiny_pair, tiny_rollout, tmp_path):
    from tipcli.stages.score import ScoreConfig, run_score

    score = run_score(resolve(ScoreConfig, rollout=str(tiny_rollout), teacher=str(tiny_pair[1]),
                                  output=str(tmp_path / "s"), teacher_top_k=0))
    r = runner.invoke(app, ["train", str(score), "-o", str(tmp_path / "t"), "--strategy", "all",
                            "--loss", "fkl-topk"])
    assert_one_line_error(r, "--teacher-top-k 0", "fkl-topk")
    ok = runner.invoke(app, ["train", str(score), "-o", str(tmp_path / "t2"), "--strategy",
                             "all", "--loss", "rkl-sampled", "--max-steps", "1"])
    assert ok.exit_code == 0, ok.output


def test_error_selection_keeps_no_token(tiny_score, tmp_path):
    sel = _write_selection(tiny_score, tmp_path / "sel",
                           lambda sh: torch.zeros(sh["response_ids"].numel(), dtype=torch.bool))
    r = runner.invoke(app, ["train", str(sel), "-o", str(tmp_path / "t")])
    assert_one_line_error(r, "keeps 0 tokens")


def test_error_lists_every_bad_setting(tiny_score, tmp_path):
    r = runner.invoke(app, ["train", str(tiny_score), "-o", str(tmp_path / "t"), "--loss", "kl",
                            "--keep", "0", "--train-batch-size", "0", "--lr", "-1"])
    assert_one_line_error(r, "--loss must be one of", "--keep", "--train-batch-size", "--lr")
    with pytest.raises(ConfigError) as exc:
        resolve(TrainConfig, loss="rkl-full")
    problems = exc.value.problems
    assert any("--teacher" in p for p in problems) and len(problems) == 3


def test_error_too_few_sequences_for_a_step(tiny_score, tmp_path):
    r = runner.invoke(app, ["train", str(tiny_score), "-o", str(tmp_path / "t"), "--strategy",
                            "all", "--train-batch-size", "8", "--grad-accum", "2"])
    assert_one_line_error(r, "fewer than one step", "--train-batch-size")


def test_gradient_checkpointing_changes_nothing_but_memory(tiny_score, tmp_path):
    run_train(_cfg(tiny_score, tmp_path / "a"))
    run_train(_cfg(tiny_score, tmp_path / "b", gradient_checkpointing=True))
    _assert_same_metrics(tmp_path / "a", tmp_path / "b")
    _assert_same_weights(tmp_path / "a", tmp_path / "b", atol=1e-6)


def test_input_path_from_stdin(tiny_score, tmp_path):
    r = runner.invoke(app, ["train", "-", "-o", str(tmp_path / "t"), "--strategy", "all",
                            "--max-steps", "1"], input=f"{tiny_score}\n")
    assert r.exit_code == 0, r.output
    assert r.stdout.strip().splitlines()[-1] == str(tmp_path / "t")
    assert json.loads((tmp_path / "t" / "manifest.json").read_text())["parent"]["path"] == \
        str(Path(tiny_score).resolve())


def _train_memory_bench():
    import importlib.util

    path = Path(__file__).parents[2] / "benchmarks" / "train_memory.py"
    spec = importlib.util.spec_from_file_location("train_memory", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_memory_benchmark_quick_form():
    """benchmarks/train_memory.py's worker, in-process on a small model: it runs and counts
    the kept tokens (its memory readings mean something only in the fresh processes the
    script starts, and may be 0 in-process, so none is asserted on)."""
    bench = _train_memory_bench()
    small = ["--vocab", "8000", "--hidden", "64", "--layers", "1", "--batch", "2",
             "--seq-len", "96", "--prompt-len", "16", "--top-k", "8", "--chunk-size", "16",
             "--steps", "1"]
    rows = [bench.worker(bench.parse_args([*small, "--worker", mode, "--measure", "time"]))
            for mode in ("naive", "keep=1.0", "keep=0.5")]
    assert [r["kept_tokens"] for r in rows] == [160, 160, 80]
    assert all(r["step_seconds"] > 0 for r in rows)


def test_memory_benchmark_table_from_synthetic_rows():
    """The table's ratios, and a 0-byte baseline reading (seen in-process on some CPUs)
    shown as "-" rather than a division by zero."""
    bench = _train_memory_bench()
    rows = [{"config": "naive", "keep": 1.0, "kept_tokens": 160, "peak_step_bytes": 4 << 20,
             "step_seconds": 3.0},
            {"config": "keep=1.0", "keep": 1.0, "kept_tokens": 160, "peak_step_bytes": 2 << 20,
             "step_seconds": 2.0},
            {"config": "keep=0.5", "keep": 0.5, "kept_tokens": 80, "peak_step_bytes": 1 << 20,
             "step_seconds": 1.0}]
    md = bench.table(rows, "MiB").splitlines()
    assert len(md) == 5
    assert md[2] == "| naive (full logits) | 160 | 4 | 1.00 | 3.00 | 1.50 |"
    assert md[4] == "| tip, keep 0.5 | 80 | 1 | 0.25 | 1.00 | 0.50 |"
    rows[0]["peak_step_bytes"] = 0
    md = bench.table(rows, "MiB").splitlines()
    assert md[4] == "| tip, keep 0.5 | 80 | 1 | - | 1.00 | 0.50 |"


def test_unusable_accelerate_launch_is_a_one_line_error(tiny_score, tmp_path):
    """An FSDP launch on a machine without GPUs: accelerate refuses, and a process says so
    in one line and exits with 2, instead of a traceback (the launcher may stop the other
    process before it prints the same line)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--use_fsdp",
           "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "-m", "tipcli", "train", str(tiny_score), "-o",
           str(tmp_path / "t"), "--strategy", "all", "--max-steps", "1"]
    if torch.cuda.is_available():
        pytest.skip("FSDP can run here")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "TIP_QUIET": "1", "OMP_NUM_THREADS": "1"})
    assert out.returncode != 0
    ours = [ln for ln in out.stderr.splitlines() if ln.startswith("error: ")]
    assert 1 <= len(ours) <= 2 and all("accelerate could not set up this launch" in ln
                                       for ln in ours), out.stderr[-2000:]
    assert "exitcode: 2" in out.stderr and '/tipcli/' not in out.stderr
