"""`tip report`: numbers against an independent computation, PNG, export, errors."""

import json
import math

import pytest
from typer.testing import CliRunner

from tipcli.cli import app
from tipcli.configs import resolve
from tipcli.stages.select import SelectConfig, run_select
from tipcli.store.stagedir import StageDir

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_select(tiny_score, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "sel"
    return run_select(resolve(SelectConfig, score=str(tiny_score), output=str(out),
                              strategy="soft-or", keep=0.5, group_size=5))


def _tokens(sel_dir, score_dir):
    """Plain Python lists per token: sequence, position, length and every field."""
    rows = []
    sel = StageDir.open(sel_dir)
    for _i, (m, s) in enumerate(zip(sel.iter_shards(), StageDir.open(score_dir).iter_shards())):
        off = s["response_offsets"].tolist()
        for n in range(len(off) - 1):
            for t in range(off[n], off[n + 1]):
                rows.append({"pos": t - off[n], "len": off[n + 1] - off[n],
                             "H": float(s["student_entropy"][t]), "rkl": float(s["rkl"][t]),
                             "lp": float(s["teacher_logprob"][t]), "h": float(m["h"][t]),
                             "d": float(m["d"][t]), "q": int(m["quadrant"][t]),
                             "sel": bool(m["selected"][t])})
    return rows


def test_report_json_equals_independent_computation(tiny_score, tiny_select, tmp_path):
    out = tmp_path / "r.json"
    r = runner.invoke(app, ["report", str(tiny_select), "--json", str(out)])
    assert r.exit_code == 0, r.output
    assert r.stdout.strip().splitlines()[-1] == str(tiny_select)
    assert "Q3 low h" in r.stderr and "soft-or-bottom" in r.stderr
    rep = json.loads(out.read_text())
    toks = _tokens(tiny_select, tiny_score)
    assert rep["tokens"]["candidates"] == len(toks)
    assert rep["tokens"]["selected"] == sum(t["sel"] for t in toks)
    for row in rep["quadrants"]:
        q = [t for t in toks if t["q"] == int(row["quadrant"][1])]
        assert row["tokens"] == len(q)
        assert row["share"] == pytest.approx(len(q) / len(toks))
        assert row["mean_entropy"] == pytest.approx(sum(t["H"] for t in q) / len(q), rel=1e-5)
        assert row["mean_divergence"] == pytest.approx(sum(t["rkl"] for t in q) / len(q),
                                                       rel=1e-5)
        assert row["mean_teacher_logprob"] == pytest.approx(sum(t["lp"] for t in q) / len(q),
                                                            rel=1e-5)
        assert row["selected"] == sum(t["sel"] for t in q)
    counts = [[0] * 10 for _ in range(10)]
    for t in toks:
        counts[min(int(t["d"] * 10), 9)][min(int(t["h"] * 10), 9)] += 1
    assert rep["histogram"]["counts"] == counts
    for row in rep["positions"]:
        f = [t for t in toks if math.floor(5 * t["pos"] / t["len"]) == row["fifth"] - 1]
        assert row["tokens"] == len(f)
        for c in range(1, 5):
            assert row[f"Q{c}"] == pytest.approx(sum(t["q"] == c for t in f) / len(f))


def test_report_coverage_of_divergence_strategy(tiny_score, tiny_select, tmp_path):
    """Top-K by d per sequence keeps a mass any tie-break agrees on; entropy overlaps itself."""
    out = tmp_path / "r.json"
    assert runner.invoke(app, ["report", str(tiny_select), "--json", str(out)]).exit_code == 0
    rep = json.loads(out.read_text())
    toks = _tokens(tiny_select, tiny_score)
    total = sum(t["rkl"] for t in toks)
    seqs, a = [], 0
    while a < len(toks):
        seqs.append(toks[a:a + toks[a]["len"]])
        a += toks[a]["len"]
    for keep in (0.1, 0.2, 0.5):
        kept = 0.0
        for seq in seqs:
            k = max(1, math.floor(len(seq) * keep + 1e-9))
            kept += sum(t["rkl"] for t in sorted(seq, key=lambda t: -t["d"])[:k])
        row = next(r for r in rep["coverage"] if r["strategy"] == "divergence"
                   and r["keep"] == keep)
        assert row["divergence_mass"] == pytest.approx(kept / total, rel=1e-5)
        ent = next(r for r in rep["coverage"] if r["strategy"] == "entropy" and r["keep"] == keep)
        assert ent["overlap_entropy"] == 1.0
    curves = rep["curves"]["divergence_mass"]
    assert set(curves) >= {"soft-or", "entropy-sample", "q3"}
    assert curves["divergence"][-1] == pytest.approx(1.0)


def test_report_png_and_score_dir_export(tiny_score, tmp_path):
    import matplotlib.image
    from datasets import load_dataset

    png, jl, pq = tmp_path / "r.png", tmp_path / "t.jsonl", tmp_path / "t.parquet"
    r = runner.invoke(app, ["report", str(tiny_score), "--png", str(png), "--export", str(jl)])
    assert r.exit_code == 0, r.output
    img = matplotlib.image.imread(png)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 200
    r = runner.invoke(app, ["report", str(tiny_score), "--export", str(pq)])
    assert r.exit_code == 0, r.output
    score = StageDir.open(tiny_score)
    seqs = list(score.iter_sequences())
    for kind, path in (("json", jl), ("parquet", pq)):
        ds = load_dataset(kind, data_files=str(path), split="train")
        assert len(ds) == len(seqs)
        for row, seq in zip(ds, seqs):
            m = len(seq["response_ids"])
            assert row["response_ids"] == seq["response_ids"].tolist()
            assert row["prompt_ids"] == seq["prompt_ids"].tolist()
            for name in ("entropy", "rkl", "fkl", "jsd", "student_logprob", "teacher_logprob",
                         "h", "d", "soft_or", "quadrant", "selected"):
                assert len(row[name]) == m, name
            assert row["selected"] == [True] * m  # a score directory: everything selected
            assert set(row["quadrant"]) <= {"Q1", "Q2", "Q3", "Q4"}
            assert row["rkl"] == pytest.approx(seq["rkl"].tolist(), rel=1e-6)
            assert isinstance(row["response_text"], str) and row["response_text"]


def test_report_show_marks_tokens(tiny_select):
    r = runner.invoke(app, ["report", str(tiny_select), "--show", "2"])
    assert r.exit_code == 0, r.output
    assert "legend" in r.stderr and "[0]" in r.stderr and "[1]" in r.stderr
    assert "[2]" not in r.stderr


def test_report_bad_inputs(tiny_rollout, tmp_path):
    r = runner.invoke(app, ["report", str(tiny_rollout)])
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert r.stderr.strip().count("\n") == 0 and "expected a score or select" in r.stderr
    r = runner.invoke(app, ["report", str(tmp_path), "--export", str(tmp_path / "x.csv")])
    assert r.exit_code == 2 and "--export must end in .jsonl or .parquet" in r.stderr
