"""`tip distill`: the on-policy loop, rollout -> score -> select -> train, N times.

    tip distill --student S --teacher T --prompts prompts.jsonl --iterations 3 \
        --strategy soft-or --keep 0.5 --eval-prompts heldout.jsonl -o runs/distill

Iteration i samples from the student trained in iteration i-1 (the first from
``--student``). Every stage directory is kept under ``RUN/iter-NNN/``::

    RUN/manifest.json            the resolved settings (stage "distill") and a summary
    RUN/eval-initial/            the starting student's evaluation (with --eval-prompts:
    RUN/eval-initial-kl/         accuracy in eval/, held-out KL in eval-kl/, see heldout)
    RUN/eval-teacher/rollout/    the teacher's samples of the eval prompts (KL)
    RUN/iter-000/prompts.jsonl   this iteration's prompts
    RUN/iter-000/rollout/ score/ select/ train/ eval/ eval-kl/

A killed run, started again with the same command, skips the stages already complete
and resumes the one it was in (each stage resumes itself). Both models stay loaded for
the whole run: the student trained in one iteration samples the next, without a trip
through the disk (with ``--backend vllm``, one engine gets each new student's weights in
place). (Where sampling runs in bf16, on GPU, training reloads the float32 weights that
the previous iteration saved, so no update is lost to rounding.)

The iterations train one run: each iteration's train stage continues the previous one's
AdamW state and learning-rate schedule (``tip train --continue-from``; its ``state/``),
one warm-up and one cosine over iterations x steps (``schedule_steps``). Once an iteration
is complete its checkpoints and the previous iteration's ``state/`` are deleted;
``--keep-students last`` also deletes the weights of the student it started from.
"""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
from rich.table import Table

from tipcli.catalog import LOSSES
from tipcli.configs import (
    DistillConfig,
    RolloutConfig,
    ScoreConfig,
    SelectConfig,
    TrainConfig,
    to_flat,
    named_teachers,
    teacher_urls,
    validate,
)
from tipcli.dist.processes import Processes, processes
from tipcli.engines.sampler import Sampler, make_sampler
from tipcli.errors import TipError
from tipcli.models.loading import (
    check_same_vocab,
    load_tokenizer,
    model_ref,
    resolve_dtype,
    tokenizer_info,
)
from tipcli.models.prompts import load_prompts
from tipcli.models.student import Student
from tipcli.models.teacher import make_teacher, tokenizers_differ
from tipcli.progress import console
from tipcli.stages.heldout import heldout_metrics, mean
from tipcli.stages.rollout import run_rollout
from tipcli.stages.score import run_score
from tipcli.stages.select import run_select
from tipcli.stages.train import train_model
from tipcli.store.files import write_atomic, write_json_atomic
from tipcli.store.layout import (
    CHECKPOINTS,
    DISTILL,
    ITERATION,
    ITERATION_PROMPTS,
    ITERATION_ROW,
    METRICS,
)
from tipcli.store.stagedir import StageDir, StageWriter, is_complete, read_manifest
from tipcli.tracking import Tracker, check_available
from tipcli.trainer.checkpoint import STATE, checkpoint_dirs


def iteration_dir(run: str | Path, i: int) -> Path:
    """Where iteration ``i`` of the run in ``run`` keeps its stages."""
    return Path(run) / ITERATION.format(i)


