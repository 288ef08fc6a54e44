"""Bad input: a one-line error naming the problem, exit code 2, no traceback, and no
output directory that looks complete."""

import json
from pathlib import Path

import pytest
from conftest import assert_one_line_error
from typer.testing import CliRunner

from tipcli.cli import app
from tipcli.store.stagedir import MANIFEST

runner = CliRunner()


def _rollout(student, prompts, out):
    return runner.invoke(app, ["rollout", "--student", str(student), "--prompts", str(prompts),
                               "-o", str(out), "--max-new-tokens", "4"])



def _assert_not_complete(out: Path):
    m = out / MANIFEST
    assert not m.exists() or not json.loads(m.read_text())["complete"]


def test_jsonl_line_not_json(tiny_pair, tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text('{"prompt": "a"}\n{"prompt": "b"\n')
    r = _rollout(tiny_pair[0], p, tmp_path / "out")
    assert_one_line_error(r, "line 2", "not valid JSON")
    _assert_not_complete(tmp_path / "out")


def test_missing_prompt_field(tiny_pair, tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text('{"prompt": "a"}\n{"question": "b"}\n')
    r = _rollout(tiny_pair[0], p, tmp_path / "out")
    assert_one_line_error(r, "line 2", "'prompt'", "--prompt-field", "question")
    _assert_not_complete(tmp_path / "out")


def test_prompt_field_option(tiny_pair, tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text('{"question": "b"}\n')
    r = runner.invoke(app, ["rollout", "--student", str(tiny_pair[0]), "--prompts", str(p),
                            "-o", str(tmp_path / "out"), "--max-new-tokens", "3",
                            "--prompt-field", "question"])
    assert r.exit_code == 0, r.output


def test_empty_prompt_file(tiny_pair, tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text("\n")
    assert_one_line_error(_rollout(tiny_pair[0], p, tmp_path / "out"), "no prompts")
    _assert_not_complete(tmp_path / "out")


def test_missing_prompt_file(tiny_pair, tmp_path):
    r = _rollout(tiny_pair[0], tmp_path / "nope.jsonl", tmp_path / "out")
    assert_one_line_error(r, "nope.jsonl", "does not exist")
    assert not (tmp_path / "out").exists()


def test_missing_model(tmp_path, prompts_file):
    r = _rollout(tmp_path / "no-model-here.gguf", prompts_file, tmp_path / "out")
    assert_one_line_error(r, "does not exist")


def test_teacher_vocabulary_differs(tiny_pair, tiny_rollout, tmp_path):
    from tipcli.models.tiny import CHARS, build_model, build_tokenizer

    tok = build_tokenizer(CHARS.replace("q", ""))
    other = tmp_path / "other-teacher"
    build_model(tok).save_pretrained(other)
    tok.save_pretrained(other)
    r = runner.invoke(app, ["score", str(tiny_rollout), "--teacher", str(other), "-o",
                            str(tmp_path / "s"), "--cross-tokenizer", "off"])
    assert_one_line_error(r, "differ at id", "'q'", "--cross-tokenizer auto")
    assert not (tmp_path / "s").exists()


def test_score_needs_rollout_dir(tiny_pair, tmp_path):
    (tmp_path / "empty").mkdir()
    r = runner.invoke(app, ["score", str(tmp_path / "empty"), "--teacher", str(tiny_pair[1]),
                            "-o", str(tmp_path / "s")])
    assert_one_line_error(r, "no manifest.json")


def test_score_given_score_dir(tiny_pair, tiny_score, tmp_path):
    r = runner.invoke(app, ["score", str(tiny_score), "--teacher", str(tiny_pair[1]),
                            "-o", str(tmp_path / "s")])
    assert_one_line_error(r, "is a score directory", "expected a rollout directory")


def test_invalid_settings_listed_together(tiny_pair, prompts_file, tmp_path):
    r = runner.invoke(app, ["rollout", "--student", str(tiny_pair[0]), "--prompts",
                            str(prompts_file), "-o", str(tmp_path / "o"), "--top-p", "0",
                            "--num-samples", "0"])
    assert_one_line_error(r, "--top-p", "--num-samples")


def test_output_dir_with_foreign_files(tiny_pair, prompts_file, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    assert_one_line_error(_rollout(tiny_pair[0], prompts_file, out), "not empty")
    assert (out / "precious.txt").read_text() == "keep me"


def test_stdin_dash_without_input(tiny_pair, tmp_path):
    r = runner.invoke(app, ["score", "-", "--teacher", str(tiny_pair[1]), "-o",
                            str(tmp_path / "s")], input="")
    assert_one_line_error(r, "stdin")


@pytest.mark.parametrize("fmt", ["parquet", "csv", "dataset"])
def test_prompts_from_datasets_formats(tiny_pair, tmp_path, fmt):
    import datasets

    ds = datasets.Dataset.from_dict({"prompt": ["hi", "yo"], "answer": ["1", "2"]})
    path = tmp_path / {"parquet": "p.parquet", "csv": "p.csv", "dataset": "ds"}[fmt]
    {"parquet": ds.to_parquet, "csv": ds.to_csv, "dataset": ds.save_to_disk}[fmt](str(path))
    r = _rollout(tiny_pair[0], path, tmp_path / "out")
    assert r.exit_code == 0, r.output
    from tipcli.store.stagedir import StageDir

    assert StageDir.open(tmp_path / "out").num_sequences == 2


def test_chat_messages_field(tiny_pair, tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text(json.dumps({"messages": [{"role": "user", "content": "hey"}]}) + "\n")
    r = _rollout(tiny_pair[0], p, tmp_path / "out")
    assert r.exit_code == 0, r.output
    from tipcli.models.tiny import build_tokenizer
    from tipcli.store.stagedir import StageDir

    seq = next(StageDir.open(tmp_path / "out").iter_sequences())
    assert build_tokenizer().decode(seq["prompt_ids"]) == "U: hey\nA: "
