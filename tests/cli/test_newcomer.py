"""What a new user trips on: a report on a pair that does not diverge, the report's PNG,
a hub id without a network, iteration numbers, summary lines, progress off a terminal,
`tip student`, the package's metadata. (Bad inputs are rows of test_bad_inputs.py.)"""

from __future__ import annotations

import importlib.util
import io
import json
import socket
import threading
import time
import tomllib
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import torch
from conftest import assert_one_line_error, free_port
from safetensors.torch import load_file
from typer.testing import CliRunner

from tipcli.cli import app
from tipcli.configs import ReportConfig, ScoreConfig, SelectConfig, StudentConfig, resolve

runner = CliRunner()
REPO = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------- report


@pytest.fixture(scope="module")
def same_pair_selection(tiny_pair, tiny_rollout, tmp_path_factory) -> Path:
    """A selection over the score of the student against itself: every divergence is 0."""
    from tipcli.stages.score import run_score
    from tipcli.stages.select import run_select

    d = tmp_path_factory.mktemp("same")
    score = run_score(resolve(ScoreConfig, rollout=str(tiny_rollout), teacher=str(tiny_pair[0]),
                              output=str(d / "score"), teacher_top_k=8))
    return run_select(resolve(SelectConfig, score=str(score), output=str(d / "sel"),
                              keep=0.3))


def test_report_says_the_pair_does_not_diverge(same_pair_selection, tmp_path):
    out = tmp_path / "r.json"
    r = runner.invoke(app, ["report", str(same_pair_selection), "--json", str(out)])
    assert r.exit_code == 0, r.output
    notes = [ln for ln in r.stderr.splitlines() if ln.startswith("note:")]
    assert len(notes) == 1 and "do not diverge" in notes[0], r.stderr
    rep = json.loads(out.read_text())
    assert len(rep["notes"]) == 1 and "do not diverge" in rep["notes"][0]


def test_report_table_and_png_use_one_quadrant_rule(same_pair_selection):
    """d = 0 everywhere is at its median 0, "high" by the rule: the table puts every token
    in Q1 or Q3, and the picture labels those quadrants, not Q2 or Q4."""
    from tipcli.stages.report import compute_report, load_report_data
    from tipcli.stages.report.render import figure, labelled_quadrants

    numbers = compute_report(load_report_data(resolve(ReportConfig,
                                                      path=str(same_pair_selection))))
    rows = {r["quadrant"]: r["tokens"] for r in numbers["quadrants"]}
    assert rows["Q2"] == rows["Q4"] == 0 and rows["Q1"] + rows["Q3"] > 0
    assert numbers["median_thresholds"][1] == 0
    labelled = {name for name, _, _ in labelled_quadrants(*numbers["median_thresholds"])}
    assert labelled == {"Q1", "Q3"}
    fig = figure(numbers)
    texts = [t.get_text().split()[0] for t in fig.axes[0].texts]
    assert sorted(texts) == ["Q1", "Q3"]
    assert labelled_quadrants(0.4, 0.3) == [("Q1", True, True), ("Q2", True, False),
                                            ("Q3", False, True), ("Q4", False, False)]


def test_report_png_names_the_run_and_keeps_its_labels_inside(tiny_score, tmp_path):
    """The title names the directory, strategy and keep; every quadrant label lies inside
    the heat map (the Q3 label used to be cut at the left edge, even at a low tau_h)."""
    from tipcli.stages.report import compute_report, load_report_data
    from tipcli.stages.report.render import figure
    from tipcli.stages.select import run_select

    sel = run_select(resolve(SelectConfig, score=str(tiny_score), output=str(tmp_path / "my-run"),
                             strategy="entropy", keep=0.2))
    numbers = compute_report(load_report_data(resolve(ReportConfig, path=str(sel))))
    for tau_h in (numbers["median_thresholds"][0], 0.02):
        numbers["median_thresholds"][0] = tau_h
        fig = figure(numbers)
        assert "my-run" in fig._suptitle.get_text()
        assert "strategy entropy, keep 0.2" in fig._suptitle.get_text()
        fig.canvas.draw()
        ax = fig.axes[0]
        box = ax.get_window_extent()
        assert len(ax.texts) == 4
        for t in ax.texts:
            inner = t.get_window_extent()
            assert box.x0 <= inner.x0 and inner.x1 <= box.x1, t.get_text()
            assert box.y0 <= inner.y0 and inner.y1 <= box.y1, t.get_text()


# ----------------------------------------------------------------------------- the hub