def run_distill(cfg: DistillConfig, overwrite: bool = False) -> Path:
    """Run (or resume) the loop; returns the run directory. Under a launcher every process
    runs it, on its own device, and each stage shares its work out (see the module doc)."""
    run = StageWriter.for_run(DISTILL, cfg, overwrite)
    check_available(cfg.training.report_to)
    rt = cfg.runtime
    procs = processes(rt.device, rt.dist_timeout)
    _notice_one_process(cfg, procs)
    if procs.world > 1 and rt.device_map:
        raise TipError("--device-map spreads one copy of the teacher over the devices of one "
                       f"process, but {procs.world} processes were launched: drop "
                       "--device-map (each process then holds the teacher on its own device), "
                       "or run tip distill without a launcher")
    tok = load_tokenizer(cfg.student, rt.trust_remote_code)
    several = named_teachers(cfg.teacher)
    urls = teacher_urls(cfg.scoring.teacher_url) if several else {"": cfg.scoring.teacher_url}
    if several:  # NAME=URL: a served teacher named by its server alone
        urls.update({n: m for n, m in several.items() if m.startswith(("http://", "https://"))})
    for key, name in (several or {"": cfg.teacher}).items():
        t_tok = _teacher_tokenizer(cfg, name, bool(urls.get(key)))
        if t_tok is not None:  # else served under a name only: the server checks it
            _check_tokenizers(cfg, tok, t_tok, name)
    if several is not None:  # every prompt routed to a teacher before anything is written
        from tipcli.models.several import routes

        routes(load_prompts(cfg.prompts, cfg.source), cfg.scoring.teacher_field,
               list(several), cfg.prompts)
        teacher = {"teachers": {n: {"id": m, "url": urls[n]} if n in urls else model_ref(m)
                                for n, m in several.items()},
                   "field": cfg.scoring.teacher_field}
    else:
        teacher = {"id": cfg.teacher, "url": cfg.scoring.teacher_url} \
            if cfg.scoring.teacher_url else model_ref(cfg.teacher)
    # a killed run may resume on another number of processes at the same global batch;
    # "optimizer" marks the runs whose iterations continue one AdamW and one schedule
    opt = cfg.optim
    writer = run.start({"student": model_ref(cfg.student), "teacher": teacher},
                       tokenizer_info(tok), procs=procs,
                       launch=("teacher_timeout", "train_batch_size"),
                       inputs={"global_batch": opt.train_batch_size * opt.grad_accum * procs.world,
                               "optimizer": "one over the loop"})
    if writer.complete:  # finished before: nothing to load or redo
        if procs.main:
            _render(writer.manifest["summary"]["history"])
        return writer.path
    loop = Loop(cfg, tok, procs)
    try:
        if cfg.eval_prompts:
            loop.evaluate_student("initial", cfg.student, Path(cfg.output) / "eval-initial", 0)
        for i in range(cfg.iterations):
            loop.iteration(i)
    finally:
        loop.close()
    writer.finish({"history": loop.history, "final_student": loop.student_name})
    if procs.main:
        _render(loop.history)
    return writer.path


def _notice_one_process(cfg: DistillConfig, procs: Processes) -> None:
    """--fsdp and --shard-teacher share out over the launched processes: without a
    launcher there is one, and they do nothing a user would notice, so say so."""
    given = [flag for flag, on in (("--fsdp", cfg.training.fsdp),
                                   ("--shard-teacher", cfg.runtime.shard_teacher)) if on]
    if given and procs.world == 1:
        print(f"notice: {' and '.join(given)} shard over the launched processes, and this run "
              "has one (no launcher), so they save no memory; launch it with torchrun or "
              "accelerate launch to shard", file=sys.stderr)


def _teacher_tokenizer(cfg: DistillConfig, name: str, served: bool):
    """The tokenizer of the teacher ``name``; for a served teacher, None where it names no
    model that tip can read it from here."""
    try:
        return load_tokenizer(name, cfg.runtime.trust_remote_code)
    except TipError:
        if not served:
            raise
        return None


def _check_tokenizers(cfg: DistillConfig, tok, t_tok, teacher: str) -> None:
    """The same vocabulary, or (--cross-tokenizer) a loss that an aligned teacher gives."""
    mode, loss = cfg.scoring.cross_tokenizer, cfg.training.loss
    if mode == "off":
        check_same_vocab(tok, t_tok, cfg.student, teacher)
        return
    if not (mode == "force" or tokenizers_differ(tok, t_tok)):
        return
    if LOSSES[loss].form == "full":
        raise TipError(f"--loss {loss} needs the teacher's whole distribution over the "
                       f"student's vocabulary, but {teacher} is read with another "
                       f"tokenizer (--cross-tokenizer {mode}): use a *-topk loss (over the "
                       "candidates the two vocabularies share) or rkl-sampled")
    if cfg.eval_prompts and cfg.eval_metric != "accuracy":
        raise TipError(f"--eval-metric {cfg.eval_metric} needs the teacher's whole distribution "
                       f"over the student's vocabulary, but {teacher} is read with another "
                       f"tokenizer (--cross-tokenizer {mode}): use --eval-metric accuracy")


