"""`tip train`: distil the teacher into the student on the kept tokens only.

    tip train runs/score --strategy soft-or --keep 0.5 --loss rkl-topk -o runs/train \
        --lr 1e-5 --train-batch-size 4 --grad-accum 2 --max-steps 100 --save-every 50

The input is a score directory (tokens selected on the fly with ``tip select``'s
functions), a selection directory, or, for the ``*-full`` losses with ``--teacher``, a
rollout directory (``data``). Each step runs the transformer body on whole sequences,
gathers the hidden states at kept positions and applies the LM head and the loss in
chunks whose logits are rebuilt in backward (``module``), normalised by the global number
of kept tokens (``loop``).

The output directory is a transformers checkpoint (``from_pretrained`` loads it, so it
can be the next rollout's ``--student``) plus ``manifest.json`` (stage ``train``),
``metrics.jsonl`` (one line per step), with ``--report-to`` the tracker's files under
``logs/``, and, with ``--save-every``, the latest resumable state under ``checkpoints/``
(``checkpoint``: JSON and safetensors only). ``--resume`` continues from it; on CPU the
result equals an uninterrupted run. ``--fsdp`` shards the student over the processes with
FSDP2 (``fsdp``); checkpoints and the output are the same whole state dicts.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tipcli.configs import TrainConfig, to_flat
from tipcli.dist import fsdp as fsdp2
from tipcli.dist.processes import Processes
from tipcli.errors import TipError
from tipcli.models import adapters
from tipcli.models.loading import (
    check_tokenizer_matches,
    load_tokenizer,
    model_ref,
    quiet_transformers,
    resolve_device,
    tokenizer_info,
)
from tipcli.models.student import Student
from tipcli.progress import Timer, console
from tipcli.store.layout import METRICS, TRAIN
from tipcli.store.stagedir import StageDir, StageWriter, is_complete, read_manifest
from tipcli.tracking import Tracker, check_available
from tipcli.trainer.checkpoint import (
    INDEX,
    STATE,
    load_latest,
    load_state,
    read_state,
    save_state,
    saved_processes,
)
from tipcli.trainer.data import Source, load_sequences, make_micro_batch, open_source
from tipcli.trainer.loop import (
    accelerator_kwargs,
    build_trainer,
    check_full_loss_teacher,
    make_accelerator,
    run_loop,
    run_steps,
)
from tipcli.trainer.module import DistillModule, distill_module

__all__ = ["DistillModule", "TrainConfig", "accelerator_kwargs",
           "distill_module", "load_sequences", "make_micro_batch", "open_source", "run_train",
           "run_train_cli", "train_model"]


def run_train(cfg: TrainConfig, overwrite: bool = False, resume: bool = False) -> Path:
    """Train the student on the kept tokens of ``cfg.input``; returns the output directory."""
    return train_model(cfg, overwrite, resume)[0]


def run_train_cli(cfg: TrainConfig, overwrite: bool = False, resume: bool = False) -> Path:
    """``run_train`` for the command line: one summary line on stderr (steps, final loss,
    seconds), then the path."""
    before = not overwrite and is_complete(cfg.output)
    with Timer() as t:
        out = run_train(cfg, overwrite, resume)
    if os.environ.get("RANK", "0") == "0":
        steps = StageDir.open(out, stage="train").manifest["summary"]["steps"]
        lines = (out / METRICS).read_text().splitlines() if (out / METRICS).is_file() else []
        loss = json.loads(lines[-1]).get("loss") if lines else None
        when = "finished earlier" if before else f"{t.seconds:.0f} s"
        console.print(f"train: {steps} steps, final loss "
                      f"{'-' if loss is None else f'{loss:.4f}'}, {when}", markup=False,
                      highlight=False)
    return out


def train_model(cfg: TrainConfig, overwrite: bool = False, resume: bool = False,
                student: Student | None = None, teacher=None,
                on_step: Callable[[dict[str, Any]], None] | None = None
                ) -> tuple[Path, Student | None]:
    """``run_train`` on models that may already be loaded (see ``build_trainer``), with
    ``on_step`` called with each step's metrics (``tip distill`` logs them to its tracker).

    Returns the output directory and the trained ``Student`` in eval mode, on every process
    (under ``--fsdp`` a whole copy gathered from the shards), its policy version the
    started one's plus the steps taken; None when the run had already completed and
    nothing was trained."""
    run = StageWriter.for_run(TRAIN, cfg, overwrite)
    check_available(cfg.training.report_to)
    resolve_device(cfg.runtime.device)  # --device cuda on a machine without one is refused
    quiet_transformers()
    acc = make_accelerator(cfg)
    src = open_source(cfg)
    seqs = load_sequences(cfg, src)
    tok = load_tokenizer(src.student, cfg.runtime.trust_remote_code)
    check_tokenizer_matches(tok, src.stats.manifest, src.student, src.stats.path)
    _check_resume(cfg, overwrite, resume, acc.num_processes)
    _check_merged_output(cfg)
    check_full_loss_teacher(cfg, src)
    prior = _continued(cfg, src)
    run_steps(cfg, len(seqs), acc.num_processes, prior)  # refused before anything is written
    Processes(acc.process_index, acc.num_processes).agree(to_flat(cfg))  # launched alike
    acc.wait_for_everyone()  # every process has checked before the main one writes
    writer = _writer(run, cfg, src, tok, acc.num_processes) if acc.is_main_process else None
    acc.wait_for_everyone()
    if is_complete(cfg.output):  # the same run already completed: nothing to do
        return Path(cfg.output), None
    tr = build_trainer(cfg, acc, src, seqs, tok, student, teacher, prior)
    try:
        if prior is not None:
            load_state(tr, Path(cfg.continue_from) / STATE)
        if resume:
            load_latest(tr)
        tracker = _tracker(cfg, acc, on_step)
        tr.on_step = on_step or (lambda m: tracker.log(m, m["global_step"]))
        try:
            summary = run_loop(tr)
        finally:
            tracker.close()
        summary.update(policy_version=tr.student.version + summary["steps"],
                       global_step=tr.state.global_step, schedule_steps=tr.schedule_steps)
        if tr.lora:
            summary["lora"] = _lora_summary(tr)
        _save_model(tr, tok)
        if cfg.save_state:
            save_state(tr)
        model, peft = tr.whole_lora_student() if tr.lora else (tr.whole_student(), None)
        trained = Student(cfg.output, model, summary["policy_version"], peft,
                          tr.student.base)  # under FSDP a whole copy
        if cfg.merged_output and acc.is_main_process:  # the last act: it merges in place
            trained.save_merged(cfg.merged_output, tok)
        if writer is not None:
            writer.finish(summary)
        acc.wait_for_everyone()
    finally:
        tr.close()
    acc.free_memory()  # drop the optimizer state and accelerate's references to the model
    return Path(cfg.output), trained.for_inference()


def _lora_summary(tr) -> dict[str, Any]:
    """The adapters' size beside the model's: what a LoRA run trains and saves."""
    params = list(tr.student.model.named_parameters())
    adapter = sum(p.numel() for n, p in params if adapters.is_adapter_param(n))
    return {"rank": tr.student.lora_rank, "base": tr.student.base,
            "adapter_parameters": adapter,
            "base_parameters": sum(p.numel() for _, p in params) - adapter}


def _check_merged_output(cfg: TrainConfig) -> None:
    """--merged-output names a new directory (or an empty one): nothing is overwritten."""
    out = Path(cfg.merged_output) if cfg.merged_output else None
    if out is None:
        return
    if out.resolve() == Path(cfg.output).resolve():
        raise TipError("--merged-output must be another directory than -o, which holds the "
                       "adapter")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise TipError(f"--merged-output {out} already exists and is not empty; choose a new "
                       "directory (tip writes the merged model only where nothing would be "
                       "lost)")


def _continued(cfg: TrainConfig, src: Source) -> dict[str, Any] | None:
    """The position of the run ``--continue-from`` names (``checkpoint.read_state``), after
    checking that this run can continue it; None without the flag."""
    if not cfg.continue_from:
        return None
    d = Path(cfg.continue_from)
    m = read_manifest(d)
    if m is None or m.get("stage") != TRAIN.name or not m.get("complete"):
        raise TipError(f"--continue-from {d} is not a finished tip train directory; give the "
                       "output of a tip train run that completed")
    if not (d / STATE / INDEX).is_file():
        raise TipError(f"--continue-from {d} holds no optimizer state ({d / STATE}): it was "
                       "trained with --no-save-state or its state was pruned; continue from a "
                       "run that kept it, or drop --continue-from to start afresh")
    if Path(src.student).resolve() != d.resolve():
        raise TipError(f"--continue-from {d}, but {src.input.path} was sampled from "
                       f"{src.student}: continue the run whose trained student sampled the "
                       "input (or drop --continue-from to start afresh)")
    prior = read_state(d / STATE)
    if prior["fsdp"] != cfg.training.fsdp:
        raise TipError(f"{d} was trained {'with' if prior['fsdp'] else 'without'} --fsdp; "
                       "continue it the same way")
    opt = cfg.optim
    kept = [("--lr", opt.lr, prior["lr"]), ("--warmup", opt.warmup, prior["warmup"])]
    if opt.schedule_steps:
        kept.append(("--schedule-steps", opt.schedule_steps, prior["schedule_steps"]))
    for flag, now, was in kept:
        if now != was:
            raise TipError(f"{d} runs its schedule with {flag} {was}, and a continued run "
                           f"keeps it: pass {flag} {was} (or drop --continue-from to start a "
                           "new schedule)")
    return prior


def _tracker(cfg: TrainConfig, acc, on_step) -> Tracker:
    kind = cfg.training.report_to if acc.is_main_process and on_step is None else "none"
    return Tracker(kind, cfg.output, "tip-train", to_flat(cfg))


def _check_resume(cfg: TrainConfig, overwrite: bool, resume: bool, world: int) -> None:
    old = read_manifest(cfg.output)
    if overwrite and resume:
        raise TipError("--resume and --overwrite exclude each other")
    if resume and old is None:
        raise TipError(f"--resume given but {cfg.output} holds no train run to resume")
    if old is not None and not overwrite and not resume and not old.get("complete"):
        raise TipError(f"{cfg.output} holds an unfinished train run; pass --resume to continue "
                       "it or --overwrite to start again")
    was = (old or {}).get("inputs", {}).get("global_batch")
    now = global_batch(cfg, world)
    if old is not None and not overwrite and isinstance(was, int) and was != now:
        saved = saved_processes(cfg.output)
        by = f" on {saved} process{'es' if saved > 1 else ''}" if saved else ""
        raise TipError(
            f"{cfg.output} was trained{by} with {was} sequences a step; this launch, on "
            f"{world} process{'es' if world > 1 else ''} x --train-batch-size "
            f"{cfg.optim.train_batch_size} x --grad-accum {cfg.optim.grad_accum}, would take {now} "
            f"and read other batches: set --train-batch-size so that the product is {was}, "
            "or pass --overwrite")


def global_batch(cfg: TrainConfig, world: int) -> int:
    """The sequences of one optimizer step over every process: the data order depends on
    it alone (``data.step_indices``), not on how it is split between processes."""
    return cfg.optim.train_batch_size * cfg.optim.grad_accum * world


def _writer(run: StageWriter, cfg: TrainConfig, src: Source, tok, world: int) -> StageWriter:
    models = {"student": model_ref(src.student)}
    if cfg.teacher:
        models["teacher"] = model_ref(cfg.teacher)
    resolved = {**to_flat(cfg), "student": src.student,
                "score_temperature": src.temperature}
    if src.input.stage == "select":
        resolved["selection"] = src.input.config
    # the per-process batch may change on resume (another launch) as long as the global
    # batch stays: the data order depends on it alone
    return run.start(models, tokenizer_info(tok), parent=src.input, config=resolved,
                     reads=(src.stats.path, src.student), launch=("train_batch_size",),
                     inputs={"global_batch": global_batch(cfg, world)})


def _save_model(tr, tok) -> None:
    """The trained student as a plain transformers checkpoint at the top of the output;
    under FSDP gathered and written a tensor at a time (``fsdp.save_whole``); a LoRA
    student's adapters as a peft directory (under FSDP gathered first)."""
    if tr.lora and tr.fsdp:  # every process takes part in gathering
        state = fsdp2.adapter_state(tr.module)
        if tr.acc.is_main_process:
            tr.student.save(tr.cfg.output, tok, state)
        return
    state = None if tr.fsdp else tr.model_state()
    if tr.fsdp:
        fsdp2.save_whole(tr.module, tr.cfg.output, tr.acc.is_main_process)
    if tr.acc.is_main_process:
        if tr.fsdp:
            tr.student.save_config(tr.cfg.output, tok)
        else:
            tr.student.save(tr.cfg.output, tok, state)

