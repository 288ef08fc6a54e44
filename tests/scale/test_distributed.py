"""`tip distill` under a launcher (torchrun, 2 CPU processes over gloo): the same run as one
process, a killed process resumed, two "nodes" on this machine; devices, the process
group's timeout, training resumed on another number of processes."""

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

from tipcli.dist.processes import visible_device
from tipcli.errors import TipError
from tipcli.store.stagedir import StageDir

ENV = {**os.environ, "TIP_QUIET": "1", "OMP_NUM_THREADS": "1"}


def torchrun(procs: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs),
            *extra]


def tip(args, procs: int = 1, env=None, launcher=None) -> subprocess.CompletedProcess:
    head = launcher or (torchrun(procs, "--master_port", str(free_port())) if procs > 1
                        else [sys.executable])
    return subprocess.run([*head, "-m", "tipcli", *map(str, args)], capture_output=True,
                          text=True, env=env or ENV, timeout=900)


def distill_args(pair, prompts, out, batch: int, *extra) -> list:
    return ["distill", "-s", pair[0], "-t", pair[1], "-p", prompts, "-o", out,
            "--iterations", "2", "--num-samples", "1", "--max-new-tokens", "8",
            "--max-steps", "2", "--teacher-top-k", "8", "--lr", "1e-3", "--group-size", "4",
            "--sample-batch-size", "1", "--train-batch-size", str(batch), *extra]


def files(run: Path) -> set[str]:
    """The run's files; an optimizer state (``state/``) as one entry, whose files differ
    between a whole and a sharded (--fsdp) AdamW."""
    return {str(p.relative_to(run)).split("/state/")[0] + ("/state" if "/state/" in str(p)
                                                          else "")
            for p in run.rglob("*") if p.is_file() and not p.name.startswith(".")}


def assert_same_run(one: Path, other: Path) -> None:
    """``other`` is ``one`` up to float rounding: the same files, iteration 0's rollout
    byte for byte, every later rollout the same tokens, the final student within 1e-5."""
    assert files(one) == files(other)
    first = [s["sha256"] for s in StageDir.open(one / "iter-000" / "rollout").shards]
    assert first == [s["sha256"] for s in StageDir.open(other / "iter-000" / "rollout").shards]
    for a, b in zip(StageDir.open(one / "iter-001" / "rollout").iter_shards(),
                    StageDir.open(other / "iter-001" / "rollout").iter_shards()):
        assert torch.equal(a["response_ids"], b["response_ids"])
        torch.testing.assert_close(a["rollout_logprob"], b["rollout_logprob"], rtol=0,
                                   atol=1e-5)
    wa, wb = (load_file(str(r / "iter-001" / "train" / "model.safetensors")) for r in (one, other))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-5, msg=k)


