"""`tip distill`: the on-policy loop, rollout -> score -> select -> train, N times.

    tip distill --student S --teacher T --prompts prompts.jsonl --iterations 3 \
        --strategy soft-or --keep 0.5 --eval-prompts heldout.jsonl -o runs/distill

Iteration i samples from the student trained in iteration i-1 (the first from
``--student``). Every stage directory is kept under ``RUN/iter-NNN/``::

    RUN/manifest.json            the resolved settings (stage "distill") and a summary
    RUN/eval-initial/            the starting student's evaluation (with --eval-prompts)
    RUN/iter-000/prompts.jsonl   this iteration's prompts
    RUN/iter-000/rollout/ score/ select/ train/ eval/

A killed run, started again with the same command, skips the stages already complete
and resumes the one it was in (each stage resumes itself). Both models stay loaded for
the whole run: the student trained in one iteration samples the next, without a trip
through the disk. (Where sampling runs in bf16, on GPU, training reloads the float32
weights that the previous iteration saved, so no update is lost to rounding.)
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path
from typing import Any

import torch
from rich.table import Table

from tipcli.configs import (DistillConfig, EvalConfig, RolloutConfig, ScoreConfig, SelectConfig,
                            TrainConfig, to_flat, validate)
from tipcli.errors import TipError
from tipcli.evaluate import SUMMARY as EVAL_SUMMARY
from tipcli.evaluate import run_eval
from tipcli.files import write_atomic, write_json_atomic
from tipcli.models import (check_same_vocab, load_model, load_tokenizer, resolve_device,
                           resolve_dtype)
from tipcli.outputs import check_output
from tipcli.progress import console
from tipcli.prompts import load_prompts
from tipcli.rollout import run_rollout
from tipcli.score import run_score
from tipcli.select import run_select
from tipcli.shards import MANIFEST, SCHEMA_VERSION, StageDir, is_complete, read_manifest
from tipcli.tracking import Tracker, check_available
from tipcli.train import METRICS, train_model
from tipcli.train.checkpoint import checkpoint_dirs


def iter_dir(cfg: DistillConfig, i: int) -> Path:
    return Path(cfg.output) / f"iter-{i:03d}"


def run_distill(cfg: DistillConfig) -> Path:
    """Run (or resume) the loop; returns the run directory."""
    validate(cfg)
    check_available(cfg.training.report_to)
    check_output(cfg.output, "distill", (cfg.prompts, cfg.student, cfg.teacher, cfg.eval_prompts))
    rt = cfg.runtime
    records = load_prompts(cfg.prompts, cfg.source)
    s_tok = load_tokenizer(cfg.student, rt.trust_remote_code)
    check_same_vocab(s_tok, load_tokenizer(cfg.teacher, rt.trust_remote_code),
                     cfg.student, cfg.teacher)
    run = Path(cfg.output)
    _write_run_manifest(cfg, complete=False)
    device = resolve_device(rt.device)
    dtype = resolve_dtype(rt.dtype, device)
    teacher = load_model(cfg.teacher, device, dtype, rt.trust_remote_code)
    tracker = Tracker(cfg.training.report_to, run, "tip-distill", to_flat(cfg))
    engine = VLLMEngine(cfg, s_tok) if cfg.sampling.backend == "vllm" else None
    student_name, student, steps_before = cfg.student, None, 0
    history = []
    try:
        if cfg.eval_prompts:
            if not (run / "eval-initial" / EVAL_SUMMARY).is_file() and engine is None:
                student = load_model(student_name, device, dtype, rt.trust_remote_code)
            history.append({"iteration": "initial",
                            **_evaluate(cfg, cfg.student, run / "eval-initial", device,
                                        student, s_tok, engine and engine.sampler)})
            tracker.log(_eval_metrics(history[-1]), 0)
        for i in range(cfg.iterations):
            if student is None:
                student = load_model(student_name, device, dtype, rt.trust_remote_code)
            sampler = engine.serve(student_name, student) if engine else None
            select, row = _sample_score_select(cfg, i, records, student_name, student, teacher,
                                               s_tok, sampler)
            if student.dtype != torch.float32:  # bf16 for sampling; training reloads float32
                student = None
            train, student = _train(cfg, select, iter_dir(cfg, i) / "train", student, teacher,
                                    lambda m, offset=steps_before: tracker.log(
                                        m, offset + m["step"]))
            if student is not None:  # the trained student stays loaded for the next iteration
                student.to(dtype)
            steps_before += _train_steps(train)
            row["train_loss"] = _last_metrics(train).get("loss")
            student_name = str(train)
            if cfg.eval_prompts:
                if engine is not None and student is None:
                    student = load_model(student_name, device, dtype, rt.trust_remote_code)
                sampler = engine.serve(student_name, student) if engine else None
                row.update(_evaluate(cfg, student_name, iter_dir(cfg, i) / "eval", device,
                                     student, s_tok, sampler))
            if engine is not None:
                row["sampler_reload_seconds"] = engine.seconds[-1] if engine.seconds else None
            tracker.log({"iteration": i, "rollout_mean_rkl": row["mean_rkl"],
                         **_eval_metrics(row)}, steps_before)
            history.append(row)
    finally:
        tracker.close()
        if engine is not None:
            engine.sampler.close()
    _write_run_manifest(cfg, complete=True, summary={"history": history,
                                                     "final_student": student_name})
    _render(history)
    return run


def _eval_metrics(row: dict[str, Any]) -> dict[str, Any]:
    return {"eval/accuracy": row["accuracy"]} if "accuracy" in row else {}


class VLLMEngine:
    """The run's vLLM engine (``--backend vllm``): started once, and given each trained
    student's weights in place before it samples from them."""

    def __init__(self, cfg: DistillConfig, tok):
        from tipcli.vllm_sampler import VLLMSampler

        self.sampler = VLLMSampler(cfg.student, tok, cfg.runtime,
                                   gpu_memory=cfg.sampling.vllm_gpu_memory)
        self.holds, self.seconds = cfg.student, []  # whose weights it has; reload times

    def serve(self, name: str, model):
        """The sampler, holding the weights of ``name`` (``model`` is them, loaded)."""
        if name != self.holds:
            self.seconds.append(self.sampler.update_weights(model))
            self.holds = name
        return self.sampler


