"""The embedded addition task (prompts, worked answers) and the demo's model builder
(batches, a short build, its record); the shipped pair's accuracy."""

import json
import re

import pytest

from tipcli.errors import TipError
from tipcli.ops.verify import last_number
from tipcli.tasks import arithmetic as A
from tipcli.tasks import build as B


def test_solve_worked_columns_with_carries():
    assert A.solve(487, 65) == "7+5+0=12 8+6+1=15 4+0+1=5 so 552"
    assert A.solve(99, 999) == "9+9+0=18 9+9+1=19 0+9+1=10 so 1098"
    assert A.solve(10, 20) == "0+0+0=0 1+2+0=3 so 30"


def test_subtraction_works_the_same_columns_with_borrows():
    assert A.solve(487, 65, "-") == "7-5-0=2 8-6-0=2 4-0-0=4 so 422"
    assert A.solve(503, 78, "-") == "3-8-0=5 0-7-1=2 5-0-1=4 so 425"
    assert A.solve(100, 99, "-") == "0-9-0=1 0-9-1=0 1-0-1=0 so 1"
    for r in A.make_prompts(300, seed=3, op="-"):
        x, y = map(int, re.fullmatch(r"(\d{2,3})-(\d{2,3})=", r["prompt"]).groups())
        assert x >= y and r["answer"] == str(x - y)
        digits = "".join(step.split("=")[1] for step in r["solution"].split(" so ")[0].split())
        assert int(digits[::-1]) == x - y  # the column digits, read back, are the result
        assert last_number(r["solution"], r["answer"])
    assert A.make_prompts(50, seed=3) == A.make_prompts(50, seed=3, op="+")


def test_make_prompts_deterministic_distinct_and_correct():
    a, b = A.make_prompts(300, seed=3), A.make_prompts(300, seed=3)
    assert a == b and a != A.make_prompts(300, seed=4)
    assert len({r["prompt"] for r in a}) == 300
    for r in a:
        x, y = map(int, re.fullmatch(r"(\d{2,3})\+(\d{2,3})=", r["prompt"]).groups())
        assert r["answer"] == str(x + y)
        assert len(r["prompt"]) <= 20 and len(r["solution"]) <= 60
        assert last_number(r["solution"], r["answer"])
        assert not last_number(r["solution"], str(x + y + 1))


def test_make_problems_excludes():
    held = set(A.make_problems(50, seed=1))
    assert not held & set(A.make_problems(500, seed=1, exclude=held))


def test_write_prompts_jsonl(tmp_path):
    path = A.write_prompts(tmp_path / "sub" / "p.jsonl", 5, seed=2)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows == A.make_prompts(5, seed=2)


def test_encoder_matches_chat_template_encoding():
    from tipcli.models.prompts import encode_prompt
    from tipcli.models.tiny import build_tokenizer

    tok = build_tokenizer()
    enc = B.Encoder(tok)
    for r in A.make_prompts(5, seed=0):
        assert enc.prompt(r["prompt"]) == encode_prompt(tok, r)
        p, resp = enc.example(r)
        assert tok.decode(resp, skip_special_tokens=True) == r["solution"]
        assert resp[-1] == tok.eos_token_id


def test_sft_batch_labels_only_on_response():
    from tipcli.models.tiny import build_tokenizer

    tok = build_tokenizer()
    enc = B.Encoder(tok)
    recs = A.make_prompts(3, seed=0)
    ids, mask, labels = B.sft_batch(enc, recs)
    for b, r in enumerate(recs):
        p, resp = enc.example(r)
        assert labels[b].ne(-100).sum() == len(resp)
        assert labels[b, len(p):len(p) + len(resp)].tolist() == resp
        assert mask[b].sum() == len(p) + len(resp)


def test_train_spec_validate():
    from tipcli.settings import problems

    assert problems(B.TrainSpec()) == []
    found = problems(B.TrainSpec(hidden=30, heads=4, target=2.0, max_steps=0))
    assert len(found) == 3 and "--hidden must be a multiple of --heads" in found


def test_short_training_lowers_loss_and_saves_loadable_pair(tmp_path):
    """A handful of steps into tmp_path: the loss falls, and both saved models load
    with one shared tokenizer."""
    from tipcli.models.loading import check_same_vocab, load_model, load_tokenizer

    small = dict(hidden=32, heads=2, max_steps=20, batch_size=8, lr=1e-2, warmup=3,
                 eval_every=20, target=1.0)
    spec_s = B.TrainSpec("student", layers=1, seed=0, **small)
    spec_t = B.TrainSpec("teacher", layers=2, seed=1, **small)
    student, teacher = B.build_models(tmp_path / "arith", student=spec_s, teacher=spec_t,
                                      valid_size=8)
    info = json.loads((tmp_path / "arith" / "build.json").read_text())
    for name in ("student", "teacher"):
        losses = info[name]["losses"]
        assert losses[-1] < 0.7 * losses[0], losses
        # 20 steps at target 1.0: training ran to max_steps, checking accuracy at the end
        assert info[name]["steps"] == 20 and info[name]["valid_accuracy"] in \
            {k / 8 for k in range(9)}
        assert info[name]["spec"]["layers"] == {"student": 1, "teacher": 2}[name]
    assert info["tip_version"] and info["torch"] and info["cpu"] and info["valid_size"] == 8
    check_same_vocab(load_tokenizer(str(student)), load_tokenizer(str(teacher)))
    assert load_model(str(teacher)).config.vocab_size == 100 + B.VOCAB_PAD
    # an earlier build is replaced by a new one; a folder of anything else is refused
    B.build_models(tmp_path / "arith", student=spec_s, teacher=spec_t, valid_size=8)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(TipError, match="holds no build.json"):
        B.build_models(tmp_path / "mine", student=spec_s, teacher=spec_t)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "mine"


def test_shipped_pair_teacher_good_student_weak():
    """The pair the package ships (the demo's): greedy accuracy on 100 held-out prompts
    (never trained on); a shipped artifact, so the same on every CPU up to the rare greedy
    choice float rounding can flip."""
    from tipcli.models.loading import load_model, load_tokenizer
    from tipcli.stages.demo import SHIPPED_MODELS

    test = A.held_out_prompts(100)
    accs = {name: B.greedy_accuracy(load_model(str(SHIPPED_MODELS / name)),
                                    load_tokenizer(str(SHIPPED_MODELS / name)), test)
            for name in ("student", "teacher")}
    record = json.loads((SHIPPED_MODELS / "build.json").read_text())
    assert accs["teacher"] >= 0.95, accs
    assert 0.2 <= accs["student"] <= 0.5, accs
    assert record["teacher"]["steps"] > 0 and record["commit"]
