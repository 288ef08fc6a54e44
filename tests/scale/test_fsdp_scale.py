"""A student that never sits whole on a process (--fsdp): loaded shard by shard from its
safetensors, checkpointed shard by shard (torch.distributed.checkpoint, safetensors
storage), resumed on another number of processes, written out a tensor at a time."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import free_port
from safetensors.torch import load_file
from test_distributed import ENV, kill_at_first_checkpoint, tip, torchrun

LOAD = """
import sys, torch
from tipcli.dist.mesh import load_sharded_weights, make_mesh
from tipcli.models.loading import empty_model, load_model
from tipcli.dist.processes import processes
from tipcli.dist import fsdp as fsdp2
from tipcli.trainer.module import DistillModule
procs = processes("cpu")
mesh, _ = make_mesh(torch.device("cpu"), procs.world)
student, files = empty_model(sys.argv[1])
module = DistillModule(student, "rkl-topk", 100, 1.0, 8)
fsdp2.shard(module, mesh, bf16=False)
load_sharded_weights(module, files, "cpu")
mine = sum(p.to_local().numel() for p in module.parameters())
state = fsdp2.full_model_state(module)
if procs.main:
    ref = load_model(sys.argv[1]).state_dict()
    same = sorted(ref) == sorted(k.removeprefix("student.") for k in state) and all(
        torch.equal(state["student." + k], v) for k, v in ref.items())
    total = sum(p.numel() for p in load_model(sys.argv[1]).parameters())
    print("SAME" if same else "DIFFERENT", mine, total)
"""


@pytest.fixture(scope="module")
def tied_student(tmp_path_factory):
    from tipcli.models.tiny import build_model, build_tokenizer

    out = tmp_path_factory.mktemp("tied") / "student"
    tok = build_tokenizer()
    build_model(tok, hidden=32, layers=2, seed=9, vocab_pad=13, tied=True).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.mark.parametrize("procs", [1, 2])
@pytest.mark.parametrize("which", ["untied", "tied"])
def test_each_process_reads_only_its_shards(tiny_pair, tied_student, tmp_path, procs, which):
    """Built on the meta device, sharded, then each process reads its own rows from the
    safetensors: gathered, the same weights as a whole load; each process held its part."""
    script = tmp_path / "load.py"
    script.write_text(LOAD)
    model = tiny_pair[0] if which == "untied" else tied_student
    head = torchrun(procs, "--master_port", str(free_port())) if procs > 1 else \
        [sys.executable]
    r = subprocess.run([*head, str(script), str(model)], capture_output=True, text=True,
                       env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    verdict, mine, total = r.stdout.split()
    assert verdict == "SAME"
    share = int(mine) / int(total)
    assert share == 1.0 if procs == 1 else 0.4 < share < 0.6


def train_args(score, out, batch: int, *extra) -> list:
    return ["train", score, "-o", out, "--strategy", "all", "--fsdp", "--max-steps", "6",
            "--save-every", "2", "--lr", "1e-3", "--train-chunk-size", "16",
            "--train-batch-size", str(batch), *extra]


def test_saved_on_two_processes_resumes_on_one_and_on_three(tiny_score, tmp_path):
    """Killed after a checkpoint on 2 processes (3 sequences each), resumed on 1 (6) and
    on 3 (2): the same global batch, so the uninterrupted run's weights (1e-5)."""
    whole = tmp_path / "whole"
    r = tip(train_args(tiny_score, whole, 3), procs=2)
    assert r.returncode == 0, r.stderr[-3000:]
    cut = tmp_path / "cut"
    kill_at_first_checkpoint(train_args(tiny_score, cut, 3), cut)
    if json.loads((cut / "manifest.json").read_text())["complete"]:
        pytest.skip("the run finished before it could be killed")
    step = next((cut / "checkpoints").glob("step-*"))
    assert len(list((step / "sharded").glob("shard-*.safetensors"))) == 2  # one per process
    want = load_file(str(whole / "model.safetensors"))
    shutil.copytree(cut, tmp_path / "kept")
    for procs, batch in ((1, 6), (3, 2)):
        shutil.rmtree(cut)
        shutil.copytree(tmp_path / "kept", cut)  # the same output path, as a user resumes
        r = tip(train_args(tiny_score, cut, batch, "--resume"), procs=procs)
        assert r.returncode == 0, r.stderr[-3000:]
        got = load_file(str(cut / "model.safetensors"))
        assert got.keys() == want.keys()
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-5, msg=(procs, k))


WHOLE = """
import os, sys, torch
from pathlib import Path
from tipcli.dist.mesh import load_sharded_weights, make_mesh
from tipcli.models.loading import load_model
from tipcli.dist.processes import processes
from tipcli.dist import fsdp as fsdp2
from tipcli.trainer.module import DistillModule
procs = processes("cpu")
mesh, _ = make_mesh(torch.device("cpu"), procs.world)
module = DistillModule(load_model(sys.argv[1]), "rkl-topk", 100, 1.0, 8)
fsdp2.shard(module, mesh, bf16=False)
out = Path(sys.argv[2])
if procs.main:
    out.mkdir()
procs.barrier()
fsdp2.save_whole(module, out, procs.main, max_shard_bytes=int(sys.argv[3]))
procs.barrier()
sys.stdout.flush()
os._exit(0)  # the files are written and closed; skip the teardown gloo now and then aborts in
"""


def test_the_output_is_written_a_tensor_at_a_time(tiny_pair, tmp_path):
    """Under FSDP the output model is gathered a tensor at a time into files of at most
    the given size (an index beside them): from_pretrained loads the same weights."""
    from transformers import AutoModelForCausalLM

    script = tmp_path / "whole.py"
    script.write_text(WHOLE)
    out = tmp_path / "out"
    r = subprocess.run([*torchrun(2, "--master_port", str(free_port())), str(script),
                        str(tiny_pair[0]), str(out), str(40_000)], capture_output=True,
                       text=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    files = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(files) > 2 and (out / "model.safetensors.index.json").is_file()
    assert all(p.stat().st_size < 40_000 + 20_000 for p in out.glob("model-*.safetensors"))
    shutil.copy(tiny_pair[0] / "config.json", out / "config.json")
    a = AutoModelForCausalLM.from_pretrained(out).state_dict()
    b = AutoModelForCausalLM.from_pretrained(tiny_pair[0]).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