class Loop:
    """One process's models and the run's record: the teacher, the current student (loaded
    once, kept between iterations), the sampler (with ``--backend vllm`` an engine started
    once and given each trained student's weights in place), the tracker (main process)."""

    def __init__(self, cfg: DistillConfig, tok, procs: Processes = Processes()):
        rt = cfg.runtime
        self.cfg, self.run, self.tok, self.procs = cfg, Path(cfg.output), tok, procs
        self.records = load_prompts(cfg.prompts, cfg.source)
        self.device = procs.device_for(rt.device)
        self.dtype = resolve_dtype(rt.dtype, self.device)
        # whole on this process's device (or spread with --device-map), sharded over all,
        # or served by its own engine
        self.teacher = make_teacher(cfg.teacher, tok, rt, procs, self.device, self.dtype,
                                    scoring=cfg.scoring, student=cfg.student)
        self.tracker = Tracker(cfg.training.report_to if procs.main else "none", self.run,
                               "tip-distill", to_flat(cfg))
        self.student_name, self.steps = cfg.student, 0
        self.student: Student | None = None
        self._sampler: Sampler | None = None
        self.sampler_holds = ""  # the student whose weights the sampler has
        self.reload_seconds: list[float] = []
        self.history: list[dict[str, Any]] = []

    def loaded_student(self) -> Student:
        if self.student is None:
            self.student = Student.load(self.student_name, self.device, self.dtype,
                                        self.cfg.runtime.trust_remote_code, version=self.steps)
        return self.student

    def say(self, label: str, row: dict[str, Any], seconds: float | None = None) -> None:
        if self.procs.main:
            say_row(label, row, seconds)

    def sampler(self) -> Sampler:
        """The sampler, holding the current student's weights (made on first use)."""
        student = self.loaded_student()
        if self._sampler is None:
            self._sampler = make_sampler(self.cfg.student, self.tok, self.cfg.sampling,
                                         self.cfg.runtime, self.procs, model=student.model,
                                         lora_rank=self.cfg.lora.lora_r)
            self.sampler_holds = self.cfg.student
        stale_model = self._sampler.model is not None and \
            self._sampler.model is not student.model
        if self.sampler_holds != self.student_name or stale_model:
            seconds = student.sync(self._sampler)
            if seconds is not None:
                self.reload_seconds.append(seconds)
            self.sampler_holds = self.student_name
        return self._sampler

    def evaluate_student(self, label, name: str, out: Path, step: int) -> dict[str, Any]:
        """Held-out metrics of the student ``name`` into ``out`` (logged; the initial
        evaluation also goes into the history)."""
        row = heldout_metrics(self.cfg, name, self.loaded_student().model, out, self.tok,
                              self.teacher, self.sampler())
        if label == "initial":
            self.history.append({"iteration": "initial", **row})
            self.say("initial student", row)
        self.tracker.log(_eval_metrics(row), step)
        return row

    def iteration(self, i: int) -> None:
        cfg = self.cfg
        d = iteration_dir(cfg.output, i)
        done = d / ITERATION_ROW
        if done.is_file():  # finished in an earlier run: its student may be pruned already
            previous, self.student_name = self.student_name, str(d / "train")
            self.student = None
            self.steps += _train_steps(Path(self.student_name))
            self.history.append(json.loads(done.read_text()))
            self.prune(Path(self.student_name), previous)
            self.say(f"iteration {i + 1}/{cfg.iterations} (finished earlier)", self.history[-1])
            return
        started = time.perf_counter()
        student = self.loaded_student()
        select, row = sample_score_select(cfg, i, self.records, self.student_name, student,
                                           self.teacher, self.tok, self.sampler(), self.procs)
        if student.dtype != torch.float32:  # bf16 for sampling; training reloads float32
            self.student = None
        trained_at = time.perf_counter()
        train, self.student = _train(cfg, select, d / "train", self.student, self.teacher,
                                     lambda m: self.tracker.log(m, m["global_step"]),
                                     self.student_name if i else "", self.procs.world,
                                     len(self.records))
        if self.student is not None:  # the trained student stays loaded for the next one
            self.student.for_inference(self.dtype)
        self.steps += _train_steps(train)
        row["train_loss"] = _last_metrics(train).get("loss")
        row["train_seconds"] = round(time.perf_counter() - trained_at, 3)
        previous, self.student_name = self.student_name, str(train)
        if cfg.eval_prompts and ((i + 1) % cfg.eval_every == 0 or i + 1 == cfg.iterations):
            row.update(self.evaluate_student(i, self.student_name, d / "eval", self.steps))
        if self.cfg.sampling.backend == "vllm":
            row["sampler_reload_seconds"] = self.reload_seconds[-1] if self.reload_seconds \
                else None
        self.tracker.log({"iteration": i + 1, "rollout_mean_rkl": row["mean_rkl"]}, self.steps)
        row["seconds"] = round(time.perf_counter() - started, 3)
        self.history.append(row)
        self.say(f"iteration {i + 1}/{cfg.iterations}", row, row["seconds"])
        if self.procs.main:
            write_json_atomic(done, row)  # before pruning: a resume never needs what is pruned
        self.prune(train, previous)

    def prune(self, train: Path, previous: str) -> None:
        """``_prune`` by the main process, the others waiting for it."""
        self.procs.barrier()
        if self.procs.main:
            _prune(self.cfg, train, previous)
        self.procs.barrier()

    def close(self) -> None:
        self.tracker.close()
        if self._sampler is not None:
            self._sampler.close()
        self.teacher.close()


