"""Shared fixtures: tiny models built offline once per session, and stage directories
made from them. Nothing is downloaded."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tipcli.configs import resolve

os.environ.setdefault("TIP_QUIET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

def free_port() -> int:
    """A TCP port on loopback that nothing listens on now (for a launcher's rendezvous)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def kill_every_process_of(marker: str, timeout: float = 60) -> None:
    """SIGKILL every process whose command line holds ``marker`` (a run's output path),
    until none is left: a launcher's workers may outlive a kill of its process group for
    a moment, and a test that reads or copies their output must not race them."""
    import signal
    import time
    from pathlib import Path

    deadline = time.monotonic() + timeout
    while True:
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != os.getpid():
                try:
                    if marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                        found.append(int(entry.name))
                except OSError:  # the process ended meanwhile
                    continue
        if not found:
            return
        for pid in found:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes {found} of {marker} survive SIGKILL")
        time.sleep(0.05)


def interrupt_at_call(monkeypatch, module, name: str, n: int) -> None:
    """``module.name`` raises KeyboardInterrupt (a kill) at its ``n``-th call, running as
    it is before; ``monkeypatch.undo()`` restores it."""
    real, calls = getattr(module, name), {"n": 0}

    def interrupting(*a, **kw):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(module, name, interrupting)


def assert_one_line_error(result, *needles: str, code: int = 2) -> None:
    """A CliRunner result that failed the way tip promises: exit ``code``, one line on
    stderr starting with ``error:`` and holding every needle, no traceback."""
    assert result.exit_code == code, result.output
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error:"), err
    assert "Traceback" not in result.output
    for n in needles:
        assert n in err, err


PROMPTS = ["What is 2+3?", "Say hi.", "Count: 1 2 3", "Name a colour.", "Spell cat.",
           "7*6=?"]


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory) -> tuple[Path, Path]:
    """(student_dir, teacher_dir): random Llama models sharing a character tokenizer,
    with 13 padded output rows beyond the 100-token vocabulary."""
    from tipcli.models.tiny import save_pair

    return save_pair(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def prompts_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "answer": str(i)}) + "\n"
                            for i, p in enumerate(PROMPTS)))
    return path


@pytest.fixture(scope="session")
def tiny_rollout(tiny_pair, prompts_file, tmp_path_factory) -> Path:
    """A rollout directory: 6 prompts x 2 samples, 24 new tokens at most, 3 shards."""
    from tipcli.stages.rollout import RolloutConfig, run_rollout

    out = tmp_path_factory.mktemp("stages") / "rollout"
    return run_rollout(resolve(RolloutConfig, student=str(tiny_pair[0]), prompts=str(prompts_file),
                                     output=str(out), num_samples=2, max_new_tokens=24,
                                     sample_batch_size=2, shard_size=4, seed=0))


@pytest.fixture(scope="session")
def tiny_score(tiny_pair, tiny_rollout, tmp_path_factory) -> Path:
    """A score directory of ``tiny_rollout`` with the teacher's top-8."""
    from tipcli.stages.score import ScoreConfig, run_score

    out = tmp_path_factory.mktemp("stages") / "score"
    return run_score(resolve(ScoreConfig, rollout=str(tiny_rollout), teacher=str(tiny_pair[1]),
                                 output=str(out), teacher_top_k=8, score_batch_size=3,
                                 score_chunk_size=7))


@pytest.fixture(scope="session")
def many_prompts(tmp_path_factory) -> Path:
    """40 prompts with answers: with --sample-batch-size 1 a distill rollout has 3 shards
    (of 16), so several processes share them."""
    path = tmp_path_factory.mktemp("many") / "p.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"What is {i}+{i}?", "answer": str(2 * i)})
                            + "\n" for i in range(40)))
    return path


@pytest.fixture(scope="session")
def bpe_teacher(tmp_path_factory):
    """A tiny random teacher whose tokenizer is a byte-level BPE trained on the prompts and
    on worked additions (the demo task's text, whose tokens it merges)."""
    from tipcli.models.tiny import CHARS, build_bpe_tokenizer, build_model
    from tipcli.tasks.arithmetic import make_prompts

    task = [r["prompt"] + " " + r["solution"] for r in make_prompts(200, seed=3)]
    tok = build_bpe_tokenizer(PROMPTS * 5 + [CHARS] + task, size=400)
    d = tmp_path_factory.mktemp("bpe") / "teacher"
    build_model(tok, hidden=48, layers=3, seed=1).save_pretrained(d)
    tok.save_pretrained(d)
    return d
