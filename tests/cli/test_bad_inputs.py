"""Bad input, table-driven: every case must end with exit code 2 (130 for Ctrl-C), one
short error on stderr, no traceback, and every file that existed before the command
byte-for-byte unchanged (the workspace and the shared fixtures alike)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tipcli.cli import app
from tipcli.configs import SelectConfig, resolve
from tipcli.stages.select import run_select

runner = CliRunner()


@dataclass
class Env:
    """Paths a case can use: the shared fixtures and a fresh workspace ``w``."""

    student: Path
    teacher: Path
    prompts: Path
    rollout: Path
    score: Path
    select: Path
    w: Path

    def copy(self, src: Path, name: str) -> Path:
        dst = self.w / name
        shutil.copytree(src, dst)
        return dst

    def write(self, name: str, text: str | bytes) -> Path:
        p = self.w / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(text) if isinstance(text, bytes) else p.write_text(text)
        return p

    def edit_manifest(self, d: Path, change: Callable[[dict], object]) -> None:
        """Change a manifest in place, written back as tip writes it."""
        m = json.loads((d / "manifest.json").read_text())
        change(m)
        (d / "manifest.json").write_text(json.dumps(m, indent=2) + "\n")


@dataclass
class Case:
    id: str
    args: Callable[[Env], list]
    needle: str
    setup: Callable[[Env], None] | None = None
    code: int = 2
    stdin: str | None = None
    interrupt: str | None = None   # "module:attr" made to raise KeyboardInterrupt
    chdir: Callable[[Env], Path] | None = None


def _sel(e: Env, score: Path, out: Path) -> Path:
    return run_select(resolve(SelectConfig, score=str(score), output=str(out)))


def _flip_last_byte(stage: Path) -> None:
    """One byte of a shard changed, its size kept: only a checksum can tell."""
    shard = stage / "shard-00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0x01
    shard.write_bytes(bytes(data))


def _json(e: Env, name: str, data) -> Path:
    return e.write(name, json.dumps(data))


def _stale_rollout(e: Env) -> None:
    from tipcli.configs import RolloutConfig
    from tipcli.stages.rollout import run_rollout

    e.write("p.jsonl", '{"prompt": "a"}\n{"prompt": "b"}\n')
    s = e.copy(e.student, "s")
    run_rollout(resolve(RolloutConfig, student=str(s), prompts=str(e.w / "p.jsonl"),
                        output=str(e.w / "r"), max_new_tokens=3))


def _rollout_args(e: Env, *extra) -> list:
    return ["rollout", "--student", e.w / "s", "--prompts", e.w / "p.jsonl", "-o", e.w / "r",
            "--max-new-tokens", "3", *extra]


def _touch_weights(e: Env) -> None:
    _stale_rollout(e)
    f = e.w / "s" / "model.safetensors"
    f.write_bytes(f.read_bytes())  # the same bytes, written again: another file now
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))


def _train_args(e: Env, inp, out, *extra) -> list:
    return ["train", inp, "-o", out, "--strategy", "all", "--max-steps", "2",
            "--train-batch-size", "4", "--lr", "1e-3", "--train-chunk-size", "16", *extra]


def _trained(e: Env) -> None:
    r = runner.invoke(app, [str(a) for a in _train_args(e, e.score, e.w / "t",
                                                         "--save-every", "1")])
    assert r.exit_code == 0, r.output
    e.edit_manifest(e.w / "t", lambda m: m.update(complete=False))


def _planted_shard(e: Env, name: str) -> None:
    """An unfinished --fsdp run whose checkpoint's sharded/ holds a file tip did not write:
    a copy of its shard (extra), or garbage (notes)."""
    r = runner.invoke(app, [str(a) for a in _train_args(e, e.score, e.w / "t", "--save-every",
                                                         "1", "--fsdp")])
    assert r.exit_code == 0, r.output
    e.edit_manifest(e.w / "t", lambda m: m.update(complete=False))
    sharded = e.w / "t" / "checkpoints" / "step-000001" / "sharded"
    shard = next(sharded.glob("*.safetensors")).read_bytes()
    (sharded / f"{name}.safetensors").write_bytes(shard if name == "extra" else b"garbage")


def _loop(e: Env) -> None:
    (e.w / "loop").symlink_to(e.w / "loop")


def _short_teacher(e: Env) -> None:
    """The teacher, told its context is 16 tokens (the rollout's sequences are longer)."""
    e.copy(e.teacher, "t")
    config = json.loads((e.w / "t" / "config.json").read_text())
    (e.w / "t" / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 16}))


