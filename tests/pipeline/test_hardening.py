"""Hardening beyond one-line errors: planted pickles never run, a full disk loses nothing
complete, stored settings say what was done, and long work reports progress in logs."""

from __future__ import annotations

import json
import os
import pickle
import re
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_one_line_error
from safetensors.torch import load_file
from typer.testing import CliRunner

from tipcli.cli import app
from tipcli.store.stagedir import StageDir

runner = CliRunner()
REPO = Path(__file__).resolve().parents[2]
TRAIN = ["--strategy", "all", "--lr", "1e-3", "--train-batch-size", "4", "--max-steps", "4",
         "--train-chunk-size", "16", "--save-every", "2"]


class Payload:
    """Unpickling this writes a marker file: proof that a pickle was loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "ran"))


def _plant(directory: Path, marker: Path) -> None:
    for name in ("custom_checkpoint_0.pkl", "custom_checkpoint_1.pkl", "random_states_0.pkl",
                 "optimizer.bin", "scheduler.bin"):
        (directory / name).write_bytes(pickle.dumps(Payload(marker)))
        torch.save({"x": Payload(marker)}, directory / f"{name}.pt")


def test_planted_pickles_in_a_checkpoint_never_run(tiny_score, tmp_path, monkeypatch):
    """Resume from a checkpoint holding planted pickle payloads: nothing is unpickled, and
    the resumed run ends with the weights of an uninterrupted one."""
    import tipcli.trainer.loop as loop

    full, cut, marker = tmp_path / "full", tmp_path / "cut", tmp_path / "marker"
    assert runner.invoke(app, ["train", str(tiny_score), "-o", str(full), *TRAIN]).exit_code == 0
    real = loop.train_step

    def stop_at_third(tr, step, *rest):
        if step == 2:  # after step 2's checkpoint
            raise KeyboardInterrupt
        return real(tr, step, *rest)

    monkeypatch.setattr(loop, "train_step", stop_at_third)
    assert runner.invoke(app, ["train", str(tiny_score), "-o", str(cut), *TRAIN]).exit_code == 130
    monkeypatch.setattr(loop, "train_step", real)
    _plant(cut / "checkpoints" / "step-000002", marker)
    r = runner.invoke(app, ["train", str(tiny_score), "-o", str(cut), *TRAIN, "--resume"])
    assert r.exit_code == 0, r.output
    assert not marker.exists()
    a, b = load_file(str(full / "model.safetensors")), load_file(str(cut / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_no_pickle_loading_in_the_package():
    """No call that unpickles: torch.load, pickle.load(s), accelerate's load_state."""
    pattern = re.compile(r"torch\.load\(|pickle\.loads?\(|\.load_state\(|weights_only=False")
    hits = [f"{p}:{i}" for p in (REPO / "tipcli").rglob("*.py")
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not hits, hits


def _limited(limit_bytes: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
    return apply


def _tip(args, limit=None):
    return subprocess.run([sys.executable, "-m", "tipcli", *map(str, args)], capture_output=True,
                          text=True, env={**os.environ, "TIP_QUIET": "1"}, timeout=300,
                          preexec_fn=_limited(limit) if limit else None)


def test_score_on_a_full_disk_keeps_complete_shards_and_resumes(tiny_pair, tmp_path):
    """Files may not grow past 8 kB (as on a full disk): the second shard (long prompts)
    fails with one line, the first stays, and a re-run without the limit resumes to the
    same bytes as an uninterrupted run."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": t}) + "\n"
                               for t in ("a", "b", "x" * 1500, "y" * 1500)))
    rollout = tmp_path / "r"
    assert _tip(["rollout", "-s", tiny_pair[0], "-p", prompts, "-o", rollout,
                 "--max-new-tokens", "4", "--sample-batch-size", "2", "--shard-size", "2"]
                ).returncode == 0
    args = ["score", rollout, "--teacher", tiny_pair[1], "--teacher-top-k", "4"]
    r = _tip([*args, "-o", tmp_path / "s"], limit=8_000)
    assert r.returncode == 2, r.stderr
    err = r.stderr.strip()
    assert err.startswith("error:") and "File too large" in err and len(err.splitlines()) == 1
    m = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert not m["complete"] and len(m["shards"]) == 1
    assert _tip([*args, "-o", tmp_path / "s"]).returncode == 0
    assert _tip([*args, "-o", tmp_path / "ref"]).returncode == 0
    done, ref = StageDir.open(tmp_path / "s"), StageDir.open(tmp_path / "ref")
    assert [s["sha256"] for s in done.shards] == [s["sha256"] for s in ref.shards]


def test_train_on_a_full_disk_leaves_no_half_checkpoint_and_resumes(tiny_score, tmp_path):
    out = tmp_path / "t"
    args = ["train", tiny_score, "-o", out, *TRAIN]
    r = _tip(args, limit=200_000)  # the weights fit, a checkpoint with AdamW state does not
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().startswith("error:") and "Traceback" not in r.stderr
    assert not list((out / "checkpoints").glob(".step-*")) if (out / "checkpoints").exists() \
        else True
    r = _tip([*args, "--resume"])
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "manifest.json").read_text())["complete"]


def test_read_only_output_is_one_line(tiny_score):
    target = Path("/sys/tip-output-test")
    try:
        target.mkdir()
    except OSError:
        pass
    else:
        target.rmdir()
        pytest.skip("/sys is writable here; no read-only place to write into")
    r = runner.invoke(app, ["select", str(tiny_score), "-o", str(target)])
    assert_one_line_error(r, str(target), "Operation not permitted")


def test_top_k_larger_than_the_vocabulary_is_stored_as_done(tiny_pair, tiny_rollout, tmp_path):
    r = runner.invoke(app, ["score", str(tiny_rollout), "--teacher", str(tiny_pair[1]), "-o",
                            str(tmp_path / "s"), "--teacher-top-k", "1000"])
    assert r.exit_code == 0, r.output
    d = StageDir.open(tmp_path / "s", stage="score")
    assert d.config["teacher_top_k"] == 100 == d.load_shard(0)["teacher_topk_ids"].shape[1]


def test_gguf_quantization_config_in_a_model_dir_trains_and_saves(tiny_pair, tiny_score,
                                                                tmp_path):
    """Some GGUF conversions keep a gguf quantization_config in config.json; the weights
    are plain, so tip drops it and the trained model saves."""
    import shutil

    student = tmp_path / "student"
    shutil.copytree(tiny_pair[0], student)
    cfg = json.loads((student / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gguf"}
    (student / "config.json").write_text(json.dumps(cfg))
    r = runner.invoke(app, ["train", str(tiny_score), "-o", str(tmp_path / "t"), "--student",
                            str(student), *TRAIN[:-2]])
    assert r.exit_code == 0, r.output
    saved = json.loads((tmp_path / "t" / "config.json").read_text())
    assert "quantization_config" not in saved


def test_plain_progress_lines_without_a_terminal(tiny_pair, prompts_file, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TIP_QUIET"}
    r = subprocess.run([sys.executable, "-m", "tipcli", "rollout", "-s", str(tiny_pair[0]), "-p",
                        str(prompts_file), "-o", str(tmp_path / "r"), "--num-samples", "2",
                        "--sample-batch-size", "2", "--max-new-tokens", "4"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = re.findall(r"^rollout: (\d+)/12 \((\d+)%\)", r.stderr, re.M)
    assert len(lines) >= 5 and lines[-1] == ("12", "100"), r.stderr


def test_long_prompts_truncate_keeps_their_end(tiny_pair, tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text(json.dumps({"prompt": "x" * 2100 + "END"}) + "\n")
    r = runner.invoke(app, ["rollout", "-s", str(tiny_pair[0]), "-p", str(p), "-o",
                            str(tmp_path / "r"), "--max-new-tokens", "8", "--long-prompts",
                            "truncate"])
    assert r.exit_code == 0, r.output
    assert "cut to their last 2040 tokens" in r.stderr
    seq = next(StageDir.open(tmp_path / "r").iter_sequences())
    assert seq["prompt_ids"].numel() == 2040


def _kill_when(args, path_glob: str, root: Path) -> subprocess.CompletedProcess:
    """Run tip in a subprocess and kill -9 it as soon as ``root`` holds ``path_glob``."""
    import time

    proc = subprocess.Popen([sys.executable, "-m", "tipcli", *map(str, args)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "TIP_QUIET": "1", "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        if root.is_dir() and any(root.glob(path_glob)):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait()
    return proc


def test_kill_9_while_scoring_resumes_to_the_same_bytes(tiny_pair, prompts_file, tmp_path):
    rollout = tmp_path / "r"
    assert _tip(["rollout", "-s", tiny_pair[0], "-p", prompts_file, "-o", rollout,
                 "--num-samples", "2", "--max-new-tokens", "32", "--sample-batch-size", "2",
                 "--shard-size", "2"]).returncode == 0
    args = ["score", rollout, "--teacher", tiny_pair[1], "--score-batch-size", "1",
            "--score-chunk-size", "1"]
    proc = _kill_when([*args, "-o", tmp_path / "s"], "shard-00001.safetensors", tmp_path / "s")
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not json.loads((tmp_path / "s" / "manifest.json").read_text())["complete"]
    assert _tip([*args, "-o", tmp_path / "s"]).returncode == 0
    assert _tip([*args, "-o", tmp_path / "ref"]).returncode == 0
    done, ref = StageDir.open(tmp_path / "s"), StageDir.open(tmp_path / "ref")
    assert len(done.shards) == 6
    assert [s["sha256"] for s in done.shards] == [s["sha256"] for s in ref.shards]


def test_kill_9_while_training_resumes_to_the_same_weights(tiny_score, tmp_path):
    args = ["train", tiny_score, "--strategy", "all", "--lr", "1e-3", "--train-batch-size",
            "2", "--max-steps", "20", "--train-chunk-size", "16", "--save-every", "2"]
    proc = _kill_when([*args, "-o", tmp_path / "t"], "checkpoints/step-000004",
                      tmp_path / "t")
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert _tip([*args, "-o", tmp_path / "t", "--resume"]).returncode == 0
    assert _tip([*args, "-o", tmp_path / "ref"]).returncode == 0
    a = load_file(str(tmp_path / "t" / "model.safetensors"))
    b = load_file(str(tmp_path / "ref" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(ln)["step"] for ln in (tmp_path / "t" / "metrics.jsonl").open()]
    assert steps == list(range(1, 21))
