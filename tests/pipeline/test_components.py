"""The teacher and student components, the typed records between steps, and the two bugs
found by reading the stages that built them."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tipcli.configs import resolve
from tipcli.engines.hf import HFSampler
from tipcli.models import loading
from tipcli.models.student import Student, recorded_version
from tipcli.models.teacher import ServedTeacher, WholeTeacher, make_teacher, require_in_process
from tipcli.records import RolloutBatch, ScoredBatch
from tipcli.stages.rollout import RolloutConfig, run_rollout
from tipcli.store.stagedir import StageDir


def _counting_loads(monkeypatch) -> list[str]:
    loads: list[str] = []
    real = loading.load_model

    def counting(name, *a, **kw):
        loads.append(str(name))
        return real(name, *a, **kw)

    monkeypatch.setattr(loading, "load_model", counting)
    return loads


def test_a_finished_rollout_builds_no_sampler(tiny_pair, prompts_file, tmp_path, monkeypatch):
    """Run again on a finished directory, rollout returns it without loading the student or
    building a sampler (it used to build one before the check and never close it)."""
    kw = dict(student=str(tiny_pair[0]), prompts=str(prompts_file), output=str(tmp_path / "r"),
              num_samples=1, max_new_tokens=4, seed=0)
    first = run_rollout(resolve(RolloutConfig, **kw))
    loads = _counting_loads(monkeypatch)
    made: list[object] = []
    real_init = HFSampler.__init__
    monkeypatch.setattr(HFSampler, "__init__",
                        lambda self, *a, **k: made.append(self) or real_init(self, *a, **k))
    again = run_rollout(resolve(RolloutConfig, **kw))
    assert again == first and loads == [] and made == []


def test_a_sampler_built_for_a_rollout_is_closed(tiny_pair, prompts_file, tmp_path,
                                                 monkeypatch):
    closed: list[object] = []
    monkeypatch.setattr(HFSampler, "close", lambda self: closed.append(self))
    run_rollout(resolve(RolloutConfig, student=str(tiny_pair[0]), prompts=str(prompts_file),
                        output=str(tmp_path / "r"), num_samples=1, max_new_tokens=4))
    assert len(closed) == 1


def test_held_out_kl_under_vllm_starts_no_second_engine(tiny_pair, prompts_file, tmp_path,
                                                         monkeypatch):
    """--backend vllm --eval-metric kl: the teacher's own samples come from transformers'
    generate on the teacher already in memory, never from a second vLLM engine (one used
    to be started at every evaluation, and never closed)."""
    from tipcli.engines import vllm_engine
    from tipcli.stages.distill import DistillConfig
    from tipcli.stages.heldout import kl

    engines: list[tuple] = []

    class NoEngine:
        def __init__(self, *a, **k):
            engines.append(a)
            raise AssertionError("a second vLLM engine was started")

    monkeypatch.setattr(vllm_engine, "VLLMSampler", NoEngine)
    cfg = resolve(DistillConfig, student=str(tiny_pair[0]), teacher=str(tiny_pair[1]),
                  prompts=str(prompts_file), output=str(tmp_path / "run"),
                  eval_prompts=str(prompts_file), eval_metric="kl", max_new_tokens=4)
    cfg = dataclasses.replace(cfg, sampling=dataclasses.replace(cfg.sampling, backend="vllm"))
    tok = loading.load_tokenizer(str(tiny_pair[0]))
    student = loading.load_model(str(tiny_pair[0]))
    teacher = WholeTeacher(loading.load_model(str(tiny_pair[1])), str(tiny_pair[1]),
                           loading.real_vocab_size(tok))
    # the student's own engine stands in for the loop's (an hf sampler here)
    row = kl(cfg, str(tiny_pair[0]), student, tmp_path / "eval", tok, teacher,
             sampler=HFSampler(student, tok))
    assert engines == [] and row["heldout_rkl"] > 0 and row["heldout_fkl"] > 0
    assert (tmp_path / "run" / "eval-teacher" / "rollout").is_dir()


def test_one_place_chooses_the_teacher(tiny_pair, monkeypatch):
    from fake_vllm import FakeVLLM

    from tipcli.configs import Runtime, Scoring
    from tipcli.dist.processes import Processes

    tok = loading.load_tokenizer(str(tiny_pair[0]))
    server = FakeVLLM(loading.load_model(str(tiny_pair[1])), tok)
    loads = _counting_loads(monkeypatch)
    whole = make_teacher(str(tiny_pair[1]), tok, Runtime(), Processes(), "cpu", torch.float32)
    assert isinstance(whole, WholeTeacher) and whole.in_process and not whole.collective
    assert set(whole.statistics.values()) == {"exact"} and loads == [str(tiny_pair[1])]
    assert make_teacher("ignored", tok, Runtime(), Processes(), "cpu", torch.float32,
                        model=whole) is whole  # a teacher already made passes through
    served = make_teacher("teacher", tok, Runtime(), Processes(), "cpu", torch.float32,
                          scoring=Scoring(teacher_url=server.url, teacher_top_k=8))
    try:
        assert isinstance(served, ServedTeacher) and not served.in_process
        assert served.statistics["rkl"] == "top-k estimate" and len(loads) == 1
        with pytest.raises(Exception, match="served"):
            require_in_process(served, "--loss rkl-full")
    finally:
        served.close()
        server.close()


def test_records_round_trip_through_a_shard(tiny_rollout, tiny_score):
    rd, sd = StageDir.open(tiny_rollout), StageDir.open(tiny_score)
    shard = rd.load_shard(0)
    batch = RolloutBatch.from_tensors(shard, policy_version=3)
    assert batch.num_sequences == shard["response_offsets"].numel() - 1
    assert batch.num_tokens == shard["response_ids"].numel()
    assert batch.tensors().keys() == shard.keys()
    assert all(torch.equal(batch.tensors()[k], shard[k]) for k in shard)
    scored_shard = sd.load_shard(0)
    stats = {k: scored_shard[k] for k in ("student_logprob", "teacher_logprob",
                                         "student_entropy", "rkl", "fkl", "jsd",
                                         "teacher_entropy", "teacher_topk_ids",
                                         "teacher_topk_logprobs")}
    scored = ScoredBatch.from_statistics(batch, stats)
    assert scored.policy_version == 3 and scored.statistics().keys() == stats.keys()
    written = scored.tensors()
    assert written.keys() == scored_shard.keys()
    assert all(torch.equal(written[k], scored_shard[k]) for k in written)
    with pytest.raises(ValueError, match="not a statistic"):
        ScoredBatch.from_statistics(batch, {**stats, "typo": stats["rkl"]})


def test_policy_versions_are_recorded(tiny_pair, prompts_file, tmp_path):
    out = run_rollout(resolve(RolloutConfig, student=str(tiny_pair[0]),
                              prompts=str(prompts_file), output=str(tmp_path / "r"),
                              num_samples=1, max_new_tokens=4), policy_version=5)
    d = StageDir.open(out)
    assert d.policy_version == 5 and {s["policy_version"] for s in d.shards} == {5}
    assert recorded_version(tiny_pair[0]) == 0  # a model directory tip did not train


def test_the_student_trains_every_weight_and_saves_a_loadable_directory(tiny_pair, tmp_path):
    tok = loading.load_tokenizer(str(tiny_pair[0]))
    student = Student.load(str(tiny_pair[0]), "cpu", torch.float32)
    trainable = Student.trainable(student.model)
    assert len(trainable) == len(list(student.model.parameters()))
    student.save(tmp_path / "out", tok)
    again = loading.load_model(str(tmp_path / "out"))
    for (k, a), (_, b) in zip(student.model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k


def _flipped_copy(score, dest):
    """A copy of a score directory with one byte of its first shard changed, its size kept."""
    import shutil

    shutil.copytree(score, dest)
    shard = dest / "shard-00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0x01  # the last byte of the tensor data, not the header
    shard.write_bytes(bytes(data))
    return dest


def test_shards_are_hashed_on_request_not_on_every_read(tiny_score, tmp_path):
    """A shard's checksum is computed when it is written; reading checks its size, and the
    checksum only with --verify-checksums. A changed byte that keeps the size is read
    without the flag and refused with it."""
    from tipcli.configs import SelectConfig
    from tipcli.errors import TipError
    from tipcli.stages.select import run_select

    bad = _flipped_copy(tiny_score, tmp_path / "bad")
    d = StageDir.open(bad, stage="score")
    assert all(isinstance(s["bytes"], int) for s in d.shards)
    d.load_shard(0)  # size matches: read without hashing
    with pytest.raises(TipError, match="does not match the checksum"):
        StageDir.open(bad, stage="score", verify=True).load_shard(0)
    with pytest.raises(TipError, match="does not match the checksum"):
        run_select(resolve(SelectConfig, score=str(bad), output=str(tmp_path / "s"),
                           verify_checksums=True))


def test_a_resume_may_change_verify_checksums(tiny_pair, tiny_rollout, tmp_path):
    """--verify-checksums changes how a run reads, not what it writes: a finished score
    run asked again with it is the same run, not one refused for other settings."""
    from tipcli.configs import ScoreConfig
    from tipcli.stages.score import run_score

    kw = dict(rollout=str(tiny_rollout), teacher=str(tiny_pair[1]),
              output=str(tmp_path / "sc"), device="cpu")
    first = run_score(resolve(ScoreConfig, **kw))
    again = run_score(resolve(ScoreConfig, **kw, verify_checksums=True))
    assert again == first


def test_a_setting_added_since_a_directory_was_written_reads_as_its_default(tiny_score,
                                                                            tmp_path):
    """Manifest readers ask StageDir.setting: the stored value, or, for a setting the stage
    gained after the directory was written, its default (no .get(name, default) calls)."""
    import json
    import shutil

    d = tmp_path / "old"
    shutil.copytree(tiny_score, d)
    m = json.loads((d / "manifest.json").read_text())
    stored = m["config"]["teacher_top_k"]
    del m["config"]["score_temperature"]
    (d / "manifest.json").write_text(json.dumps(m))
    old = StageDir.open(d, stage="score")
    assert old.setting("teacher_top_k") == stored
    assert old.setting("score_temperature") == 1.0
    with pytest.raises(KeyError):
        old.setting("no_such_setting")