def _prune(cfg: DistillConfig, train: Path, previous: str) -> None:
    """Drop what a finished iteration no longer needs: its resumable training state, the
    optimizer state of the iteration before (its own continues the run), and with
    ``--keep-students last`` the weights of the student it started from."""
    shutil.rmtree(train / CHECKPOINTS, ignore_errors=True)
    before = Path(previous)
    if before.parent.parent == Path(cfg.output) and before.name == "train":
        shutil.rmtree(before / STATE, ignore_errors=True)
        if cfg.keep_students == "last":
            for weights in before.glob("model*.safetensors"):
                weights.unlink()


def _eval_metrics(row: dict[str, Any]) -> dict[str, Any]:
    return {f"eval/{k}": row[k] for k in ("accuracy", "heldout_rkl", "heldout_fkl") if k in row}


def sample_score_select(cfg: DistillConfig, i: int, records, student_name: str,
                         student: Student, teacher, tok, sampler=None,
                         procs: Processes = Processes()) -> tuple[Path, dict[str, Any]]:
    """Rollout, score and select of iteration ``i`` on the loaded models (finished stages
    are kept); returns the selection directory and the iteration's summary row. Rollout
    and score share their shards over the processes; the main process selects."""
    d = iteration_dir(cfg.output, i)
    prompts = d / ITERATION_PROMPTS
    if procs.main:
        d.mkdir(parents=True, exist_ok=True)
        _iteration_prompts(cfg, i, records, prompts)
    procs.barrier()
    rollout = run_rollout(validate(RolloutConfig(
        student=student_name, prompts=str(prompts), output=str(d / "rollout"),
        sampling=cfg.sampling, seed=cfg.seed * 1000 + i,
        shard_size=cfg.sampling.sample_batch_size * 16, runtime=cfg.runtime)),
        model=student.model, tokenizer=tok, sampler=sampler, policy_version=student.version)
    score = run_score(validate(ScoreConfig(
        rollout=str(rollout), teacher=cfg.teacher, output=str(d / "score"),
        student=student_name, scoring=cfg.scoring, runtime=cfg.runtime)),
        student=student.model, teacher=teacher, tokenizer=tok)
    select = d / "select"
    if procs.main:
        run_select(validate(SelectConfig(score=str(score), output=str(select),
                                         selection=cfg.selection, seed=cfg.seed)))
    procs.barrier()
    sd = StageDir.open(score, stage="score")
    kept = StageDir.open(select, stage="select").manifest["summary"]
    return select, {"iteration": i, "rollout_tokens": sd.num_tokens,
                    "mean_rkl": mean(sd, "rkl"), "selection": kept}