@pytest.fixture
def online(monkeypatch, tmp_path):
    """HF_HUB_OFFLINE unset (conftest sets it), an empty hub cache; yields a function that
    points the hub at an endpoint."""
    from huggingface_hub import constants

    from tipcli.models import loading as models

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    models._hub_problem.cache_clear()
    yield lambda url: monkeypatch.setattr(constants, "ENDPOINT", url)
    models._hub_problem.cache_clear()


def test_hub_id_without_network_fails_in_seconds(online, prompts_file, tmp_path):
    """Nothing listens at the hub's address: one line at once, not a minute of retries."""
    online(f"http://127.0.0.1:{free_port()}")
    started = time.monotonic()
    r = runner.invoke(app, ["rollout", "-s", "someorg/somemodel", "-p", str(prompts_file), "-o",
                            str(tmp_path / "o")])
    assert_one_line_error(r, "someorg/somemodel", "cannot be reached", "no copy is in the cache")
    assert time.monotonic() - started < 15
    assert not (tmp_path / "o").exists()


def test_hub_that_does_not_answer_times_out(online, monkeypatch):
    """A hub that takes the connection but never answers (a black-holed network)."""
    from tipcli.models import loading as models

    monkeypatch.setattr(models, "HUB_TIMEOUT", 0.5)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        online(f"http://127.0.0.1:{silent.getsockname()[1]}")
        started = time.monotonic()
        problem = models.hub_problem()
    assert problem and "cannot be reached" in problem
    assert time.monotonic() - started < 5


def test_hub_that_answers_loads_as_before(online):
    """Any answer, even an error status, means the network is there: no local-only loading."""
    from tipcli.models import loading as models

    class Hub(BaseHTTPRequestHandler):
        def do_HEAD(self):
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        online(f"http://127.0.0.1:{server.server_address[1]}")
        assert models.hub_problem() is None
        assert models._hub_options(models.ModelSpec("org/name", "org/name")) == {}
    finally:
        server.shutdown()
        server.server_close()


# ----------------------------------------------------------------------------- distill


HISTORY = [{"iteration": "initial", "accuracy": 0.5, "interval_95": [0.4, 0.6]},
           {"iteration": 0, "mean_rkl": 0.3, "train_loss": 0.2, "accuracy": 0.6,
            "interval_95": [0.5, 0.7]},
           {"iteration": 1, "mean_rkl": 0.2, "train_loss": 0.1, "accuracy": 0.7,
            "interval_95": [0.6, 0.8]}]


def test_distill_table_counts_iterations_as_its_progress_lines(capsys):
    from tipcli.stages.distill import _render

    _render(HISTORY)
    rows = [ln.strip("│┃ ").split()[0] for ln in capsys.readouterr().err.splitlines()
            if ln.startswith("│")]
    assert rows == ["initial", "1", "2"]


def test_demo_summary_counts_iterations_from_one(monkeypatch, capsys, tmp_path):
    from tipcli.stages import demo

    class Run:
        manifest = {"summary": {"history": HISTORY}}

    monkeypatch.setattr(demo, "run_report", lambda cfg: None)
    monkeypatch.setattr(demo.StageDir, "open", lambda path, stage: Run())
    demo._summarise(tmp_path, 2, 1.0)
    err = capsys.readouterr().err
    assert "after iteration 1:" in err and "after iteration 2:" in err
    assert "after iteration 0" not in err


# ----------------------------------------------------------------------------- summaries


def test_select_and_train_print_one_summary_line(tiny_score, tmp_path):
    r = runner.invoke(app, ["select", str(tiny_score), "-o", str(tmp_path / "s"), "--keep",
                            "0.2", "--strategy", "entropy"])
    assert r.exit_code == 0, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("select:")]
    assert len(lines) == 1 and "candidate tokens" in lines[0], r.stderr
    assert "strategy entropy" in lines[0] and "keep 0.2" in lines[0]
    args = ["train", str(tmp_path / "s"), "-o", str(tmp_path / "t"), "--max-steps", "2",
            "--train-batch-size", "4", "--lr", "1e-3", "--train-chunk-size", "16"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("train: 2 steps")]
    assert len(lines) == 1 and "final loss" in lines[0] and lines[0].endswith(" s"), r.stderr
    assert r.stdout.strip().splitlines()[-1] == str(tmp_path / "t")