def _sample_score_select(cfg: DistillConfig, i: int, records, student_name: str, student,
                         teacher, tok, sampler=None) -> tuple[Path, dict[str, Any]]:
    """Rollout, score and select of iteration ``i`` on the loaded models (finished stages
    are kept); returns the selection directory and the iteration's summary row."""
    d = iter_dir(cfg, i)
    d.mkdir(parents=True, exist_ok=True)
    prompts = _iteration_prompts(cfg, i, records, d / "prompts.jsonl")
    rollout = run_rollout(validate(RolloutConfig(
        student=student_name, prompts=str(prompts), output=str(d / "rollout"),
        sampling=cfg.sampling, seed=cfg.seed * 1000 + i,
        shard_size=cfg.sampling.batch_size * 16, runtime=cfg.runtime)),
        model=student, tokenizer=tok, sampler=sampler)
    score = run_score(validate(ScoreConfig(
        rollout=str(rollout), teacher=cfg.teacher, output=str(d / "score"),
        student=student_name, scoring=cfg.scoring, runtime=cfg.runtime)),
        student=student, teacher=teacher, tokenizer=tok)
    select = run_select(validate(SelectConfig(score=str(score), output=str(d / "select"),
                                              selection=cfg.selection, seed=cfg.seed)))
    sd = StageDir.open(score, stage="score")
    kept = StageDir.open(select, stage="select").manifest["summary"]
    return select, {"iteration": i, "rollout_tokens": sd.num_tokens,
                    "mean_rkl": _mean(sd, "rkl"), "selection": kept}