def _nan_teacher(e: Env) -> None:
    """The teacher with every weight NaN."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(e.copy(e.teacher, "t"))
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    model.save_pretrained(e.w / "t")


def _served(e: Env, *extra) -> list:
    return [SCORE, e.rollout, "-t", "teacher", "-o", e.w / "o", *extra]


SCORE, ROLLOUT, SELECT = "score", "rollout", "select"
CASES = [
    # --- data loss: --overwrite and report files -------------------------------------
    Case("select-onto-its-input", lambda e: [SELECT, e.w / "x", "-o", e.w / "x", "--overwrite"],
         "is this run's input", lambda e: e.copy(e.score, "x")),
    Case("score-onto-its-input", lambda e: [SCORE, e.w / "x", "-t", e.teacher, "-o", e.w / "x",
                                            "--overwrite"],
         "is this run's input", lambda e: e.copy(e.rollout, "x")),
    Case("dot-in-the-inputs-parent", lambda e: [SELECT, "x", "-o", ".", "--overwrite"],
         "holds this run's input", lambda e: (e.copy(e.score, "x"),
                                              e.write("notes.txt", "mine")),
         chdir=lambda e: e.w),
    Case("output-holds-input-deep", lambda e: [SELECT, e.w / "a" / "b" / "x", "-o", e.w / "a",
                                               "--overwrite"],
         "holds this run's input", lambda e: e.copy(e.score, "a/b/x")),
    Case("own-dir-without-overwrite", lambda e: [SELECT, e.score, "-o", e.w / "own"],
         "holds no run written by tip", lambda e: e.write("own/notes.txt", "hi")),
    Case("own-dir-with-overwrite", lambda e: [SELECT, e.score, "-o", e.w / "own", "--overwrite"],
         "holds no run written by tip", lambda e: (e.write("own/notes.txt", "hi"),
                                                   e.write("own/sub/thesis.tex", "ch. 1"))),
    Case("overwrite-foreign-file-in-tip-dir", lambda e: [SELECT, e.score, "-o", e.w / "sel",
                                                         "--overwrite", "--keep", "0.2"],
         "which tip did not write", lambda e: (e.copy(e.select, "sel"),
                                               e.write("sel/notes.txt", "mine"))),
    Case("overwrite-the-working-dir", lambda e: [SELECT, e.score, "-o", ".", "--overwrite",
                                                 "--keep", "0.2"],
         "will not empty", lambda e: e.copy(e.select, "sel"), chdir=lambda e: e.w / "sel"),
    Case("train-onto-the-student", lambda e: [*_train_args(e, e.score, e.w / "s", "--student",
                                                            e.w / "s", "--overwrite")],
         "is this run's input", lambda e: e.copy(e.student, "s")),
    Case("rollout-into-prompts-folder", lambda e: ["rollout", "-s", e.student, "-p",
                                                   e.w / "p" / "p.jsonl", "-o", e.w / "p",
                                                   "--overwrite"],
         "holds this run's input", lambda e: e.write("p/p.jsonl", '{"prompt": "a"}\n')),
    Case("report-json-onto-manifest", lambda e: ["report", e.w / "x", "--json",
                                                 e.w / "x" / "manifest.json"],
         "stage directory", lambda e: e.copy(e.score, "x")),
    Case("report-png-into-score-dir", lambda e: ["report", e.select, "--png", e.score / "r.png"],
         "stage directory"),
    Case("report-export-into-score-of-selection", lambda e: [
        "report", e.w / "sel", "--export", e.w / "x" / "t.jsonl"],
        "stage directory", lambda e: (e.copy(e.score, "x"), _sel(e, e.w / "x", e.w / "sel"))),
    Case("report-json-missing-folder", lambda e: ["report", e.score, "--json",
                                                  e.w / "no" / "r.json"], "does not exist"),
    Case("report-png-onto-directory", lambda e: ["report", e.score, "--png", e.w],
         "is a directory"),
    # --- planted or changed checkpoints ---------------------------------------------
    Case("resume-tampered-checkpoint", lambda e: [*_train_args(e, e.score, e.w / "t", "--resume",
                                                                "--save-every", "1")],
         "does not match", lambda e: (_trained(e), e.write(
             "t/checkpoints/step-000001/scheduler.json", '{"last_epoch": 99}'))),
    Case("resume-checkpoint-index-not-json", lambda e: [
        *_train_args(e, e.score, e.w / "t", "--resume", "--save-every", "1")],
        "is not a checkpoint index", lambda e: (_trained(e), e.write(
            "t/checkpoints/step-000001/checkpoint.json", "\x80not json"))),
    Case("resume-index-names-a-path", lambda e: [
        *_train_args(e, e.score, e.w / "t", "--resume", "--save-every", "1")],
        "is not a checkpoint index", lambda e: (_trained(e), _json(
            e, "t/checkpoints/step-000001/checkpoint.json",
            {"step": 2, "files": {"../../x": "0"}}))),
    # --- NaN, infinity and other values out of range --------------------------------
    *[Case(f"{cmd}{flag}-{v}", lambda e, c=cmd, f=flag, v=v: {
        "score": [SCORE, e.rollout, "-t", e.teacher, "-o", e.w / "o"],
        "rollout": ["rollout", "-s", e.student, "-p", e.prompts, "-o", e.w / "o"],
        "select": [SELECT, e.score, "-o", e.w / "o"],
        "train": _train_args(e, e.score, e.w / "o"),
        "eval": ["eval", "-m", e.student, "-p", e.prompts],
        "distill": ["distill", "-s", e.student, "-t", e.teacher, "-p", e.prompts, "-o",
                    e.w / "o"]}[c] + [f, v], flag)
       for cmd, flag, v in [
           ("score", "--score-temperature", "nan"), ("score", "--score-temperature", "inf"),
           ("score", "--score-temperature", "0"), ("rollout", "--temperature", "nan"),
           ("rollout", "--top-p", "nan"), ("rollout", "--top-p", "1.5"),
           ("rollout", "--num-samples", "0"), ("train", "--max-grad-norm", "nan"),
           ("train", "--lr", "nan"), ("train", "--lr", "inf"), ("train", "--lr", "-1"),
           ("train", "--warmup", "-3"), ("select", "--alpha", "nan"), ("select", "--keep", "nan"),
           ("select", "--keep", "1.5"), ("select", "--tau-h", "inf"),
           ("select", "--group-size", "0"), ("eval", "--temperature", "-1"),
           ("distill", "--lr", "nan"), ("distill", "--iterations", "0")]],
    Case("keep-not-a-number", lambda e: [SELECT, e.score, "-o", e.w / "o", "--keep", "abc"],
         "--keep"),
    Case("unknown-flag", lambda e: [SELECT, e.score, "-o", e.w / "o", "--kepe", "0.5"],
         "No such option"),
    Case("unknown-strategy", lambda e: [SELECT, e.score, "-o", e.w / "o", "--strategy", "best"],
         "unknown strategy"),
    Case("rkl-full-without-teacher", lambda e: _train_args(e, e.score, e.w / "o", "--loss",
                                                           "rkl-full"), "needs --teacher"),
    Case("train-device-cuda-1", lambda e: _train_args(e, e.score, e.w / "o", "--device",
                                                      "cuda:1"), "for tip train"),
    Case("shard-size-not-multiple", lambda e: ["rollout", "-s", e.student, "-p", e.prompts, "-o",
                                               e.w / "o", "--sample-batch-size", "2",
                                               "--shard-size", "3"],
         "multiple of --sample-batch-size"),
    # --- settings files ---------------------------------------------------------------
    *[Case(f"settings-file-{name}", lambda e, n=name, d=data: [
        SELECT, e.score, "-o", e.w / "o", "--config", _json(e, "c.json", d)], needle)
      for name, data, needle in [
          ("keep-string", {"keep": "abc"}, "--keep must be a number"),
          ("keep-null", {"keep": None}, "--keep must be a number (got null)"),
          ("group-size-true", {"group_size": True}, "must be an integer (got true)"),
          ("seed-float", {"seed": 1.5}, "--seed must be an integer"),
          ("unknown-key", {"kepe": 0.5}, "unknown setting 'kepe'"),
          ("a-list", [0.5], "must hold a mapping")]],
    Case("settings-file-num-samples-string", lambda e: [
        "rollout", "-s", e.student, "-p", e.prompts, "-o", e.w / "o", "--config",
        _json(e, "c.json", {"num_samples": "3"})], "--num-samples must be an integer"),
    Case("settings-file-batch-size-true", lambda e: [
        SCORE, e.rollout, "-t", e.teacher, "-o", e.w / "o", "--config",
        _json(e, "c.json", {"score_batch_size": True})], "--score-batch-size must be an integer"),
    Case("settings-file-not-json", lambda e: [SELECT, e.score, "-o", e.w / "o", "--config",
                                              e.write("c.json", "{keep: 0.5")],
         "could not be parsed"),
    Case("settings-file-bad-yaml", lambda e: [SELECT, e.score, "-o", e.w / "o", "--config",
                                              e.write("c.yaml", "keep: [0.5")],
         "could not be parsed"),
    Case("settings-file-not-utf8", lambda e: [SELECT, e.score, "-o", e.w / "o", "--config",
                                              e.write("c.toml", b"keep = \xff\n")],
         "could not be parsed"),
    Case("settings-file-ini", lambda e: [SELECT, e.score, "-o", e.w / "o", "--config",
                                         e.write("c.ini", "[x]")], "use a .json"),
    Case("settings-file-missing", lambda e: [SELECT, e.score, "-o", e.w / "o", "--config",
                                             e.w / "none.json"], "does not exist"),
    # --- prompts -----------------------------------------------------------------------
    Case("prompts-not-utf8", lambda e: ["rollout", "-s", e.student, "-p",
                                        e.write("p.jsonl", b'{"prompt": "\xe9t\xe9"}\n'), "-o",
                                        e.w / "o"], "not UTF-8"),
    Case("prompts-line-is-a-list", lambda e: ["rollout", "-s", e.student, "-p",
                                              e.write("p.jsonl", '["a"]\n'), "-o", e.w / "o"],
         "not a JSON object"),
    Case("prompts-corrupt-parquet", lambda e: ["rollout", "-s", e.student, "-p",
                                               e.write("p.parquet", b"PAR1 not really"), "-o",
                                               e.w / "o"], "could not load prompts"),
    Case("prompts-csv-without-field", lambda e: ["rollout", "-s", e.student, "-p",
                                                 e.write("p.csv", "question\nhi\n"), "-o",
                                                 e.w / "o"], "--prompt-field"),
    Case("prompt-longer-than-context", lambda e: [
        "rollout", "-s", e.student, "-p", _json(e, "p.jsonl", {"prompt": "x" * 2100}), "-o",
        e.w / "o", "--max-new-tokens", "8"], "--long-prompts truncate"),
    Case("eval-prompts-missing", lambda e: ["eval", "-m", e.student, "-p", e.w / "none.jsonl"],
         "does not exist"),
    Case("distill-prompts-missing", lambda e: ["distill", "-s", e.student, "-t", e.teacher,
                                               "-p", e.w / "none.jsonl", "-o", e.w / "o"],
         "does not exist"),
    # --- output paths the operating system refuses -----------------------------------
    Case("output-symlink-loop", lambda e: [SELECT, e.score, "-o", e.w / "loop"],
         "cannot be resolved", _loop),
    Case("output-under-a-file", lambda e: [SELECT, e.score, "-o", e.w / "f.txt" / "sub"],
         "which is a file", lambda e: e.write("f.txt", "x")),
    Case("output-is-a-file", lambda e: [SELECT, e.score, "-o", e.w / "f.txt"],
         "is not a directory", lambda e: e.write("f.txt", "x")),
    Case("eval-output-is-a-file", lambda e: ["eval", "-m", e.student, "-p", e.prompts, "-o",
                                             e.w / "f.txt"],
         "is not a directory", lambda e: e.write("f.txt", "x")),
    Case("eval-output-foreign-dir", lambda e: ["eval", "-m", e.student, "-p", e.prompts, "-o",
                                               e.w / "d"],
         "holds no run written by tip", lambda e: e.write("d/notes.txt", "x")),
    Case("eval-output-earlier-results", lambda e: ["eval", "-m", e.student, "-p", e.prompts,
                                                   "-o", e.w / "d"],
         "earlier eval run", lambda e: (e.write("d/summary.json", "{}"),
                                          e.write("d/results.jsonl", ""))),
    Case("demo-models-without-a-pair", lambda e: ["demo", "--models", e.w / "m", "-o",
                                                  e.w / "o"],
         "holds no model at", lambda e: (e.w / "m").mkdir()),
    Case("distill-output-foreign-dir", lambda e: ["distill", "-s", e.student, "-t", e.teacher,
                                                  "-p", e.prompts, "-o", e.w / "d"],
         "holds no run written by tip", lambda e: e.write("d/notes.txt", "x")),
    # --- damaged stage directories ------------------------------------------------------
    *[Case(f"damaged-{name}", lambda e, c=change: [SELECT, e.w / "x", "-o", e.w / "o"], needle,
           lambda e, c=change: (e.copy(e.score, "x"), e.edit_manifest(e.w / "x", c)))
      for name, change, needle in [
          ("no-shards", lambda m: m.pop("shards"), "lacks a valid 'shards'"),
          ("no-tokenizer", lambda m: m.pop("tokenizer"), "lacks a valid 'tokenizer'"),
          ("shard-without-file", lambda m: m["shards"][0].pop("file"), "without a plain file"),
          ("shard-path-escapes", lambda m: m["shards"][0].update(file="../../x"),
           "without a plain file"),
          ("schema-version-string", lambda m: m.update(schema_version="1"),
           'schema_version "1"'),
          ("schema-version-2", lambda m: m.update(schema_version=2), "schema_version 2"),
          ("incomplete", lambda m: m.update(complete=False), "is incomplete"),
          ("lists-no-shards", lambda m: m.update(shards=[]), "lists no shards")]],
    Case("damaged-manifest-is-a-list", lambda e: [SELECT, e.w / "x", "-o", e.w / "o"],
         "is not a JSON object", lambda e: (e.copy(e.score, "x"), e.write(
             "x/manifest.json", "[" + (e.score / "manifest.json").read_text() + "]"))),
    Case("damaged-torn-manifest", lambda e: [SELECT, e.w / "x", "-o", e.w / "o"],
         "is not valid JSON", lambda e: (e.copy(e.score, "x"), (e.w / "x/manifest.json")
                                         .write_text('{"schema_version": 1, "stage": "sc'))),
    Case("damaged-shard-missing", lambda e: [SELECT, e.w / "x", "-o", e.w / "o"], "is missing",
         lambda e: (e.copy(e.score, "x"), (e.w / "x/shard-00001.safetensors").unlink())),
    Case("damaged-shard-size", lambda e: [SELECT, e.w / "x", "-o", e.w / "o"],
         "bytes, not the",
         lambda e: (e.copy(e.score, "x"), e.write("x/shard-00000.safetensors", b"\0" * 64))),
    Case("damaged-shard-checksum", lambda e: [SELECT, e.w / "x", "-o", e.w / "o",
                                              "--verify-checksums"],
         "does not match the checksum", lambda e: (e.copy(e.score, "x"),
                                                   _flip_last_byte(e.w / "x"))),
    Case("damaged-shard-header-checksum-fixed", lambda e: [SELECT, e.w / "x", "-o", e.w / "o",
                                                           "--verify-checksums"],
         "not a readable safetensors file", lambda e: (
             e.copy(e.score, "x"), e.write("x/shard-00000.safetensors", b"\xff" * 64),
             e.edit_manifest(e.w / "x", lambda m: m["shards"][0].update(
                 sha256=hashlib.sha256(b"\xff" * 64).hexdigest(), bytes=64)))),
    Case("selection-config-unknown-key", lambda e: ["report", e.w / "sel"],
         "holds settings this tip cannot use", lambda e: (
             e.copy(e.score, "x"), _sel(e, e.w / "x", e.w / "sel"),
             e.edit_manifest(e.w / "sel", lambda m: m["config"].update(sharpness=2)))),
    Case("selection-parent-rewritten", lambda e: _train_args(e, e.w / "sel", e.w / "t"),
         "was rewritten after", lambda e: (
             e.copy(e.score, "x"), _sel(e, e.w / "x", e.w / "sel"),
             e.edit_manifest(e.w / "x", lambda m: m["summary"].update(note="changed")))),
    Case("report-parent-rewritten", lambda e: ["report", e.w / "sel"], "was rewritten after",
         lambda e: (e.copy(e.score, "x"), _sel(e, e.w / "x", e.w / "sel"),
                    e.edit_manifest(e.w / "x", lambda m: m["summary"].update(note="x")))),
    Case("stage-dir-of-wrong-kind", lambda e: [SELECT, e.rollout, "-o", e.w / "o"],
         "expected a score directory"),
    Case("report-on-rollout", lambda e: ["report", e.rollout], "expected a score or select"),
    # --- stale re-runs ----------------------------------------------------------------
    Case("rerun-after-prompts-changed", lambda e: _rollout_args(e), "the prompts changed",
         lambda e: (_stale_rollout(e), (e.w / "p.jsonl").open("a").write('{"prompt": "c"}\n'))),
    Case("rerun-after-model-replaced", lambda e: _rollout_args(e), "the student model's files",
         _touch_weights),
    Case("rerun-with-other-settings", lambda e: _rollout_args(e, "--temperature", "0.5"),
         "its settings differ", _stale_rollout),
    Case("train-unfinished-without-resume", lambda e: _train_args(e, e.score, e.w / "t",
                                                                  "--save-every", "1"),
         "--resume", _trained),
    Case("train-resume-nothing", lambda e: _train_args(e, e.score, e.w / "t", "--resume"),
         "holds no train run"),
    Case("train-resume-and-overwrite", lambda e: _train_args(e, e.score, e.w / "t", "--resume",
                                                             "--overwrite"), "exclude"),
    # --- models, stdin ------------------------------------------------------------------
    Case("model-path-typo-dot", lambda e: ["rollout", "-s", "./no-such-model", "-p", e.prompts,
                                           "-o", e.w / "o"], "does not exist"),
    Case("model-path-typo-in-local-folder", lambda e: [
        "rollout", "-s", e.w / "no-such-model", "-p", e.prompts, "-o", e.w / "o"],
        "does not exist"),
    Case("teacher-is-a-text-file", lambda e: [SCORE, e.rollout, "-t", e.write("t.txt", "x"),
                                              "-o", e.w / "o"], "not a .gguf file"),
    Case("stdin-dash-empty", lambda e: [SELECT, "-", "-o", e.w / "o"], "stdin", stdin=""),
    Case("vllm-not-installed", lambda e: ["rollout", "-s", e.student, "-p", e.prompts, "-o",
                                          e.w / "o", "--backend", "vllm"],
         "pip install 'tipcli[vllm]'"),
    *[Case(f"{cmd}-device-{dev}-absent", lambda e, c=cmd, d=dev: {
        "rollout": ["rollout", "-s", e.student, "-p", e.prompts, "-o", e.w / "o"],
        "score": [SCORE, e.rollout, "-t", e.teacher, "-o", e.w / "o"],
        "eval": ["eval", "-m", e.student, "-p", e.prompts],
        "train": _train_args(e, e.score, e.w / "o"),
        "distill": ["distill", "-s", e.student, "-t", e.teacher, "-p", e.prompts, "-o",
                    e.w / "o"]}[c] + ["--device", d], f"no {dev.upper()} device")
      for cmd, dev in [("rollout", "mps"), ("score", "mps"), ("eval", "xpu"),
                       ("distill", "mps"),
                       *([] if torch.cuda.is_available() else [("train", "cuda")])]],
    Case("eval-unknown-verifier", lambda e: ["eval", "-m", e.student, "-p", e.prompts,
                                             "--verifier", "magic"], "--verifier"),
    # --- a served teacher's answers, in-process statistics, the teacher's context ------
    # (SERVED-CASES)
    Case("served-url-unclosed-ipv6", lambda e: _served(e, "--teacher-url", "http://[::1"),
         "--teacher-url 'http://[::1' is not a valid address"),
    Case("served-url-port-not-a-number", lambda e: _served(e, "--teacher-url",
                                                           "http://127.0.0.1:abc"),
         "is not a valid address"),
    Case("served-url-with-a-query", lambda e: _served(e, "--teacher-url",
                                                      "http://127.0.0.1:8000/v1?key=x"),
         "is not a server's address"),
    Case("served-with-shard-teacher", lambda e: _served(e, "--teacher-url", "http://127.0.0.1:9",
                                                        "--shard-teacher"),
         "drop --shard-teacher"),
    *[Case(f"served-teacher-timeout-{v}", lambda e, v=v: _served(
        e, "--teacher-url", "http://127.0.0.1:9", "--teacher-timeout", v), "--teacher-timeout")
      for v in ("0", "-1", "nan")],
    Case("teacher-context-shorter-than-the-sequences", lambda e: [
        SCORE, e.rollout, "-t", e.w / "t", "-o", e.w / "o"],
        "has a context of 16 tokens", _short_teacher),
    Case("teacher-with-nan-weights", lambda e: [SCORE, e.rollout, "-t", e.w / "t", "-o",
                                                e.w / "o"],
         "teacher_logprob is NaN or infinite", _nan_teacher),
    # --- sharded checkpoints, settings files, processes that disagree -----------------
    # (DIST-CASES)
    Case("settings-file-date", lambda e: [SELECT, e.score, "-o", e.w / "o", "--config",
                                          e.write("c.toml", "seed = 2024-01-01\n")],
         "'seed' is a date (2024-01-01)"),
    Case("settings-file-datetime-yaml", lambda e: [
        SELECT, e.score, "-o", e.w / "o", "--config",
        e.write("c.yaml", "seed: 2024-01-01 10:00:00\n")], "'seed' is a datetime"),
    Case("settings-file-setting-twice", lambda e: [
        SELECT, e.score, "-o", e.w / "o", "--config",
        e.write("c.toml", "keep = 0.3\n[selection]\nkeep = 0.6\n")],
        "sets --keep twice, as 'keep' and as 'selection.keep'"),
    *[Case(f"resume-fsdp-{name}-in-sharded", lambda e, n=name: [
        *_train_args(e, e.score, e.w / "t", "--resume", "--save-every", "1", "--fsdp")],
        f"sharded/{name}.safetensors is not listed in", lambda e, n=name: _planted_shard(e, n))
      for name in ("extra", "notes")],
    # --- prompts, reports, messages, commands a newcomer trips on ----------------------
    # (UX-CASES)
    *[Case(f"messages-content-{name}", lambda e, c=content: [
        "rollout", "-s", e.student, "-p", _json(e, "p.jsonl", {"messages": [
            {"role": "user", "content": c}]}), "-o", e.w / "o"], f"content is {kind}")
      for name, content, kind in [("object", {"text": "hi"}, "an object"),
                                  ("null", None, "null"), ("list", ["hi"], "a list")]],
    Case("rerun-names-the-changed-setting", lambda e: _rollout_args(e, "--temperature", "0.5"),
         "--temperature was 1.0, now 0.5", _stale_rollout),
    Case("max-memory-names-an-absent-device", lambda e: [
        SCORE, e.rollout, "-t", e.teacher, "-o", e.w / "o", "--device-map", "auto",
        "--max-memory", "99=70GiB" if torch.cuda.is_available() else "0=70GiB"],
        "--max-memory"),
    *[Case(f"student-{name}", lambda e, f=flags: ["student", e.teacher, "-o", e.w / "o", *f],
           needle) for name, flags, needle in [
        ("layer-out-of-range", ["--drop-layers", "3"], "names layer 3, but"),
        ("keep-layer-out-of-range", ["--keep-layers", "0,7"], "numbered 0 to 2"),
        ("drops-every-layer", ["--drop-layers", "0-2"], "removes all 3 decoder layers"),
        ("layer-twice", ["--drop-layers", "1,1"], "names layer 1 twice"),
        ("not-a-layer", ["--drop-layers", "one"], "cannot read 'one'"),
        ("no-layers-named", [], "--drop-layers or --keep-layers is required"),
        ("drop-and-keep", ["--drop-layers", "1", "--keep-layers", "0"], "exclude each other")]],
    # --- Ctrl-C -------------------------------------------------------------------------
    Case("ctrl-c-select", lambda e: [SELECT, e.score, "-o", e.w / "o"],
         "run the same command again", code=130, interrupt="tipcli.stages.select:select_tokens"),
    Case("ctrl-c-train", lambda e: _train_args(e, e.score, e.w / "o", "--save-every", "1"),
         "--resume", code=130, interrupt="tipcli.trainer.loop:train_step"),
    Case("ctrl-c-rollout", lambda e: ["rollout", "-s", e.student, "-p", e.prompts, "-o",
                                      e.w / "o", "--max-new-tokens", "3"],
         "keeps everything that was complete", code=130,
         interrupt="tipcli.engines.hf:batch_seed"),
]


@pytest.fixture(scope="session")
def tiny_selection(tiny_score, tmp_path_factory) -> Path:
    return _sel(None, tiny_score, tmp_path_factory.mktemp("bad") / "select")


def _digest(roots: list[Path]) -> dict[str, str]:
    out = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            if p.is_file() and not p.is_symlink():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def test_every_command_has_bad_input_cases():
    """Each of tip's commands is among the table's cases, and no two cases share an id."""
    from test_cli import COMMANDS

    paths = Env(*(Path(f"/unused/{n}") for n in ("s", "t", "p", "r", "sc", "se", "w")))
    tried = {str(c.args(paths)[0]) for c in CASES}
    assert sorted(set(COMMANDS) - tried) == []
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, tiny_pair, prompts_file, tiny_rollout, tiny_score, tiny_selection,
                   tmp_path, monkeypatch):
    e = Env(tiny_pair[0], tiny_pair[1], prompts_file, tiny_rollout, tiny_score, tiny_selection,
            tmp_path / "w")
    e.w.mkdir()
    if case.setup:
        case.setup(e)
    if case.chdir:
        monkeypatch.chdir(case.chdir(e))
    if case.interrupt:
        import importlib

        module, attr = case.interrupt.split(":")

        def stop(*a, **kw):
            raise KeyboardInterrupt

        monkeypatch.setattr(importlib.import_module(module), attr, stop)
    roots = [e.w, *tiny_pair, tiny_rollout, tiny_score, tiny_selection, prompts_file.parent]
    before = _digest(roots)
    r = runner.invoke(app, [str(a) for a in case.args(e)], input=case.stdin)
    assert r.exit_code == case.code, r.output
    assert "Traceback" not in r.output, r.output
    err = r.stderr.strip()
    assert err.startswith("error:") and len(err.splitlines()) <= 2, err
    assert case.needle in err, err
    after = _digest(roots)
    changed = [p for p in before if after.get(p) != before[p]]
    assert not changed, f"changed or removed: {changed}"


def test_a_byte_order_mark_is_read(prompts_file, tmp_path):
    """Editors and spreadsheet exports often start a UTF-8 file with a byte-order mark: a
    prompts file or a settings file with one reads as the same file without it."""
    from tipcli.models.prompts import load_prompts
    from tipcli.settings import load_config_file

    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + prompts_file.read_bytes())
    assert load_prompts(str(bom)) == load_prompts(str(prompts_file))
    for name, text in (("c.json", '{"keep": 0.2}'), ("c.toml", "keep = 0.2\n"),
                       ("c.yaml", "keep: 0.2\n")):
        f = tmp_path / name
        f.write_bytes(b"\xef\xbb\xbf" + text.encode())
        assert load_config_file(f, SelectConfig) == {"keep": 0.2}
