"""`tip eval` and `run_eval`: files written, accuracy and interval, errors, in-memory use."""

import json

import pytest
from conftest import assert_one_line_error
from typer.testing import CliRunner

from tipcli.cli import app
from tipcli.configs import resolve
from tipcli.errors import ConfigError
from tipcli.stages.evaluate import EvalConfig, run_eval, wilson_interval

runner = CliRunner()


def _invoke(args):
    return runner.invoke(app, [str(a) for a in args])


def test_wilson_interval_reference_values():
    # 8/10 at 95%: (0.4902, 0.9433), the textbook Wilson score interval
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)
    assert wilson_interval(0, 20)[0] == 0.0 and wilson_interval(0, 20)[1] > 0.1
    assert wilson_interval(5, 5)[1] == pytest.approx(1.0) and wilson_interval(5, 5)[0] < 1.0
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_cli_eval_files_and_summary(tiny_pair, prompts_file, tmp_path):
    out = tmp_path / "eval"
    r = _invoke(["eval", "--model", tiny_pair[0], "--prompts", prompts_file, "-o", out,
                 "--max-new-tokens", 6, "--sample-batch-size", 4, "--num-samples", 2,
                 "--temperature", 1.0, "--verifier", "exact"])
    assert r.exit_code == 0, r.output
    assert r.stdout.strip().splitlines()[-1] == str(out)
    assert {p.name for p in out.iterdir()} == {"results.jsonl", "manifest.json"}
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 12
    assert {"prompt", "answer", "response", "correct"} <= set(rows[0])
    assert [(r["prompt_index"], r["sample_index"]) for r in rows[:3]] == [(0, 0), (0, 1), (1, 0)]
    assert rows[2]["prompt"] == "Say hi." and rows[2]["answer"] == "1"
    m = json.loads((out / "manifest.json").read_text())
    s = m["summary"]
    assert m["stage"] == "eval" and m["complete"]
    assert s["n"] == 12 and s["num_prompts"] == 6
    assert s["correct"] == sum(r["correct"] for r in rows)
    assert s["accuracy"] == s["correct"] / 12
    lo, hi = s["interval_95"]
    assert [lo, hi] == pytest.approx(list(wilson_interval(s["correct"], 12)))
    assert m["config"]["verifier"] == "exact" and m["tokenizer"]["vocab_size"] == 100
    assert m["models"]["model"]["id"] == str(tiny_pair[0]) and m["inputs"]["prompts_sha256"]
    # the same command again reads the finished evaluation back; other settings are refused
    again = _invoke(["eval", "--model", tiny_pair[0], "--prompts", prompts_file, "-o", out,
                     "--max-new-tokens", 6, "--sample-batch-size", 4, "--num-samples", 2,
                     "--temperature", 1.0, "--verifier", "exact"])
    assert again.exit_code == 0 and again.stdout.strip().splitlines()[-1] == str(out)
    assert json.loads((out / "manifest.json").read_text()) == m
    other = _invoke(["eval", "--model", tiny_pair[0], "--prompts", prompts_file, "-o", out,
                     "--max-new-tokens", 5, "--verifier", "exact"])
    assert_one_line_error(other, "its settings differ", "--overwrite")


def test_cli_eval_missing_answer_field_is_one_line_exit_2(tiny_pair, prompts_file, tmp_path):
    r = _invoke(["eval", "--model", tiny_pair[0], "--prompts", prompts_file,
                 "--answer-field", "solution", "-o", tmp_path / "e"])
    assert_one_line_error(r, "no 'solution' field")
    assert not (tmp_path / "e").exists()


def test_cli_eval_bad_verifier_is_one_line_exit_2(tiny_pair, prompts_file, tmp_path):
    r = _invoke(["eval", "--model", tiny_pair[0], "--prompts", prompts_file,
                 "--verifier", "no_such_mod_q:f", "-o", tmp_path / "e"])
    assert_one_line_error(r, "could not import verifier 'no_such_mod_q:f'")


def test_config_validate_collects_all_problems():
    with pytest.raises(ConfigError) as exc:
        resolve(EvalConfig, model="m", prompts="p", num_samples=0, temperature=-1,
                verifier="bogus")
    assert len(exc.value.problems) == 3


def test_run_eval_in_memory_greedy_is_deterministic(tiny_pair, prompts_file, tmp_path):
    """A model already loaded is used as is; greedy output does not depend on the seed or
    the batch size, and an answer file a user verifier grades all correct."""
    from tipcli.models.loading import load_model, load_tokenizer

    model, tok = load_model(str(tiny_pair[1])), load_tokenizer(str(tiny_pair[1]))
    base = dict(model="in-memory", prompts=str(prompts_file), max_new_tokens=5)
    a = run_eval(resolve(EvalConfig, **base, sample_batch_size=6, seed=1),
                 model=model, tokenizer=tok)
    b = run_eval(resolve(EvalConfig, **base, sample_batch_size=4, seed=2),
                 model=model, tokenizer=tok)
    assert [r["response"] for r in a.rows] == [r["response"] for r in b.rows]
    assert a.output is None and a.n == 6 and a.accuracy == a.correct / 6
    (tmp_path / "always.py").write_text("def yes(response, answer):\n    return True\n")
    c = run_eval(resolve(EvalConfig, **base, verifier=f"{tmp_path / 'always.py'}:yes"), model=model,
                 tokenizer=tok)
    assert c.accuracy == 1.0 and c.correct == 6


def test_run_eval_grades_a_model_that_knows_the_answers(tmp_path):
    """Grading end to end: a model that writes the two worked answers (set by construction,
    so on every CPU) scores 1 against the true answers and 0 against answers off by one."""
    from scripted import scripted_model

    from tipcli.models.prompts import encode_prompt
    from tipcli.models.tiny import build_tokenizer
    from tipcli.tasks.arithmetic import make_prompts

    recs = make_prompts(2, seed=0)
    tok = build_tokenizer()
    model = scripted_model(tok, {tuple(encode_prompt(tok, r)): tok(r["solution"])["input_ids"]
                                 for r in recs})
    for shift, expected in ((0, 1.0), (1, 0.0)):
        path = tmp_path / f"p{shift}.jsonl"
        path.write_text("".join(json.dumps({**r, "answer": str(int(r["answer"]) + shift)}) + "\n"
                                for r in recs))
        res = run_eval(resolve(EvalConfig, model="memo", prompts=str(path), max_new_tokens=40,
                                  verifier="last-number"), model=model, tokenizer=tok)
        assert [r["response"] for r in res.rows] == [r["solution"] for r in recs]
        assert res.accuracy == expected


def test_eval_help_and_listing():
    r = _invoke(["eval", "--help"])
    assert r.exit_code == 0, r.output
    for flag in ("--verifier", "--answer-field", "--num-samples", "--max-prompts"):
        assert flag in r.stdout
    assert "eval" in _invoke(["--help"]).stdout