def train_config(cfg: DistillConfig, select: Path, out: Path) -> TrainConfig:
    """The ``tip train`` settings of one iteration: the loop's own, on its CPU or GPU."""
    return validate(TrainConfig(
        input=str(select), output=str(out),
        teacher=cfg.teacher if cfg.training.loss.endswith("-full") else "",
        training=dataclasses.replace(cfg.training, report_to="none"),  # the loop logs
        selection=cfg.selection, optim=cfg.optim, seed=cfg.seed,
        save_every=max(1, cfg.optim.max_steps // 4) if cfg.optim.max_steps else 0,
        runtime=dataclasses.replace(cfg.runtime, device="cpu" if cfg.runtime.device == "cpu"
                                    else "auto")))


def _train(cfg: DistillConfig, select: Path, out: Path, student, teacher, on_step):
    """Train (or resume, or keep a finished) iteration; returns the directory and the
    trained student, or None where the stage had already finished."""
    tcfg = train_config(cfg, select, out)
    if is_complete(out):
        return out, None
    started = read_manifest(out) is not None
    resumable = started and bool(checkpoint_dirs(out))
    # the teacher is used only where the loss needs it (``tcfg.teacher`` set)
    return train_model(tcfg, overwrite=started and not resumable, resume=resumable,
                       student=student, teacher=teacher, on_step=on_step)


def _iteration_prompts(cfg: DistillConfig, i: int, records, path: Path) -> Path:
    """This iteration's prompts (all, or a seeded sample of them), written for the record."""
    if not path.is_file():
        chosen = records
        if cfg.prompts_per_iteration and cfg.prompts_per_iteration < len(records):
            chosen = random.Random(cfg.seed * 1000 + i).sample(records,
                                                               cfg.prompts_per_iteration)
        write_atomic(path, "".join(json.dumps(r, default=str) + "\n" for r in chosen))
    return path


def _evaluate(cfg: DistillConfig, model: str, out: Path, device: str, loaded=None,
              tok=None, sampler=None) -> dict[str, Any]:
    if (out / EVAL_SUMMARY).is_file():
        s = json.loads((out / EVAL_SUMMARY).read_text())
    else:
        # tip eval's own sampling (greedy, one answer each), at the loop's response length
        sampling = dataclasses.replace(EvalConfig().sampling,
                                       max_new_tokens=cfg.sampling.max_new_tokens)
        res = run_eval(validate(EvalConfig(
            model=model, prompts=cfg.eval_prompts, output=str(out), grading=cfg.grading,
            sampling=sampling, seed=cfg.seed,
            source=dataclasses.replace(cfg.source, max_prompts=cfg.eval_max_prompts),
            runtime=dataclasses.replace(cfg.runtime, device=device))),
            model=loaded, tokenizer=tok, sampler=sampler)
        s = res.summary()
    return {"accuracy": s["accuracy"], "interval_95": s["interval_95"]}


def _mean(d: StageDir, name: str) -> float:
    total, n = 0.0, 0
    for shard in d.iter_shards((name,)):
        total += float(shard[name].double().sum())
        n += shard[name].numel()
    return total / max(n, 1)


def _last_metrics(train: Path) -> dict[str, Any]:
    path = Path(train) / METRICS
    lines = path.read_text().splitlines() if path.is_file() else []
    return json.loads(lines[-1]) if lines else {}


def _train_steps(train: Path) -> int:
    return int((read_manifest(train) or {}).get("summary", {}).get("steps", 0))


def _write_run_manifest(cfg: DistillConfig, complete: bool, summary: dict | None = None) -> None:
    run = Path(cfg.output)
    check_output(run, "distill", (cfg.prompts, cfg.student, cfg.teacher, cfg.eval_prompts))
    old = read_manifest(run)
    if (run / MANIFEST).exists() and (old is None or old.get("stage") != "distill"
                                      or old.get("config") != to_flat(cfg)):
        raise TipError(f"{run} holds a different run (other settings); choose another -o")
    run.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run / MANIFEST, {
        "schema_version": SCHEMA_VERSION, "stage": "distill", "complete": complete,
        "config": to_flat(cfg), "shards": [], "summary": summary or {}})


def _render(history: list[dict[str, Any]]) -> None:
    table = Table(title="tip distill")
    for col in ("iteration", "rollout tokens", "mean rkl", "train loss", "accuracy (95% CI)"):
        table.add_column(col, justify="right")
    for h in history:
        acc = f"{h['accuracy']:.3f} ({h['interval_95'][0]:.3f}-{h['interval_95'][1]:.3f})" \
            if "accuracy" in h else "-"
        fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else "-"  # noqa: E731
        table.add_row(str(h["iteration"]), str(h.get("rollout_tokens", "-")),
                      fmt(h.get("mean_rkl")), fmt(h.get("train_loss")), acc)
    console.print(table)