def test_progress_off_a_terminal_prints_only_plain_lines():
    from rich.console import Console
    from rich.progress import BarColumn, TextColumn

    from tipcli.progress import LoggedProgress

    for terminal in (False, True):
        buf = io.StringIO()
        console = Console(file=buf, width=80, force_terminal=terminal)
        with LoggedProgress(TextColumn("{task.description}"), BarColumn(),
                            console=console) as bar:
            task = bar.add_task("train", total=4)
            for _ in range(4):
                bar.update(task, advance=1)
        lines = buf.getvalue().splitlines()
        if terminal:
            assert "━" in buf.getvalue() and not bar.plain
        else:
            assert [ln.split(" (")[0] for ln in lines] == [f"train: {i}/4" for i in (1, 2, 3, 4)]


# ----------------------------------------------------------------------------- tip student


def _student(teacher, out, *flags):
    return runner.invoke(app, ["student", str(teacher), "-o", str(out), *flags])


def test_student_drops_layers(tiny_pair, tmp_path):
    from transformers import AutoModelForCausalLM

    from tipcli.store.layout import STUDENT
    from tipcli.store.stagedir import StageDir

    teacher = tiny_pair[1]
    r = _student(teacher, tmp_path / "s", "--drop-layers", "1")
    assert r.exit_code == 0, r.output
    assert r.stdout.strip().splitlines()[-1] == str(tmp_path / "s")
    assert "student: 2 of 3 decoder layers kept (removed 1)" in r.stderr
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "s")
    assert model.config.num_hidden_layers == 2 and len(model.model.layers) == 2
    before, after = load_file(teacher / "model.safetensors"), model.state_dict()
    assert len(after) == len(before) - sum(k.startswith("model.layers.1.") for k in before)
    for key, value in after.items():
        assert torch.equal(value, before[key.replace("layers.1.", "layers.2.")]), key
    summary = StageDir.open(tmp_path / "s", stage="student").manifest["summary"]
    assert (summary["kept_layers"], summary["removed_layers"]) == ([0, 2], [1])
    import fnmatch
    assert all(any(fnmatch.fnmatch(p.name, pat) for pat in STUDENT.patterns)
               for p in (tmp_path / "s").iterdir())
    r = _student(teacher, tmp_path / "k", "--keep-layers", "0,2")
    assert r.exit_code == 0, r.output
    assert load_file(tmp_path / "k" / "model.safetensors").keys() == after.keys()
    stamp = (tmp_path / "s" / "model.safetensors").stat().st_mtime_ns
    assert _student(teacher, tmp_path / "s", "--drop-layers", "1").exit_code == 0
    assert (tmp_path / "s" / "model.safetensors").stat().st_mtime_ns == stamp  # finished


def test_cut_layers_keeps_a_tied_head(tmp_path):
    from transformers import AutoModelForCausalLM

    from tipcli.models.tiny import build_model, build_tokenizer
    from tipcli.stages.student import cut_layers

    teacher = build_model(build_tokenizer(), layers=4, tied=True)
    cut_layers(teacher, [0, 3]).save_pretrained(tmp_path / "s")
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "s")
    assert student.config.num_hidden_layers == 2
    assert student.lm_head.weight.data_ptr() == student.model.embed_tokens.weight.data_ptr()
    assert torch.equal(student.model.layers[1].mlp.up_proj.weight,
                       teacher.model.layers[3].mlp.up_proj.weight)
    ids = torch.tensor([[5, 6, 7]])
    assert torch.isfinite(student(ids).logits).all()


def test_smollm2_example_cuts_its_student_with_tip_student(tiny_pair, tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("smollm2_run",
                                                  REPO / "examples" / "smollm2" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setenv("TIP_CACHE", str(tmp_path))
    monkeypatch.setattr(module, "LEAST_HARMFUL", [1, 0, 2])
    out = module.build_student(str(tiny_pair[1]), removed=1)
    assert out == tmp_path / "smollm2" / "student-minus1"
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 2
    assert module.build_student(str(tiny_pair[1]), removed=1) == out


def test_student_config_reads_layer_lists():
    from tipcli.configs import parse_layers

    assert parse_layers("5,7,12") == [5, 7, 12] and parse_layers("0-3, 8") == [0, 1, 2, 3, 8]
    cfg = resolve(StudentConfig, teacher="t", output="o", keep_layers="0-1")
    assert cfg.keep_layers == "0-1"


# ----------------------------------------------------------------------------- packaging


def test_license_is_an_spdx_string():
    """setuptools deprecates the TOML table (it warned twice on every `make venv`)."""
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert meta["project"]["license"] == "Apache-2.0"
    assert "setuptools>=77" in meta["build-system"]["requires"]