@pytest.fixture(scope="module")
def one_process_run(tiny_pair, many_prompts, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist") / "one"
    r = tip(distill_args(tiny_pair, many_prompts, out, 4, "--eval-prompts", many_prompts,
                         "--eval-max-prompts", "20"))
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_two_processes_distill_what_one_does(tiny_pair, many_prompts, one_process_run,
                                            tmp_path):
    """Every stage of every iteration over 2 processes (rollout, score and eval sharing
    their shards, select once, DDP training with half the per-process batch): the run
    directory and the student of one process."""
    out = tmp_path / "two"
    r = tip(distill_args(tiny_pair, many_prompts, out, 2, "--eval-prompts", many_prompts,
                         "--eval-max-prompts", "20"), procs=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines() == [str(out)]
    assert_same_run(one_process_run, out)
    for stage in ("rollout", "score", "eval"):
        assert StageDir.open(out / "iter-000" / stage).manifest["summary"]["num_processes"] == 2
    assert len(StageDir.open(out / "iter-000" / "rollout").shards) == 3
    one, two = (json.loads((run / "manifest.json").read_text())["summary"]["history"]
                for run in (one_process_run, out))
    assert [h.get("accuracy") for h in one] == [h.get("accuracy") for h in two]
    assert r.stderr.count("iteration 1/2:") == 1  # one line per iteration, from one process


def test_two_processes_with_fsdp(tiny_pair, many_prompts, one_process_run, tmp_path):
    """--fsdp shards the student over both processes; each gets the whole trained student
    back in memory for the next iteration's sampling."""
    out = tmp_path / "fsdp"
    r = tip(distill_args(tiny_pair, many_prompts, out, 2, "--fsdp"), procs=2)
    assert r.returncode == 0, r.stderr[-3000:]
    # iteration 2 continued iteration 1's AdamW from its shards; its own are kept at the end
    assert list((out / "iter-001" / "train" / "state" / "sharded").glob("*.safetensors"))
    assert not (out / "iter-000" / "train" / "state").exists()
    wa, wb = (load_file(str(run / "iter-001" / "train" / "model.safetensors"))
              for run in (one_process_run, out))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-5, msg=k)


def test_kill_9_of_one_process_mid_iteration_resumes(tiny_pair, many_prompts,
                                                     one_process_run, tmp_path):
    """SIGKILL of one of two processes once iteration 0's rollout is written: the launcher
    stops the run; the same command resumes it to the run of one process."""
    out = tmp_path / "killed"
    args = distill_args(tiny_pair, many_prompts, out, 2, "--eval-prompts", many_prompts,
                        "--eval-max-prompts", "20")
    proc = subprocess.Popen([*torchrun(2, "--master_port", str(free_port())), "-m", "tipcli",
                             *map(str, args)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=ENV, start_new_session=True)
    marker, deadline, killed = out / "iter-000" / "score", time.monotonic() + 600, False
    while proc.poll() is None and time.monotonic() < deadline:
        if marker.is_dir():
            workers = subprocess.run(["pgrep", "-f", "-P", str(proc.pid), "tipcli"],
                                     capture_output=True, text=True).stdout.split()
            if workers:
                os.kill(int(workers[-1]), signal.SIGKILL)
                killed = True
                break
        time.sleep(0.05)
    proc.wait(timeout=300)
    kill_every_process_of(str(out))  # the other worker too, before the resume starts
    assert killed and proc.returncode != 0
    r = tip(args, procs=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_run(one_process_run, out)


def test_killed_in_the_second_iteration_resumes_on_two_processes(tiny_pair, many_prompts,
                                                                one_process_run, tmp_path):
    """One process dies (os._exit) right after iteration 2's first checkpoint, which holds
    the AdamW state and schedule continued from iteration 1; the run resumed on 2 processes
    (half the per-process batch: the same global batch) ends at the uninterrupted run's
    weights."""
    out = tmp_path / "killed"
    args = distill_args(tiny_pair, many_prompts, out, 4, "--eval-prompts", many_prompts,
                        "--eval-max-prompts", "20")
    script = ("import os, sys\n"
              "import tipcli.trainer.loop as loop\n"
              "real = loop.save_checkpoint\n"
              "def save_then_die(tr):\n"
              "    path = real(tr)\n"
              "    if 'iter-001' in str(tr.cfg.output):\n"
              "        os._exit(9)\n"
              "    return path\n"
              "loop.save_checkpoint = save_then_die\n"
              "from tipcli.cli import main\n"
              f"sys.argv = ['tip', *{[str(a) for a in args]!r}]\n"
              "main()\n")
    died = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=ENV, timeout=900)
    assert died.returncode == 9, died.stderr[-3000:]
    second = out / "iter-001" / "train"
    assert [p.name for p in (second / "checkpoints").iterdir()] == ["step-000001"]
    assert (out / "iter-000" / "train" / "state").is_dir()  # what iteration 2 continues
    r = tip(distill_args(tiny_pair, many_prompts, out, 2, "--eval-prompts", many_prompts,
                         "--eval-max-prompts", "20"), procs=2)
    assert r.returncode == 0, r.stderr[:3000]
    assert "iteration 1/2 (finished earlier)" in r.stderr
    wa, wb = (load_file(str(run / "iter-001" / "train" / "model.safetensors"))
              for run in (one_process_run, out))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-5, msg=k)
    lrs = [json.loads(line)["lr"] for run in (one_process_run, out)
           for line in (run / "iter-001" / "train" / "metrics.jsonl").read_text().splitlines()]
    assert lrs[:2] == lrs[2:]  # the schedule resumed where it was


def test_lora_distill_on_two_processes_ends_where_one_does(tiny_pair, many_prompts,
                                                           tmp_path):
    """--lora-r 8 on 2 processes, with DDP over the adapters (the base frozen on each), with
    --fsdp (the frozen base sharded beside the adapters) and with --shard-teacher, and on
    one at the same global batch: the same adapters (1e-4); under --fsdp the optimizer
    state of the adapters alone."""
    runs = {}
    for name, procs, batch, extra in (("one", 1, 4, ()), ("ddp", 2, 2, ()),
                                      ("fsdp", 2, 2, ("--fsdp",)),
                                      ("shard-teacher", 2, 2, ("--shard-teacher",))):
        out = tmp_path / name
        r = tip(distill_args(tiny_pair, many_prompts, out, batch, "--lora-r", "8", *extra),
                procs=procs)
        assert r.returncode == 0, r.stderr[-3000:]
        runs[name] = load_file(str(out / "iter-001" / "train" / "adapter_model.safetensors"))
    assert runs["one"].keys() == runs["ddp"].keys() == runs["fsdp"].keys()
    assert all("lora_" in k for k in runs["one"])
    for name in ("ddp", "fsdp", "shard-teacher"):
        for k in runs["one"]:
            torch.testing.assert_close(runs["one"][k], runs[name][k], rtol=0, atol=1e-4,
                                       msg=f"{name}: {k}")
    start = load_file(str(tmp_path / "one" / "iter-000" / "train" / "adapter_model.safetensors"))
    assert any(not torch.equal(start[k], runs["one"][k]) for k in start)
    # AdamW's moments of the adapters only: as many elements as the adapters, twice
    shards = list((tmp_path / "fsdp" / "iter-001" / "train" / "state" / "sharded")
                  .glob("*.safetensors"))
    held = [load_file(str(f)) for f in shards]
    assert held and all(k.startswith("optim.") and "lora_" in k for h in held for k in h)


@pytest.mark.slow
def test_two_nodes_on_this_machine(tiny_pair, many_prompts, one_process_run, tmp_path):
    """Two torchrun invocations joined by a c10d rendezvous on 127.0.0.1, one process
    each, as two nodes would be (`make test-multinode`): the run of one process."""
    out, port = tmp_path / "nodes", free_port()
    args = [*map(str, distill_args(tiny_pair, many_prompts, out, 2))]
    nodes = [subprocess.Popen(
        [*torchrun(1, "--nnodes", "2", "--node_rank", str(rank), "--rdzv-backend", "c10d",
                   "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "tip-test"),
         "-m", "tipcli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=ENV) for rank in (0, 1)]
    results = [n.communicate(timeout=900) for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], results[0][1][-2000:] + results[1][1][-2000:]
    single = tmp_path / "single"
    r = tip(distill_args(tiny_pair, many_prompts, single, 4))
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_run(single, out)


def on_two_nodes(args_of, tmp_path) -> list[tuple[int, str]]:
    """(exit code, stderr) of two torchrun "nodes" of one process each, joined by a c10d
    rendezvous on 127.0.0.1; node r runs ``tip *args_of(r)``."""
    port = free_port()
    nodes = [subprocess.Popen(
        [*torchrun(1, "--nnodes", "2", "--node_rank", str(rank), "--rdzv-backend", "c10d",
                   "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "tip-agree"),
         "-m", "tipcli", *map(str, args_of(rank))], stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True, env=ENV, cwd=tmp_path) for rank in (0, 1)]
    errs = [n.communicate(timeout=600)[1] for n in nodes]
    return [(n.returncode, err) for n, err in zip(nodes, errs)]


@pytest.mark.parametrize("stage", ["rollout", "train"])
def test_nodes_launched_with_other_settings_are_refused(tiny_pair, prompts_file, tiny_score,
                                                        tmp_path, stage):
    """Two nodes started with --seed 0 and --seed 1 (train: two learning rates): every
    process refuses in one line naming the setting and both values; nothing is written."""
    out = tmp_path / "o"
    flag, values = ("--seed", ["0", "1"]) if stage == "rollout" else ("--lr", ["0.001", "0.002"])
    head = ["rollout", "-s", tiny_pair[0], "-p", prompts_file, "--max-new-tokens", "4"] \
        if stage == "rollout" else ["train", tiny_score, "--strategy", "all", "--max-steps",
                                    "2", "--train-batch-size", "2", "--train-chunk-size", "16"]
    results = on_two_nodes(lambda r: [*head, "-o", out, flag, values[r]], tmp_path)
    want = (f"error: process 1 of this launch resolved other settings than process 0: "
            f"{flag} {values[0]} on process 0, {values[1]} on process 1; start every process")
    for code, err in results:
        assert code != 0 and want in err, err[-2000:]
        assert sum(ln.startswith("error:") for ln in err.splitlines()) == 1, err[-2000:]
        assert "tipcli/" not in err  # no traceback of tip's own
    assert not out.exists()


def test_a_process_takes_its_entry_of_cuda_visible_devices():
    """Under Slurm or Kubernetes the job's GPUs are a list: local rank r takes entry r,
    never the physical GPU numbered r."""
    assert [visible_device(r, "4,5,6,7") for r in range(4)] == ["4", "5", "6", "7"]
    assert visible_device(1, "") == "1" and visible_device(0, "GPU-a1, GPU-b2") == "GPU-a1"
    with pytest.raises(TipError, match="lists 2; launch at most 2"):
        visible_device(2, "0,1")


def test_cpu_only_vllm_settings_stay_off_on_a_gpu():
    from tipcli.engines.vllm_engine import engine_settings

    gpu, cpu = engine_settings(True, 0.5), engine_settings(False, 0.5)
    assert gpu == {"gpu_memory_utilization": 0.5}
    assert cpu["enforce_eager"] is True and cpu["enable_chunked_prefill"] is False


WAIT = """
import sys, time
from tipcli.dist.processes import processes
procs = processes("cpu", timeout_minutes=float(sys.argv[1]))
if procs.rank == 0:
    time.sleep(float(sys.argv[2]))   # a long generation on one process
procs.barrier()                       # the other waits here
print(f"through {procs.rank}", flush=True)
"""


@pytest.mark.parametrize("minutes,ok", [(0.5, True), (0.05, False)])
def test_dist_timeout_is_the_process_groups(tmp_path, minutes, ok):
    """A process waiting at a barrier 8 s for another is not killed under a 30 s
    --dist-timeout, and is under a 3 s one: the setting reaches the process group."""
    script = tmp_path / "wait.py"
    script.write_text(WAIT)
    r = subprocess.run([*torchrun(2, "--master_port", str(free_port())), str(script),
                        str(minutes), "8"], capture_output=True, text=True, env=ENV,
                       timeout=300)
    assert (r.returncode == 0) == ok, r.stderr[-2000:]
    if ok:  # both processes got through (their lines may interleave)
        assert r.stdout.count("through") == 2


def test_device_map_is_refused_under_a_launcher(tiny_pair, many_prompts, tmp_path):
    r = tip(distill_args(tiny_pair, many_prompts, tmp_path / "o", 2, "--device-map", "auto"),
            procs=2)
    assert r.returncode != 0
    assert "error: --device-map spreads one copy of the teacher" in r.stderr
    assert "tipcli/" not in r.stderr  # torchrun reports the exit; no traceback of tip's own


def test_device_map_spreads_the_teacher_in_one_process(tiny_pair, many_prompts, tmp_path,
                                                       monkeypatch):
    """In one process --device-map reaches the teacher's loading."""
    import tipcli.models.loading as loading_mod
    import tipcli.stages.distill as distill_mod
    from tipcli.configs import DistillConfig, resolve

    seen = []
    real = loading_mod.load_model  # where every model is loaded

    def spy(name, *args, **kw):
        seen.append((name, args[3:] if len(args) > 3 else ()))
        return real(name, *args, **kw)

    monkeypatch.setattr(loading_mod, "load_model", spy)
    cfg = resolve(DistillConfig, student=str(tiny_pair[0]), teacher=str(tiny_pair[1]),
                  prompts=str(many_prompts), output=str(tmp_path / "o"), iterations=1,
                  num_samples=1, max_new_tokens=4, max_steps=1, device="cpu",
                  device_map="sequential", prompts_per_iteration=4, train_batch_size=2)
    distill_mod.run_distill(cfg)
    assert (str(tiny_pair[1]), ("sequential", "")) in seen


def kill_at_first_checkpoint(args: list, out) -> None:
    """``tip ARGS`` on 2 processes, every one of them killed with SIGKILL once a checkpoint
    is complete under ``out`` (or left to finish, if it ends first)."""
    proc = subprocess.Popen([*torchrun(2, "--master_port", str(free_port())), "-m", "tipcli",
                             *map(str, args)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV,
                            start_new_session=True)
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        if out.is_dir() and list((out / "checkpoints").glob("step-*/checkpoint.json")):
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait(timeout=60)
    kill_every_process_of(str(out))  # its workers too, before reading their output


def train_args(score, out, batch: int, *extra) -> list:
    return ["train", score, "-o", out, "--strategy", "all", "--max-steps", "6",
            "--save-every", "2", "--lr", "1e-3", "--train-chunk-size", "16",
            "--train-batch-size", str(batch), "--shuffle", *extra]


@pytest.mark.parametrize("extra", [(), ("--lora-r", "8"), ("--lora-r", "8", "--fsdp")],
                         ids=["full", "lora", "lora-fsdp"])
def test_train_resumed_on_one_process_equals_two(tiny_score, tmp_path, extra):
    """A run saved by 2 processes (2 sequences each) resumes on 1 process (4 sequences):
    the same global batch, so the same steps; another global batch is refused. A LoRA run's
    checkpoint (the adapters and their AdamW state; under --fsdp their shards) resumes the
    same way."""
    whole = tmp_path / "whole"
    assert tip(train_args(tiny_score, whole, 2, *extra), procs=2).returncode == 0
    out = tmp_path / "t"
    kill_at_first_checkpoint(train_args(tiny_score, out, 2, *extra), out)
    if json.loads((out / "manifest.json").read_text())["complete"]:
        pytest.skip("the run finished before it could be killed")
    refused = tip(train_args(tiny_score, out, 3, "--resume", *extra))
    assert refused.returncode == 2
    assert "with 4 sequences a step" in refused.stderr and "would take 3" in refused.stderr
    r = tip(train_args(tiny_score, out, 4, "--resume", *extra))
    assert r.returncode == 0, r.stderr[-3000:]
    weights = "adapter_model.safetensors" if extra else "model.safetensors"
    wa, wb = (load_file(str(d / weights)) for d in (whole, out))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-5, msg=k)


@pytest.mark.parametrize("extra", [(), ("--shard-teacher",)], ids=["whole", "shard-teacher"])
def test_cross_tokenizer_distill_on_two_processes_ends_where_one_does(tiny_pair, bpe_teacher,
                                                                      many_prompts, tmp_path,
                                                                      extra):
    """A teacher with another tokenizer, whole on each process or sharded over them: 2
    processes end where 1 does at the same global batch (1e-4), the aligned scores equal."""
    s1, s2 = one_and_two_processes(
        lambda out, batch, more: distill_args((tiny_pair[0], bpe_teacher), many_prompts, out,
                                              batch, "--loss", "rkl-sampled", *more),
        tmp_path, extra)
    assert s1.manifest["summary"]["statistics"]["rkl"] == "aligned estimate"


def one_and_two_processes(args_of, tmp_path, extra) -> tuple[StageDir, StageDir]:
    """The run ``args_of(out, per-process batch, extra flags)`` on 1 process and on 2 (with
    ``extra``) at the same global batch: the final weights within 1e-4, iteration 0's
    teacher log-probs and rkl within 1e-5; (its score on 1, on 2)."""
    runs = {}
    for procs, batch in ((1, 4), (2, 2)):
        out = tmp_path / f"p{procs}"
        r = tip(args_of(out, batch, extra if procs > 1 else ()), procs=procs)
        assert r.returncode == 0, r.stderr[-3000:]
        runs[procs] = out
    a, b = (load_file(str(runs[p] / "iter-001" / "train" / "model.safetensors")) for p in (1, 2))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-4, msg=k)
    s1, s2 = (StageDir.open(runs[p] / "iter-000" / "score") for p in (1, 2))
    for i in range(len(s1.shards)):
        x, y = s1.load_shard(i), s2.load_shard(i)
        for name in ("teacher_logprob", "rkl"):
            torch.testing.assert_close(x[name], y[name], rtol=0, atol=1e-5, msg=name)
    return s1, s2


@pytest.mark.parametrize("extra", [(), ("--shard-teacher",)], ids=["whole", "shard-teacher"])
def test_several_teachers_distill_on_two_processes_ends_where_one_does(tiny_pair, bpe_teacher,
                                                                       many_prompts, tmp_path,
                                                                       extra):
    """Two teachers (one of another tokenizer), prompts routed by their field, each whole
    on every process or sharded over them: 2 processes end where 1 does at the same global
    batch (1e-4), the routed scores equal."""
    routed = tmp_path / "routed.jsonl"
    # in blocks: some shards, and so some processes' batches, hold one teacher's only
    routed.write_text("".join(json.dumps({**json.loads(line), "teacher": "ab"[i >= 20]}) + "\n"
                              for i, line in enumerate(many_prompts.read_text().splitlines())))

    def args_of(out, batch, more):
        args = distill_args(tiny_pair, routed, out, batch, *more)
        at = args.index("-t")
        args[at:at + 2] = ["-t", f"a={tiny_pair[1]}", "-t", f"b={bpe_teacher}"]
        return args

    s1, s2 = one_and_two_processes(args_of, tmp_path, extra)
    assert s1.manifest["summary"]["teachers"] == s2.manifest["summary"]["teachers"]
    for i in range(len(s1.shards)):
        assert torch.equal(s1.load_shard(i)["teacher_route"], s2.load_shard(i)["teacher_route"])
