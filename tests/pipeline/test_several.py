"""Several teachers (--teacher NAME=MODEL repeated): each response is scored by the teacher
its prompt names, equal to that teacher's own score of it; a prompt naming an unknown
teacher, or none, is refused before anything is written; selection groups never mix
teachers; a two-teacher tip distill runs two iterations."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import PROMPTS, assert_one_line_error
from typer.testing import CliRunner

from tipcli.cli import app
from tipcli.configs import ScoreConfig, resolve
from tipcli.stages.score import run_score
from tipcli.store.stagedir import StageDir, split_sequences

runner = CliRunner()


@pytest.fixture(scope="module")
def routed(tiny_pair, tmp_path_factory):
    """(prompts routed a, b, a, ..., a rollout of them, a second teacher of the student's
    tokenizer)."""
    from tipcli.models.loading import load_tokenizer
    from tipcli.models.tiny import build_model
    from tipcli.stages.rollout import RolloutConfig, run_rollout

    d = tmp_path_factory.mktemp("several")
    prompts = d / "routed.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p, "answer": str(i),
                                           "teacher": "ab"[i % 2], "expert": "ba"[i % 2]})
                               + "\n" for i, p in enumerate(PROMPTS)))
    tok = load_tokenizer(str(tiny_pair[1]))
    second = d / "teacher-b"
    build_model(tok, seed=7, vocab_pad=13).save_pretrained(second)
    tok.save_pretrained(second)
    rollout = run_rollout(resolve(RolloutConfig, student=str(tiny_pair[0]), prompts=str(prompts),
                                  output=str(d / "rollout"), num_samples=2, max_new_tokens=16,
                                  sample_batch_size=2, shard_size=4, seed=0))
    return prompts, rollout, second


def score(rollout, out, teacher, **kw):
    return run_score(resolve(ScoreConfig, rollout=str(rollout), teacher=teacher,
                             output=str(out), teacher_top_k=8, score_batch_size=3,
                             score_chunk_size=7, **kw))


def sequences(d):
    s = StageDir.open(d)
    return [seq for i in range(len(s.shards)) for seq in split_sequences(s.load_shard(i))]


def check_routed(got, alone: dict[str, list], route_of: list[str], names: list[str]):
    """Each sequence of ``got`` equals the score of its teacher alone (1e-6)."""
    for n, seq in enumerate(got):
        teacher = route_of[int(seq["prompt_index"])]
        want = alone[teacher][n]
        assert bool((seq["teacher_route"] == names.index(teacher)).all())
        for k in ("teacher_logprob", "student_logprob", "student_entropy", "rkl", "fkl", "jsd",
                  "teacher_topk_logprobs"):
            if k in want:
                torch.testing.assert_close(seq[k], want[k], rtol=0, atol=1e-6, msg=k)


def routed_and_alone(rollout, a, b, tmp_path):
    """The score by teachers a and b routed, checked against each teacher's own score;
    (that score, the scores alone)."""
    got = score(rollout, tmp_path / "both", [f"a={a}", f"b={b}"])
    alone = {"a": sequences(score(rollout, tmp_path / "a", str(a))),
             "b": sequences(score(rollout, tmp_path / "b", str(b)))}
    check_routed(sequences(got), alone, ["ab"[i % 2] for i in range(len(PROMPTS))], ["a", "b"])
    return got, alone


def test_each_response_is_scored_by_its_prompts_teacher(tiny_pair, routed, tmp_path):
    prompts, rollout, second = routed
    got, alone = routed_and_alone(rollout, tiny_pair[1], second, tmp_path)
    m = StageDir.open(got).manifest
    assert list(m["models"]["teacher"]["teachers"]) == ["a", "b"]
    assert m["models"]["teacher"]["field"] == "teacher"
    counts = {n: t["tokens"] for n, t in m["summary"]["teachers"].items()}
    total = sum(int(s["response_mask"].numel()) for s in sequences(got))
    assert sum(counts.values()) == total and min(counts.values()) > 0
    assert m["summary"]["statistics"]["rkl"] == "exact"
    # through the command line, routed by another field (--teacher-field)
    r = runner.invoke(app, ["score", str(rollout), "-t", f"a={tiny_pair[1]}", "-t",
                            f"b={second}", "--teacher-field", "expert", "--teacher-top-k", "8",
                            "--score-batch-size", "3", "-o", str(tmp_path / "expert")])
    assert r.exit_code == 0, r.output
    check_routed(sequences(tmp_path / "expert"), alone, ["ba"[i % 2] for i in
                                                          range(len(PROMPTS))], ["a", "b"])


def test_a_teacher_of_another_tokenizer_among_several(tiny_pair, routed, bpe_teacher,
                                                      tmp_path):
    _, rollout, _ = routed
    got, _ = routed_and_alone(rollout, tiny_pair[1], bpe_teacher, tmp_path)
    m = StageDir.open(got).manifest
    assert m["summary"]["statistics"]["rkl"] == "mixed estimate"
    assert m["summary"]["statistics"]["teacher_entropy"] == "absent"
    assert m["summary"]["teachers"]["a"]["statistics"]["rkl"] == "exact"
    assert m["summary"]["teachers"]["b"]["statistics"]["rkl"] == "aligned estimate"
    assert "teacher_entropy" not in sequences(got)[0]


def test_unknown_or_missing_teachers_are_refused_before_writing(tiny_pair, routed,
                                                                tiny_rollout, tmp_path):
    _, rollout, second = routed
    both = ["-t", f"a={tiny_pair[1]}", "-t", f"c={second}"]
    r = runner.invoke(app, ["score", str(rollout), *both, "-o", str(tmp_path / "x")])
    assert_one_line_error(r, "names teacher 'b'", "none of --teacher a, c")
    assert not (tmp_path / "x").exists()
    r = runner.invoke(app, ["score", str(tiny_rollout), "-t", f"a={tiny_pair[1]}", "-t",
                            f"b={second}", "-o", str(tmp_path / "y")])
    assert_one_line_error(r, "names no teacher in its 'teacher' field")
    assert not (tmp_path / "y").exists()
    r = runner.invoke(app, ["score", str(rollout), "-t", f"a={tiny_pair[1]}", "-t",
                            str(second), "-o", str(tmp_path / "z")])
    assert_one_line_error(r, "each NAME=MODEL")
    r = runner.invoke(app, ["score", str(rollout), "-t", f"a={tiny_pair[1]}", "-t",
                            f"a={second}", "-o", str(tmp_path / "z")])
    assert_one_line_error(r, "names a twice")
    assert not (tmp_path / "z").exists()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"teacher": [f"a={tiny_pair[1]}", 3]}))
    r = runner.invoke(app, ["score", str(rollout), "--config", str(bad), "-o",
                            str(tmp_path / "z")])
    assert_one_line_error(r, "--teacher must be a string or a list of strings")
    r = runner.invoke(app, ["score", str(rollout), *both, "--teacher-at-a-time",
                            "--shard-teacher", "-o", str(tmp_path / "z")])
    assert_one_line_error(r, "--teacher-at-a-time", "--shard-teacher", "choose one")
    r = runner.invoke(app, ["score", str(rollout), *both, "--teacher-url",
                            "d=http://127.0.0.1:9", "-o", str(tmp_path / "z")])
    assert_one_line_error(r, "names no teacher of --teacher (a, c)")
    assert not (tmp_path / "z").exists()


def test_several_teachers_from_a_settings_file(tiny_pair, routed, tmp_path):
    _, rollout, second = routed
    settings = tmp_path / "s.toml"
    settings.write_text(f'teacher = ["a={tiny_pair[1]}", "b={second}"]\nteacher_top_k = 8\n')
    r = runner.invoke(app, ["score", str(rollout), "--config", str(settings), "-o",
                            str(tmp_path / "f")])
    assert r.exit_code == 0, r.output
    m = StageDir.open(tmp_path / "f").manifest
    assert m["config"]["teacher"] == [f"a={tiny_pair[1]}", f"b={second}"]
    assert list(m["models"]["teacher"]["teachers"]) == ["a", "b"]
    # the manifest is a settings file for the same command: the same run, complete
    r = runner.invoke(app, ["score", str(rollout), "--config", str(tmp_path / "f" /
                                                                  "manifest.json"),
                            "-o", str(tmp_path / "f")])
    assert r.exit_code == 0, r.output


def test_selection_groups_never_mix_teachers(tiny_pair, routed, tmp_path):
    """With --normalize rank and one group as large as the run, each token's h is its
    entropy's mid-rank among its own teacher's tokens alone."""
    _, rollout, second = routed
    s = score(rollout, tmp_path / "s", [f"a={tiny_pair[1]}", f"b={second}"])
    r = runner.invoke(app, ["select", str(s), "--normalize", "rank", "--group-size", "1000",
                            "-o", str(tmp_path / "sel")])
    assert r.exit_code == 0, r.output
    sel = StageDir.open(tmp_path / "sel")
    h = torch.cat([sel.load_shard(i)["h"] for i in range(len(sel.shards))])
    shards = StageDir.open(s)
    route = torch.cat([shards.load_shard(i)["teacher_route"] for i in range(len(shards.shards))])
    ent = torch.cat([shards.load_shard(i)["student_entropy"] for i in range(len(shards.shards))])
    cand = torch.cat([shards.load_shard(i)["response_mask"] for i in range(len(shards.shards))])
    for t in (0, 1):
        mine = (route == t) & cand.bool()
        e = ent[mine]
        below = (e[None, :] < e[:, None]).sum(1).double()
        ties = (e[None, :] == e[:, None]).sum(1).double()
        want = (below + (ties - 1) / 2) / (e.numel() - 1)
        torch.testing.assert_close(h[mine].double(), want, rtol=0, atol=1e-6)
    assert len(sel.manifest["summary"]["thresholds"]["tau_h_per_group"]) == 2
    # the report: one quadrant table per teacher, of its tokens alone
    r = runner.invoke(app, ["report", str(tmp_path / "sel"), "--json", str(tmp_path / "r.json")])
    assert r.exit_code == 0, r.output
    assert "teacher a:" in r.output and "teacher b:" in r.output
    numbers = json.loads((tmp_path / "r.json").read_text())
    for t, name in enumerate("ab"):
        rows = numbers["teachers"][name]
        assert sum(row["tokens"] for row in rows) == int(((route == t) & cand.bool()).sum())
    assert [sum(numbers["teachers"][n][q]["tokens"] for n in "ab") for q in range(4)] == \
        [row["tokens"] for row in numbers["quadrants"]]


def test_distill_two_iterations_with_two_teachers(tiny_pair, routed, tmp_path):
    prompts, _, second = routed
    args = ["distill", "-s", str(tiny_pair[0]), "-t", f"a={tiny_pair[1]}", "-t", f"b={second}",
            "-p", str(prompts), "--iterations", "2", "--num-samples", "2",
            "--max-new-tokens", "8", "--max-steps", "2", "--train-batch-size", "4",
            "--lr", "1e-3"]
    r = runner.invoke(app, [*args, "--loss", "rkl-full", "-o", str(tmp_path / "no")])
    assert_one_line_error(r, "needs one teacher in training")
    assert not (tmp_path / "no").exists()
    r = runner.invoke(app, [*args, "--eval-prompts", str(prompts), "-o", str(tmp_path / "run")])
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "run" / "manifest.json").read_text())
    history = m["summary"]["history"]
    assert [h["iteration"] for h in history] == ["initial", 0, 1]
    for h in history:  # the held-out evaluation per teacher: 3 prompts each
        assert {n: p["n"] for n, p in h["per_teacher"].items()} == {"a": 3, "b": 3}
        assert abs(sum(p["accuracy"] * 3 for p in h["per_teacher"].values()) / 6
                   - h["accuracy"]) < 1e-9
    assert list(m["models"]["teacher"]["teachers"]) == ["a", "b"]
    s = StageDir.open(tmp_path / "run" / "iter-001" / "score")
    assert set(s.manifest["summary"]["teachers"]) == {"a", "b"}


def test_a_served_teacher_among_several_and_its_server_down(tiny_pair, routed, tmp_path,
                                                            monkeypatch):
    """Teacher b on its server (--teacher-url b=URL), a in process: b's responses are its
    served score (the sampled token's log-prob exact, divergences top-k estimates); its
    server dying mid-run stops the run in one line naming it, and the same command resumes
    once it is back, ending where an uninterrupted run does."""
    from fake_vllm import FakeVLLM

    from tipcli.engines import served
    from tipcli.models.loading import load_model, load_tokenizer

    monkeypatch.setattr(served, "BACKOFF_SECONDS", 0.01)
    _, rollout, second = routed
    server = FakeVLLM(load_model(str(second)), load_tokenizer(str(second)), name=str(second))
    args = ["score", str(rollout), "-t", f"a={tiny_pair[1]}", "-t", f"b={second}",
            "--teacher-url", f"b={server.url}", "--teacher-top-k", "8", "--score-batch-size",
            "3", "--teacher-concurrency", "1"]
    try:
        r = runner.invoke(app, [*args, "-o", str(tmp_path / "whole")])
        assert r.exit_code == 0, r.output
        # the same teacher named by its server alone (--teacher b=URL): the model it serves
        by_url = ["score", str(rollout), "-t", f"a={tiny_pair[1]}", "-t", f"b={server.url}",
                  "--teacher-top-k", "8", "--score-batch-size", "3", "--teacher-concurrency", "1"]
        r = runner.invoke(app, [*by_url, "-o", str(tmp_path / "by-url")])
        assert r.exit_code == 0, r.output
        assert [s["sha256"] for s in StageDir.open(tmp_path / "by-url").shards] == \
            [s["sha256"] for s in StageDir.open(tmp_path / "whole").shards]
        server.stop_after = server.completions + 1 + 3  # the top-k probe, then 3 of b's
        r = runner.invoke(app, [*args, "-o", str(tmp_path / "cut")])
        assert_one_line_error(r, server.url, "does not answer", "run the same command again")
        assert not json.loads((tmp_path / "cut" / "manifest.json").read_text())["complete"]
    finally:
        server.close()
    back = FakeVLLM(load_model(str(second)), load_tokenizer(str(second)), name=str(second),
                    port=server.port)
    try:
        r = runner.invoke(app, [*args, "-o", str(tmp_path / "cut")])
        assert r.exit_code == 0, r.output
    finally:
        back.close()
    a, b = StageDir.open(tmp_path / "whole"), StageDir.open(tmp_path / "cut")
    assert [s["sha256"] for s in a.shards] == [s["sha256"] for s in b.shards]
    m = a.manifest
    assert m["summary"]["teachers"]["b"]["statistics"]["rkl"] == "top-k estimate"
    assert m["summary"]["statistics"]["teacher_entropy"] == "absent"
    assert m["models"]["teacher"]["teachers"]["b"]["url"] == server.url
    local = sequences(score(rollout, tmp_path / "local-b", str(second)))
    for n, seq in enumerate(sequences(tmp_path / "whole")):
        if int(seq["teacher_route"][0]) == 1:
            torch.testing.assert_close(seq["teacher_logprob"], local[n]["teacher_logprob"],
                                       rtol=0, atol=1e-5)


def test_one_teacher_at_a_time_gives_the_same_scores(tiny_pair, routed, bpe_teacher, tmp_path,
                                                    monkeypatch):
    """--teacher-at-a-time: each shard scored teacher by teacher, one loaded at a time
    (never two at once), the same statistics as with every teacher resident (1e-6)."""
    from tipcli.models import teacher as teacher_mod

    _, rollout, second = routed
    both = [f"a={tiny_pair[1]}", f"b={bpe_teacher}"]
    resident = sequences(score(rollout, tmp_path / "all", both))
    live, most = [0], [0]
    make = teacher_mod.make_teacher

    def counted(name, *args, **kw):
        t = make(name, *args, **kw)
        if "=" in str(name) or isinstance(name, list):
            return t
        live[0] += 1
        most[0] = max(most[0], live[0])
        close = t.close

        def closed():
            live[0] -= 1
            close()
        t.close = closed
        return t

    monkeypatch.setattr(teacher_mod, "make_teacher", counted)
    one = sequences(score(rollout, tmp_path / "one", both, teacher_at_a_time=True))
    assert most[0] == 1 and live[0] == 0
    for x, y in zip(one, resident):
        assert torch.equal(x["teacher_route"], y["teacher_route"])
        for k in ("teacher_logprob", "student_logprob", "rkl", "fkl", "jsd",
                  "teacher_topk_logprobs"):
            torch.testing.assert_close(x[k], y[k], rtol=0, atol=1e-6, msg=k)


def test_the_rollout_keeps_every_field_of_its_prompts(tiny_pair, routed, tmp_path):
    """tip rollout keeps the records it sampled, every field, beside its shards: the
    routes reach the score with the prompts file gone, and a changed copy is refused."""
    from tipcli.stages.rollout import RolloutConfig, run_rollout

    prompts, _, second = routed
    mine = tmp_path / "p.jsonl"
    mine.write_text(prompts.read_text())
    rollout = run_rollout(resolve(RolloutConfig, student=str(tiny_pair[0]), prompts=str(mine),
                                  output=str(tmp_path / "rollout"), num_samples=1,
                                  max_new_tokens=6))
    kept = [json.loads(line) for line in (rollout / "prompts.jsonl").read_text().splitlines()]
    assert kept == [json.loads(line) for line in prompts.read_text().splitlines()]
    mine.unlink()
    got = score(rollout, tmp_path / "s", [f"a={tiny_pair[1]}", f"b={second}"])
    assert set(StageDir.open(got).manifest["summary"]["teachers"]) == {"a", "b"}
    (rollout / "prompts.jsonl").write_text(json.dumps({**kept[0], "teacher": "b"}) + "\n")
    r = runner.invoke(app, ["score", str(rollout), "-t", f"a={tiny_pair[1]}", "-t",
                            f"b={second}", "-o", str(tmp_path / "x")])
    assert_one_line_error(r, "does not match its checksum")
    assert not (tmp_path / "x").exists()


def test_eval_reports_the_accuracy_per_teacher(tiny_pair, routed, tmp_path):
    """tip eval --group-field teacher: the accuracy on each teacher's prompts, adding up
    to the whole, in the summary and its table."""
    prompts, _, _ = routed
    r = runner.invoke(app, ["eval", "-m", str(tiny_pair[0]), "-p", str(prompts),
                            "--group-field", "teacher", "--num-samples", "2",
                            "--temperature", "1", "--max-new-tokens", "8", "-o",
                            str(tmp_path / "e")])
    assert r.exit_code == 0, r.output
    assert "teacher = a" in r.output and "teacher = b" in r.output
    s = json.loads((tmp_path / "e" / "manifest.json").read_text())["summary"]
    assert {k: g["n"] for k, g in s["groups"].items()} == {"a": 6, "b": 6}
    assert sum(g["correct"] for g in s["groups"].values()) == s["correct"]
    rows = [json.loads(line) for line in (tmp_path / "e" / "results.jsonl").read_text()
            .splitlines()]
    assert s["groups"]["a"]["correct"] == sum(row["correct"] for row in rows
                                              if row["prompt_index"] % 2 == 0)
