"""`tip select`: files written, the library interface, errors, determinism."""

from pathlib import Path

import pytest
import torch
from conftest import assert_one_line_error
from typer.testing import CliRunner

from tipcli.cli import app
from tipcli.configs import Selection, resolve, to_flat
from tipcli.errors import ConfigError
from tipcli.ops.selection import token_importance
from tipcli.stages.select import SELECT_TENSORS, SelectConfig, run_select, selection_by_shard
from tipcli.store.stagedir import StageDir

runner = CliRunner()


def _invoke(args, **kw):
    return runner.invoke(app, [str(a) for a in args], **kw)



def test_cli_select_writes_exactly_mask_shards(tiny_score, tmp_path):
    out = tmp_path / "sel"
    r = _invoke(["select", tiny_score, "--strategy", "soft-or", "--keep", 0.5, "-o", out])
    assert r.exit_code == 0, r.output
    assert r.stdout.strip().splitlines()[-1] == str(out)
    score = StageDir.open(tiny_score, stage="score")
    assert {p.name for p in out.iterdir()} == {"manifest.json"} | {s["file"] for s in score.shards}
    sel = StageDir.open(out, stage="select")
    assert sel.manifest["parent"]["stage"] == "score"
    assert sel.manifest["config"]["strategy"] == "soft-or"
    for i, entry in enumerate(sel.shards):
        shard = sel.load_shard(i)
        assert set(shard) == set(SELECT_TENSORS)
        assert torch.equal(shard["response_offsets"], score.load_shard(i)["response_offsets"])
        assert shard["selected"].dtype == torch.bool and shard["quadrant"].dtype == torch.uint8
        assert shard["h"].dtype == torch.float32 and shard["soft_or"].shape == shard["h"].shape
        assert entry["score_shard"] == score.shards[i]["file"]
        assert entry["num_selected"] == int(shard["selected"].sum())
    summary = sel.manifest["summary"]
    quads = summary["quadrants"]
    assert sum(q["tokens"] for q in quads.values()) == summary["candidate_tokens"]
    assert sum(q["kept"] for q in quads.values()) == summary["kept_tokens"]
    assert summary["candidate_tokens"] == score.num_tokens
    assert summary["thresholds"]["tau_h"] == "group median"


def test_select_reads_path_from_stdin(tiny_score, tmp_path):
    r = _invoke(["select", "-", "--strategy", "q3", "--keep", 0.2, "-o", tmp_path / "s"],
                input=f"{tiny_score}\n")
    assert r.exit_code == 0, r.output
    assert r.stdout.strip().splitlines()[-1] == str(tmp_path / "s")


def test_selection_by_shard_groups_span_shards(tiny_score):
    """Groups of 5 sequences over shards of 4: equal to one pass over the whole directory."""
    score = StageDir.open(tiny_score, stage="score")
    cfg = resolve(SelectConfig, score=str(tiny_score), output="-", group_size=5, keep=0.3)
    parts = selection_by_shard(score, cfg.selection, cfg.seed)
    assert len(parts) == len(score.shards)
    seqs = list(score.iter_sequences())
    lengths = torch.tensor([len(s["rkl"]) for s in seqs])
    off = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    cat = {k: torch.cat([s[k] for s in seqs]) for k in ("response_mask", "student_entropy",
                                                        "rkl", "fkl")}
    whole = token_importance(off, cat["response_mask"], cat["student_entropy"], cat["rkl"],
                       cat["fkl"], Selection(group_size=5, keep=0.3), 0, 100)
    for name in ("selected", "h", "d", "soft_or", "quadrant"):
        assert torch.equal(torch.cat([p[name] for p in parts]), whole[name]), name
    # the second group (sequences 5..9) straddles shards 1 and 2: its minmax h reaches 1 and 0
    h_g = whole["h"][off[5]:off[10]]
    assert h_g.max() == 1.0 and h_g.min() == 0.0
    for i, p in enumerate(parts):
        assert p["selected"].numel() == score.shards[i]["num_tokens"]


def test_exact_k_per_sequence_on_fixture(tiny_score):
    score = StageDir.open(tiny_score, stage="score")
    parts = selection_by_shard(score, Selection(keep=0.25, strategy="entropy-sample"), seed=3)
    sel = torch.cat([p["selected"] for p in parts])
    a = 0
    for seq in score.iter_sequences():
        m = len(seq["rkl"])
        assert int(sel[a:a + m].sum()) == max(1, int(m * 0.25 + 1e-9))
        a += m


def test_run_select_deterministic_and_resumes(tiny_score, tmp_path):
    cfg = resolve(SelectConfig, score=str(tiny_score), output=str(tmp_path / "a"),
                  strategy="random", seed=7)
    a = StageDir.open(run_select(cfg), stage="select")
    b = StageDir.open(run_select(resolve(SelectConfig, **{**to_flat(cfg),
                                                 "output": str(tmp_path / "b")})))
    for i in range(len(a.shards)):
        assert torch.equal(a.load_shard(i)["selected"], b.load_shard(i)["selected"])
    assert run_select(cfg) == Path(cfg.output)  # complete: returns without rewriting
    other = resolve(SelectConfig, **{**to_flat(cfg), "seed": 8})
    with pytest.raises(Exception, match="different select run"):
        run_select(other)


@pytest.mark.parametrize("keep", ["0", "1.5", "-0.1"])
def test_bad_keep_is_one_line_error(tiny_score, tmp_path, keep):
    r = _invoke(["select", tiny_score, "--keep", keep, "-o", tmp_path / "x"])
    assert_one_line_error(r, "--keep must be in (0, 1]")
    assert not (tmp_path / "x").exists()


def test_unknown_strategy_lists_valid_ones(tiny_score, tmp_path):
    r = _invoke(["select", tiny_score, "--strategy", "bogus", "-o", tmp_path / "x"])
    assert_one_line_error(r, "unknown strategy 'bogus'")
    for name in ("soft-or", "entropy-sample", "q3", "quadrant:Q1+Q3"):
        assert name in r.stderr


def test_rollout_dir_where_score_needed(tiny_rollout, tmp_path):
    r = _invoke(["select", tiny_rollout, "-o", tmp_path / "x"])
    assert_one_line_error(r, "is a rollout directory; expected a score directory")


def test_validate_collects_every_problem():
    with pytest.raises(ConfigError) as exc:
        resolve(SelectConfig, score="s", output="o", keep=2.0, strategy="nope", scope="batch",
                divergence="kl", group_size=0, tau_h=3.0)
    problems = exc.value.problems
    assert len(problems) == 6
    assert any(p.startswith("--keep must be in (0, 1]") for p in problems)


@pytest.mark.parametrize("cmd", ["select", "report"])
def test_help_lists_and_describes_commands(cmd):
    from test_cli import listed_commands

    assert cmd in listed_commands(runner.invoke(app, ["--help"]).stdout)
    r = runner.invoke(app, [cmd, "--help"])
    assert r.exit_code == 0 and "Usage" in r.stdout
    for flag in ({"select": ["--strategy", "--keep", "--scope", "--tau-h", "--group-size"],
                  "report": ["--json", "--png", "--export", "--show"]}[cmd]):
        assert flag in r.stdout