def schedule_steps(cfg: DistillConfig, prompts: int, world: int) -> int:
    """The steps the loop's one learning-rate schedule spans: ``--schedule-steps``, or
    iterations x the steps of an iteration (``--max-steps``, or with ``--epochs`` the steps
    of every sampled sequence; an iteration whose selection leaves some sequences without a
    kept token takes fewer, and the schedule then ends short of its last steps)."""
    opt = cfg.optim
    if opt.schedule_steps:
        return opt.schedule_steps
    if opt.max_steps:
        return cfg.iterations * opt.max_steps
    sequences = min(cfg.prompts_per_iteration or prompts, prompts) * cfg.sampling.num_samples
    per_step = opt.train_batch_size * opt.grad_accum * world
    return cfg.iterations * opt.epochs * max(1, sequences // per_step)


def train_config(cfg: DistillConfig, select: Path, out: Path, continue_from: str = "",
                 world: int = 1, prompts: int = 0) -> TrainConfig:
    """The ``tip train`` settings of one iteration: the loop's own, on its CPU or GPU,
    continuing the previous iteration's training run (``continue_from``; none for the
    first), one schedule over the loop (``schedule_steps`` of ``prompts`` prompts on
    ``world`` processes)."""
    return validate(TrainConfig(
        input=str(select), output=str(out),
        teacher=cfg.teacher if LOSSES[cfg.training.loss].needs_teacher else "",
        training=dataclasses.replace(cfg.training, report_to="none"),  # the loop logs
        lora=cfg.lora, selection=cfg.selection, seed=cfg.seed, continue_from=continue_from,
        optim=dataclasses.replace(cfg.optim, schedule_steps=schedule_steps(cfg, prompts, world)),
        save_every=max(1, cfg.optim.max_steps // 4) if cfg.optim.max_steps else 0,
        runtime=dataclasses.replace(cfg.runtime, device="cpu" if cfg.runtime.device == "cpu"
                                    else "auto")))


def _train(cfg: DistillConfig, select: Path, out: Path, student, teacher, on_step,
           continue_from: str = "", world: int = 1, prompts: int = 0):
    """Train (or resume, or keep a finished) iteration; returns the directory and the
    trained student, or None where the stage had already finished."""
    tcfg = train_config(cfg, select, out, continue_from, world, prompts)
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


def _last_metrics(train: Path) -> dict[str, Any]:
    path = Path(train) / METRICS
    lines = path.read_text().splitlines() if path.is_file() else []
    return json.loads(lines[-1]) if lines else {}


def _train_steps(train: Path) -> int:
    return int((read_manifest(train) or {}).get("summary", {}).get("steps", 0))


def _render(history: list[dict[str, Any]]) -> None:
    """The run's history: one row per iteration, with the evaluations it had."""
    columns = {"iteration": shown_iteration,
               "rollout tokens": lambda h: str(h.get("rollout_tokens", "-")),
               "mean rkl": lambda h: _num(h.get("mean_rkl")),
               "train loss": lambda h: _num(h.get("train_loss"))}
    if any("accuracy" in h for h in history):
        columns["accuracy (95% CI)"] = lambda h: (
            f"{h['accuracy']:.3f} ({h['interval_95'][0]:.3f}-{h['interval_95'][1]:.3f})"
            if "accuracy" in h else "-")
    for name in dict.fromkeys(n for h in history for n in h.get("per_teacher", {})):
        columns[f"accuracy, {name}'s prompts"] = lambda h, n=name: (
            f"{h['per_teacher'][n]['accuracy']:.3f}" if n in h.get("per_teacher", {}) else "-")
    if any("heldout_rkl" in h for h in history):
        columns["held-out rkl"] = lambda h: _num(h.get("heldout_rkl"))
        columns["held-out fkl"] = lambda h: _num(h.get("heldout_fkl"))
    table = Table(title="tip distill")
    for col in columns:
        table.add_column(col, justify="right")
    for h in history:
        table.add_row(*(cell(h) for cell in columns.values()))
    console.print(table)


def shown_iteration(row: dict[str, Any]) -> str:
    """A history row's iteration as a user reads it: 1-based, as the progress lines count
    (the manifest and the ``iter-NNN`` directories count from 0), or "initial"."""
    i = row["iteration"]
    return str(i + 1) if isinstance(i, int) else str(i)


def say_row(label: str, row: dict[str, Any], seconds: float | None = None) -> None:
    """One line on stderr per iteration (and for the initial evaluation): what a long run
    is doing, whether or not progress bars are shown."""
    parts = [f"{name} {_num(row[key])}" for key, name in (
        ("mean_rkl", "rollout rkl"), ("train_loss", "train loss"), ("accuracy", "accuracy"),
        ("heldout_rkl", "held-out rkl"), ("heldout_fkl", "held-out fkl")) if key in row]
    if seconds is not None:
        parts.append(f"{seconds:.0f} s")
    console.print(f"{label}: {', '.join(parts)}", markup=False, highlight=False)


def _num(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else "-"
