"""A teacher sharded over the processes with FSDP2 for inference (--shard-teacher, torchrun
with 2 CPU processes over gloo): the statistics and the *-full losses of a whole teacher."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from test_distributed import distill_args, tip

from tipcli.store.stagedir import StageDir


def assert_same_scores(a, b, atol=1e-5) -> None:
    for x, y in zip(StageDir.open(a).iter_shards(), StageDir.open(b).iter_shards()):
        assert x.keys() == y.keys()
        for k in x:
            if x[k].is_floating_point():
                torch.testing.assert_close(x[k], y[k], rtol=0, atol=atol, msg=k)
            else:
                assert torch.equal(x[k], y[k]), k


@pytest.fixture(scope="module")
def tied_teacher(tmp_path_factory):
    """A teacher whose LM head is its input embeddings (as SmolLM2's and Qwen3's small
    models are): then both stay in FSDP2's root unit."""
    from tipcli.models.tiny import build_model, build_tokenizer

    out = tmp_path_factory.mktemp("tied") / "teacher"
    tok = build_tokenizer()
    build_model(tok, hidden=48, layers=3, seed=5, vocab_pad=13, tied=True).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.mark.parametrize("which", ["untied", "tied"])
def test_sharded_teacher_scores_what_a_whole_one_does(tiny_pair, tiny_rollout, tied_teacher,
                                                      tmp_path, which):
    """2 processes, each holding half the teacher and scoring its own shards (batches of
    one, so the processes run different numbers of them): the scores of one process
    with the whole teacher, within 1e-5."""
    teacher = tiny_pair[1] if which == "untied" else tied_teacher
    args = ["score", tiny_rollout, "-t", teacher, "--teacher-top-k", "8",
            "--score-batch-size", "1"]
    r = tip([*args, "-o", tmp_path / "whole"])
    assert r.returncode == 0, r.stderr[-3000:]
    r = tip([*args, "-o", tmp_path / "sharded", "--shard-teacher"], procs=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_scores(tmp_path / "whole", tmp_path / "sharded")
    one = tip([*args, "-o", tmp_path / "one", "--shard-teacher"])  # a mesh of one
    assert one.returncode == 0, one.stderr[-3000:]
    assert_same_scores(tmp_path / "whole", tmp_path / "one", atol=0)


def test_full_loss_with_a_sharded_teacher(tiny_pair, tiny_rollout, tmp_path):
    """rkl-full with the teacher sharded over 2 processes (DDP student): the weights of
    one process with the whole teacher, within 1e-5."""
    args = ["train", tiny_rollout, "--loss", "rkl-full", "-t", tiny_pair[1], "--strategy",
            "all", "--max-steps", "3", "--lr", "1e-3", "--train-chunk-size", "5"]
    r = tip([*args, "--train-batch-size", "4", "-o", tmp_path / "whole"])
    assert r.returncode == 0, r.stderr[-3000:]
    r = tip([*args, "--train-batch-size", "2", "-o", tmp_path / "sharded", "--shard-teacher"],
            procs=2)
    assert r.returncode == 0, r.stderr[-3000:]
    wa, wb = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("whole", "sharded"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-5, msg=k)


def test_distill_with_a_sharded_teacher(tiny_pair, many_prompts, tmp_path):
    """The loop with --shard-teacher and --fsdp on 2 processes (teacher and student both
    sharded): the run of one process with both whole."""
    from test_distributed import assert_same_run

    prompts = many_prompts
    r = tip(distill_args(tiny_pair, prompts, tmp_path / "one", 4))
    assert r.returncode == 0, r.stderr[-3000:]
    r = tip(distill_args(tiny_pair, prompts, tmp_path / "two", 2, "--shard-teacher", "--fsdp"),
            procs=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_run(tmp_path / "one", tmp_path / "two")


def test_sharded_teacher_refusals(tiny_pair, tiny_rollout, tmp_path):
    from conftest import assert_one_line_error
    from typer.testing import CliRunner

    from tipcli.cli import app

    r = CliRunner().invoke(app, ["score", str(tiny_rollout), "-t", str(tiny_pair[1]), "-o",
                                 str(tmp_path / "o"), "--shard-teacher", "--device-map",
                                 "auto"])
    assert_one_line_error(r, "--shard-teacher and --device-map")
    r = CliRunner().invoke(app, ["distill", "-s", str(tiny_pair[0]), "-t", str(tiny_pair[1]),
                                 "-p", str(tiny_rollout), "-o", str(tmp_path / "d"),
                                 "--shard-teacher", "--eval-prompts", str(tiny_rollout),
                                 "--eval-metric", "kl"])
    assert_one_line_error(r, "use --eval-metric accuracy with --shard-teacher")


@pytest.mark.parametrize("which", ["untied", "tied"])
def test_sharded_teacher_is_built_from_its_own_rows(tiny_pair, tied_teacher, monkeypatch,
                                                    which):
    """--shard-teacher never loads the whole teacher: it is built on the meta device and
    filled from the safetensors (loading it whole fails here), and holds the checkpoint's
    weights in the model's dtype and computes what the whole model does."""
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM

    from tipcli.models import loading
    from tipcli.models.teacher import ShardedTeacher, make_teacher
    from tipcli.ops.forward import body_hidden

    path = str(tiny_pair[1] if which == "untied" else tied_teacher)
    whole = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval()

    def whole_load(*args, **kwargs):
        raise AssertionError("the sharded teacher was loaded whole")

    monkeypatch.setattr(loading, "load_model", whole_load)
    rt = SimpleNamespace(shard_teacher=True, trust_remote_code=False, device_map="",
                         max_memory="")
    teacher = make_teacher(path, loading.load_tokenizer(path), rt, SimpleNamespace(world=1),
                           "cpu", torch.float64)
    try:
        assert isinstance(teacher, ShardedTeacher) and not teacher.model.training
        want = dict(whole.named_parameters())
        for name, p in teacher.model.named_parameters():
            assert p.dtype == torch.float64 and not p.requires_grad
            assert torch.equal(p.full_tensor(), want[name]), name
        ids = torch.tensor([[5, 9, 14, 3, 22, 7]])
        mask = torch.ones_like(ids)
        torch.testing.assert_close(teacher.hidden(ids, mask), body_hidden(whole, ids, mask),
                                   rtol=0, atol=1e-12)
    finally:
        teacher.close()
