"""A teacher with another tokenizer (--cross-tokenizer): the aligned path equals the
ordinary one on a same-tokenizer pair, keeps each response's teacher log-prob exact across
tokenizers, and runs score, select, train and a 2-iteration distill on tiny models."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import assert_one_line_error
from typer.testing import CliRunner

from tipcli.cli import app
from tipcli.configs import ScoreConfig, resolve
from tipcli.models.cross import CROSS_STATISTICS
from tipcli.ops.align import align, student_ends, teacher_tokens
from tipcli.stages.score import run_score
from tipcli.store.stagedir import StageDir

runner = CliRunner()


@pytest.fixture(scope="session")
def arith_rollout(tmp_path_factory):
    """(the demo's shipped student, its prompts, a rollout of it): worked additions."""
    from tipcli.stages.demo import SHIPPED_MODELS
    from tipcli.stages.rollout import RolloutConfig, run_rollout
    from tipcli.tasks.arithmetic import write_prompts

    d = tmp_path_factory.mktemp("arith")
    prompts = write_prompts(d / "p.jsonl", 6, seed=5)
    student = SHIPPED_MODELS / "student"
    out = run_rollout(resolve(RolloutConfig, student=str(student), prompts=str(prompts),
                              output=str(d / "rollout"), num_samples=2, max_new_tokens=40,
                              seed=0))
    return student, prompts, out


def score(rollout, out, teacher, **kw):
    return run_score(resolve(ScoreConfig, rollout=str(rollout), teacher=str(teacher),
                             output=str(out), score_batch_size=3, score_chunk_size=7, **kw))


def flat(d, name):
    s = StageDir.open(d)
    return torch.cat([s.load_shard(i)[name] for i in range(len(s.shards))])


def test_force_on_a_same_tokenizer_pair_equals_the_ordinary_path(tiny_pair, tiny_rollout,
                                                                  tiny_score, tmp_path):
    """--cross-tokenizer force on the tiny pair (one character tokenizer): every span is one
    token on each side, so the teacher's log-probs are the ordinary path's (1e-5), the
    student's side is the same, and the rKL estimate is the sampled token's log-ratio."""
    out = score(tiny_rollout, tmp_path / "s", tiny_pair[1], cross_tokenizer="force",
                teacher_top_k=8)
    m = StageDir.open(out).manifest
    assert m["summary"]["statistics"] == CROSS_STATISTICS
    assert m["models"]["teacher"]["cross_tokenizer"]
    for name in ("teacher_logprob", "student_logprob", "student_entropy"):
        torch.testing.assert_close(flat(out, name), flat(tiny_score, name), rtol=0, atol=1e-5,
                                   msg=name)
    shard = StageDir.open(out).load_shard(0)
    assert "teacher_entropy" not in shard
    # one tokenizer: every candidate maps to itself, the ordinary path's top-k
    assert torch.equal(flat(out, "teacher_topk_ids"), flat(tiny_score, "teacher_topk_ids"))
    torch.testing.assert_close(flat(out, "teacher_topk_logprobs"),
                               flat(tiny_score, "teacher_topk_logprobs"), rtol=0, atol=1e-5)
    # the top-8 of every position maps (one tokenizer): the *-topk coarsening, a lower bound
    for name in ("rkl", "fkl", "jsd"):
        assert bool((flat(out, name) <= flat(tiny_score, name) + 1e-5).all()), name
    assert float((flat(out, "rkl") - flat(tiny_score, "rkl")).abs().max()) > 1e-3
    # over the whole vocabulary the mapped estimate is the exact divergence
    whole = score(tiny_rollout, tmp_path / "v", tiny_pair[1], cross_tokenizer="force",
                  teacher_top_k=100)
    for name in ("rkl", "fkl", "jsd"):
        torch.testing.assert_close(flat(whole, name), flat(tiny_score, name), rtol=0,
                                   atol=1e-5, msg=name)


def teacher_logprob_of_response(teacher_dir, record, text, eos: bool) -> float:
    """Reference: log p_t(response text | prompt) by one plain forward over the teacher's
    own tokens (its chat template, its tokenization of the text, its EOS)."""
    from tipcli.models.loading import load_model, load_tokenizer

    tok, model = load_tokenizer(str(teacher_dir)), load_model(str(teacher_dir), "cpu",
                                                              torch.float32)
    prompt = tok.apply_chat_template([{"role": "user", "content": record["prompt"]}],
                                     add_generation_prompt=True, tokenize=True)
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    resp = tok(text, add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if eos else [])
    ids = torch.tensor([prompt + resp])
    with torch.no_grad():
        lp = model(ids).logits[0, :-1].float().log_softmax(-1)[:, :len(tok)]
    lp = lp - lp.logsumexp(-1, keepdim=True)  # over the real vocabulary, as tip scores
    pos = torch.arange(len(prompt) - 1, ids.shape[1] - 1)
    return float(lp[pos, ids[0, pos + 1]].sum())


def test_a_teacher_of_another_tokenizer_keeps_each_responses_log_prob(
        arith_rollout, bpe_teacher, tmp_path):
    """auto with a BPE teacher: per sequence, the teacher log-probs given to the student's
    tokens add up to the teacher's log-prob of the response's text (a plain forward as the
    reference); on a span of several tokens the rKL estimate is minus its log-ratio."""
    from tipcli.models.loading import load_tokenizer

    student, prompts_file, rollout = arith_rollout
    out = score(rollout, tmp_path / "s", bpe_teacher)
    assert StageDir.open(out).manifest["summary"]["statistics"]["rkl"] == "aligned estimate"
    s_tok, t_tok = load_tokenizer(str(student)), load_tokenizer(str(bpe_teacher))
    checked = 0
    records = [json.loads(line) for line in prompts_file.read_text().splitlines()]
    shard = StageDir.open(out).load_shard(0)
    off = shard["response_offsets"].tolist()
    for n in range(len(off) - 1):
        ids = shard["response_ids"][off[n]:off[n + 1]].tolist()
        eos = bool(ids) and ids[-1] == s_tok.eos_token_id
        text = s_tok.decode(ids[:-1] if eos else ids)
        want = teacher_logprob_of_response(bpe_teacher, records[int(shard["prompt_index"][n])],
                                           text, eos)
        got = shard["teacher_logprob"][off[n]:off[n + 1]].double().sum()
        assert abs(float(got) - want) < 1e-4, n
        # on spans of several tokens the rKL estimate is the span's log-ratio, spread
        body = ids[:-1] if eos else ids
        t_ids, t_ends = teacher_tokens(t_tok, text, "it")
        spans = align(student_ends(s_tok, body, text), t_ends)
        ss = spans.student_starts.tolist()
        several = [(a, b) for a, b, one in zip(ss, ss[1:], spans.one_to_one_N()) if not one]
        checked += len(several)
        for a, b in several:
            a, b = a + off[n], b + off[n]
            rkl = shard["rkl"][a:b].double().sum()
            log_r = shard["teacher_logprob"][a:b].double().sum() - \
                shard["student_logprob"][a:b].double().sum()
            assert abs(float(rkl + log_r)) < 1e-4
            assert len(set(shard["rkl"][a:b].tolist())) == 1  # shared evenly
    assert checked > 3
    for name in ("fkl", "jsd"):
        assert bool((shard[name] >= 0).all()) and bool(torch.isfinite(shard[name]).all())


def test_select_and_train_on_an_aligned_score(tiny_rollout, bpe_teacher, tmp_path):
    s = str(score(tiny_rollout, tmp_path / "s", bpe_teacher))
    r = runner.invoke(app, ["select", s, "--strategy", "soft-or", "--keep", "0.5",
                            "--normalize", "bound", "-o", str(tmp_path / "bound")])
    assert_one_line_error(r, "--normalize bound", "aligned estimate")
    r = runner.invoke(app, ["select", s, "--strategy", "soft-or", "--keep", "0.5", "-o",
                            str(tmp_path / "sel")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["train", str(tmp_path / "sel"), "--loss", "rkl-full", "--teacher",
                            str(bpe_teacher), "-o", str(tmp_path / "t1")])
    assert_one_line_error(r, "--loss rkl-full needs the teacher's whole distribution",
                          "another tokenizer", "*-topk")
    assert not (tmp_path / "t1").exists()
    for loss in ("rkl-sampled", "rkl-topk", "jsd-topk"):
        r = runner.invoke(app, ["train", str(tmp_path / "sel"), "--loss", loss,
                                "--max-steps", "2", "--train-batch-size", "4", "-o",
                                str(tmp_path / loss)])
        assert r.exit_code == 0, r.output
        assert (tmp_path / loss / "model.safetensors").is_file()
        losses = [json.loads(line)["loss"] for line in
                  (tmp_path / loss / "metrics.jsonl").read_text().splitlines()
                  if "loss" in json.loads(line)]
        assert losses and all(math.isfinite(v) for v in losses), loss


def test_distill_two_iterations_with_a_teacher_of_another_tokenizer(tiny_pair, prompts_file,
                                                                    bpe_teacher, tmp_path):
    args = ["distill", "-s", str(tiny_pair[0]), "-t", str(bpe_teacher), "-p",
            str(prompts_file), "--iterations", "2", "--num-samples", "2", "--max-new-tokens",
            "8", "--max-steps", "2", "--train-batch-size", "4", "--lr", "1e-3"]
    r = runner.invoke(app, [*args, "--loss", "fkl-full", "-o", str(tmp_path / "refused")])
    assert_one_line_error(r, "--loss fkl-full needs", "*-topk", "rkl-sampled")
    assert not (tmp_path / "refused").exists()
    r = runner.invoke(app, [*args, "--eval-prompts", str(prompts_file), "--eval-metric", "kl",
                            "-o", str(tmp_path / "refused")])
    assert_one_line_error(r, "--eval-metric kl needs", "--eval-metric accuracy")
    assert not (tmp_path / "refused").exists()
    r = runner.invoke(app, [*args, "-o", str(tmp_path / "run")])  # rkl-topk, mapped
    assert r.exit_code == 0, r.output
    history = json.loads((tmp_path / "run" / "manifest.json").read_text())["summary"]["history"]
    assert [h["iteration"] for h in history] == [0, 1]
    s = StageDir.open(tmp_path / "run" / "iter-001" / "score")
    assert s.manifest["summary"]["statistics"]["teacher_logprob"] == "span estimate"


def test_cross_tokenizer_faults_are_one_line(tiny_pair, tiny_rollout, prompts_file,
                                             bpe_teacher, tmp_path):
    from tipcli.models.loading import load_tokenizer

    # a teacher tokenizer without a chat template, when the student has one
    plain = tmp_path / "plain"
    tok = load_tokenizer(str(bpe_teacher))
    tok.chat_template = None
    tok.save_pretrained(plain)
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    for f in bpe_teacher.glob("*"):
        if f.name.startswith(("config", "model", "generation")):
            (plain / f.name).write_bytes(f.read_bytes())
    r = runner.invoke(app, ["score", str(tiny_rollout), "-t", str(plain), "-o",
                            str(tmp_path / "a")])
    assert_one_line_error(r, "the teacher's tokenizer has no chat template")
    # a teacher whose tokenizer cannot write the response text back
    from tipcli.models.tiny import build_model, build_tokenizer

    narrow = tmp_path / "narrow"
    few = build_tokenizer(chars="abcdefghij :?\n")
    build_model(few).save_pretrained(narrow)
    few.save_pretrained(narrow)
    r = runner.invoke(app, ["score", str(tiny_rollout), "-t", str(narrow), "-o",
                            str(tmp_path / "b")])
    assert_one_line_error(r, "cannot reproduce")
    # --cross-tokenizer off: today's refusal
    r = runner.invoke(app, ["score", str(tiny_rollout), "-t", str(bpe_teacher),
                            "--cross-tokenizer", "off", "-o", str(tmp_path / "c")])
    assert_one_line_error(r, "differ at id")
    # the prompt records are not those the rollout sampled: its own copy changed (with
    # its checksum), or, for a rollout that keeps none, the prompts file it names
    import shutil

    from tipcli.store.files import sha256_file

    changed = tmp_path / "changed-rollout"
    shutil.copytree(tiny_rollout, changed)
    copy = changed / "prompts.jsonl"
    copy.write_text(copy.read_text().replace("Say hi.", "Say bye."))
    m = json.loads((changed / "manifest.json").read_text())
    m["summary"]["prompt_records"]["sha256"] = sha256_file(copy)
    (changed / "manifest.json").write_text(json.dumps(m))
    r = runner.invoke(app, ["score", str(changed), "-t", str(bpe_teacher), "-o",
                            str(tmp_path / "d")])
    assert_one_line_error(r, "are not those", "sample the rollout again")
    moved = tmp_path / "p.jsonl"
    moved.write_text(prompts_file.read_text().replace("Say hi.", "Say bye."))
    copy.unlink()
    del m["summary"]["prompt_records"]
    m["config"]["prompts"] = str(moved)
    (changed / "manifest.json").write_text(json.dumps(m))
    r = runner.invoke(app, ["score", str(changed), "-t", str(bpe_teacher), "-o",
                            str(tmp_path / "e")])
    assert_one_line_error(r, "are not those", "sample the rollout again")


def test_a_served_teacher_of_another_tokenizer_equals_the_in_process_one(tiny_rollout,
                                                                         bpe_teacher, tmp_path):
    """--teacher-url with a teacher of another tokenizer: tip reads its tokenizer from
    --teacher (the served model's path), sends its own tokens of the text and reads their
    prompt_logprobs; every statistic equals the in-process aligned score (the server's
    float64 against float32 here: 1e-4)."""
    from fake_vllm import FakeVLLM

    from tipcli.models.loading import load_model, load_tokenizer

    server = FakeVLLM(load_model(str(bpe_teacher)), load_tokenizer(str(bpe_teacher)),
                      name=str(bpe_teacher))
    try:
        got = score(tiny_rollout, tmp_path / "served", bpe_teacher, teacher_url=server.url,
                    teacher_top_k=8)
        r = runner.invoke(app, ["score", str(tiny_rollout), "-t", "other", "--teacher-url",
                                server.url, "-o", str(tmp_path / "w")])
        assert_one_line_error(r, "not --teacher")  # another name: not the served model
    finally:
        server.close()
    # the server's tokenizer is checked against the one read here from --teacher
    from tipcli.models.tiny import build_model, build_tokenizer

    wrong, few = tmp_path / "wrong", build_tokenizer(chars="abcdefghij :?\n")
    build_model(few).save_pretrained(wrong)
    few.save_pretrained(wrong)
    other = FakeVLLM(load_model(str(bpe_teacher)), load_tokenizer(str(bpe_teacher)),
                     name=str(wrong))
    try:
        r = runner.invoke(app, ["score", str(tiny_rollout), "-t", str(wrong), "--teacher-url",
                                other.url, "-o", str(tmp_path / "w")])
        assert_one_line_error(r, "tokenizes", f"the tokenizer of --teacher {wrong}",
                              "serve the model that --teacher names")
        assert not (tmp_path / "w").exists()
    finally:
        other.close()
    want = score(tiny_rollout, tmp_path / "local", bpe_teacher, teacher_top_k=8)
    m = StageDir.open(got).manifest
    assert m["summary"]["statistics"] == CROSS_STATISTICS
    assert m["models"]["teacher"]["url"] == server.url and m["models"]["teacher"][
        "cross_tokenizer"]
    for name in ("teacher_logprob", "student_logprob", "rkl", "fkl", "jsd",
                 "teacher_topk_logprobs"):
        torch.testing.assert_close(flat(got, name), flat(want, name), rtol=0, atol=1e-4,
                                   msg=name)
    ids_got, ids_want = flat(got, "teacher_topk_ids"), flat(want, "teacher_topk_ids")
    assert float((ids_got == ids_want).double().mean()) > 0.99  # float ties may swap ranks
    assert bool((ids_want >= 0).any()) and bool((ids_want < 0).any())
