"""Rollout and score over several processes (torchrun, 2 CPU processes over gloo): the
same data as one process, and a run killed in one process resumes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import free_port
from safetensors.torch import load_file

from tipcli.store.stagedir import StageDir

ENV = {**os.environ, "TIP_QUIET": "1", "OMP_NUM_THREADS": "1"}


def _tip(args, procs: int = 1):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs),
                "--master_port", str(free_port())] if procs > 1 else [sys.executable]
    return subprocess.run([*launcher, "-m", "tipcli", *map(str, args)], capture_output=True,
                          text=True, env=ENV, timeout=600)


@pytest.fixture(scope="module")
def rollouts(tiny_pair, prompts_file, tmp_path_factory):
    """The same rollout by 1 and by 2 processes (6 prompts x 2 samples, shards of 2)."""
    out = tmp_path_factory.mktemp("parallel")
    args = ["rollout", "-s", tiny_pair[0], "-p", prompts_file, "--num-samples", "2",
            "--max-new-tokens", "16", "--sample-batch-size", "2", "--shard-size", "2"]
    for procs in (1, 2):
        r = _tip([*args, "-o", out / f"r{procs}"], procs)
        assert r.returncode == 0, r.stderr[-3000:]
        assert r.stdout.strip().splitlines() == [str(out / f"r{procs}")]  # one line in all
    return out / "r1", out / "r2"


def test_two_processes_sample_exactly_what_one_does(rollouts):
    one, two = (StageDir.open(d, stage="rollout") for d in rollouts)
    assert len(one.shards) == len(two.shards) == 6
    assert [s["sha256"] for s in one.shards] == [s["sha256"] for s in two.shards]
    assert two.manifest["summary"]["num_processes"] == 2
    assert "num_processes" not in one.manifest["summary"]
    assert not list(rollouts[1].glob(".progress-*"))


def test_two_processes_score_what_one_does(tiny_pair, rollouts, tmp_path):
    args = ["score", rollouts[0], "--teacher", tiny_pair[1], "--teacher-top-k", "8"]
    for procs in (1, 2):
        r = _tip([*args, "-o", tmp_path / f"s{procs}"], procs)
        assert r.returncode == 0, r.stderr[-3000:]
    one, two = (StageDir.open(tmp_path / f"s{p}", stage="score") for p in (1, 2))
    assert len(two.shards) == 6 and two.manifest["summary"]["num_processes"] == 2
    for a, b in zip(one.shards, two.shards):
        ta, tb = load_file(str(one.path / a["file"])), load_file(str(two.path / b["file"]))
        assert ta.keys() == tb.keys()
        for k in ta:
            torch.testing.assert_close(ta[k], tb[k], rtol=0, atol=1e-6, msg=k)


def test_kill_9_of_one_process_and_a_rerun_resumes(tiny_pair, prompts_file, rollouts,
                                                   tmp_path):
    """SIGKILL one of two rollout processes once the other has written a shard: the
    launcher stops the run; the same command resumes it to the bytes of one process."""
    out = tmp_path / "r"
    args = ["rollout", "-s", tiny_pair[0], "-p", prompts_file, "--num-samples", "2",
            "--max-new-tokens", "16", "--sample-batch-size", "2", "--shard-size", "2", "-o",
            out]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", str(free_port())]
    proc = subprocess.Popen([*launcher, "-m", "tipcli", *map(str, args)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV,
                            start_new_session=True)
    killed, deadline = None, time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline and killed is None:
        progress = list(out.glob(".progress-*.json")) if out.is_dir() else []
        if progress:  # a process has finished a shard: kill the other one
            done_rank = int(progress[0].stem.split("-")[1])
            killed = _worker_pid(proc.pid, 1 - done_rank)
            if killed:
                os.kill(killed, signal.SIGKILL)
        time.sleep(0.01)
    proc.wait(timeout=120)
    assert killed and proc.returncode != 0, "the run ended before a process could be killed"
    manifest = json.loads((out / "manifest.json").read_text())
    assert not manifest["complete"]
    r = _tip(args, 2)
    assert r.returncode == 0, r.stderr[-3000:]
    done = StageDir.open(out, stage="rollout")
    ref = StageDir.open(rollouts[0], stage="rollout")
    assert [s["sha256"] for s in done.shards] == [s["sha256"] for s in ref.shards]


def _worker_pid(launcher_pid: int, rank: int) -> int | None:
    """The pid of the worker process with ``RANK=rank`` under a torchrun launcher."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            env = (proc / "environ").read_bytes().split(b"\0")
            status = (proc / "status").read_text()
        except OSError:
            continue
        ppid = next((int(ln.split()[1]) for ln in status.splitlines()
                     if ln.startswith("PPid:")), -1)
        if ppid == launcher_pid and f"RANK={rank}".encode() in env:
            return int(proc.name)
    return None


def test_a_teacher_offloaded_to_disk_scores_the_same(tiny_pair, rollouts, tmp_path):
    """--device-map auto with almost no memory: accelerate puts the teacher's layers on
    disk and loads each in its forward; the statistics equal the whole-model run."""
    args = ["score", rollouts[0], "--teacher", tiny_pair[1], "--teacher-top-k", "8"]
    plain = _tip([*args, "-o", tmp_path / "plain"])
    spread = _tip([*args, "-o", tmp_path / "spread", "--device-map", "auto", "--max-memory",
                   "cpu=20KB"])
    assert plain.returncode == 0 and spread.returncode == 0, spread.stderr[-3000:]
    assert spread.stderr.strip() == ""
    a, b = StageDir.open(tmp_path / "plain"), StageDir.open(tmp_path / "spread")
    assert b.config["device_map"] == "auto"
    for x, y in zip(a.shards, b.shards):
        ta, tb = load_file(str(a.path / x["file"])), load_file(str(b.path / y["file"]))
        for k in ta:
            torch.testing.assert_close(ta[k], tb[k], rtol=0, atol=1e-6, msg=k)


def test_offloading_really_puts_layers_on_disk_and_trains_the_same(tiny_pair, tiny_rollout,
                                                                   tmp_path):
    from tipcli.models.loading import load_model

    spread = load_model(str(tiny_pair[1]), device_map="auto", max_memory="cpu=20KB")
    assert "disk" in set(spread.hf_device_map.values())
    args = ["train", tiny_rollout, "--loss", "rkl-full", "--teacher", tiny_pair[1],
            "--strategy", "all", "--lr", "1e-3", "--train-batch-size", "4", "--max-steps",
            "2", "--train-chunk-size", "16"]
    plain = _tip([*args, "-o", tmp_path / "plain"])
    offloaded = _tip([*args, "-o", tmp_path / "spread", "--device-map", "auto",
                      "--max-memory", "cpu=20KB"])
    assert plain.returncode == 0 and offloaded.returncode == 0, offloaded.stderr[-3000:]
    a = load_file(str(tmp_path / "plain" / "model.safetensors"))
    b = load_file(str(tmp_path / "spread" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
