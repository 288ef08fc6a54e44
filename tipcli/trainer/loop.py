"""The training loop: accelerate set-up, one optimizer step, metrics.

The loss of a step is the sum over its kept tokens divided by the global number of kept
tokens of that step, across micro-batches and processes, so it does not depend on how a
step is split. Multi-process runs go through accelerate (DDP), or, with ``--fsdp``, shard
the student with FSDP2 (``tipcli.dist.fsdp``)::

    accelerate launch --multi_gpu --num_processes 2 -m tipcli train runs/score -o runs/train
    torchrun --nproc_per_node 2 -m tipcli train runs/score -o runs/train --fsdp
"""

from __future__ import annotations

import contextlib
import json
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs
from transformers import get_cosine_schedule_with_warmup

from tipcli.catalog import LOSSES, QUADRANTS
from tipcli.configs import TrainConfig
from tipcli.dist import fsdp as fsdp2
from tipcli.dist import mesh as mesh_lib
from tipcli.errors import TipError, first_line
from tipcli.models import adapters
from tipcli.models.loading import (
    check_model_fits_vocab,
    real_vocab_size,
    resolve_dtype,
)
from tipcli.models.student import Student
from tipcli.models.teacher import make_teacher, require_in_process
from tipcli.progress import progress_task
from tipcli.store.layout import METRICS
from tipcli.trainer.checkpoint import save_checkpoint
from tipcli.trainer.data import MicroBatch, Source, make_micro_batch, step_indices, steps_per_epoch
from tipcli.trainer.module import DistillModule

QUADRANT_NAMES = ("unknown", *QUADRANTS)  # code 0: not selected by quadrant (rollout input)


def accelerator_kwargs(cfg: TrainConfig) -> dict[str, Any]:
    """What the Accelerator is made with: the CPU when asked for (or when there is no GPU),
    bf16 on GPU unless told otherwise (autocast; under ``--fsdp`` FSDP2's parameter
    casting instead, see ``tipcli.dist.fsdp``)."""
    device, mp = cfg.runtime.device, cfg.training.mixed_precision
    cpu = device == "cpu" or not torch.cuda.is_available()
    if mp == "auto":
        mp = "no" if cpu else "bf16"
    return {"cpu": cpu, "mixed_precision": mp}


def make_accelerator(cfg: TrainConfig) -> Accelerator:
    """The run's Accelerator; it starts the process group (with ``--dist-timeout``) unless
    the caller did (``tip distill`` under a launcher)."""
    timeout = InitProcessGroupKwargs(timeout=timedelta(minutes=cfg.runtime.dist_timeout))
    try:
        acc = Accelerator(**accelerator_kwargs(cfg), kwargs_handlers=[timeout])
    except (RuntimeError, ValueError) as exc:  # e.g. an FSDP launch on a machine without GPUs
        raise TipError(f"accelerate could not set up this launch: {first_line(exc)} "
                       "(check the `accelerate launch` options or `accelerate config`)") from None
    if cfg.training.fsdp and acc.distributed_type == DistributedType.FSDP:
        raise TipError("--fsdp shards the student itself: launch with `accelerate launch "
                       "--multi_gpu` or torchrun, without accelerate's --use_fsdp")
    return acc


class TrainState:
    """The data position: the optimizer steps this run has done (``step``), after the
    ``offset`` steps of the run it continues (``--continue-from``; the loop's earlier
    iterations in ``tip distill``). The schedule's position is ``offset + step``."""

    def __init__(self, offset: int = 0) -> None:
        self.step, self.offset = 0, offset

    @property
    def global_step(self) -> int:
        return self.offset + self.step


@dataclass
class Trainer:
    """Everything a step needs, prepared by accelerate."""

    cfg: TrainConfig
    acc: Accelerator
    module: Any
    optimizer: Any
    scheduler: Any
    state: TrainState
    teacher: Any
    t_head: Callable | None
    seqs: list
    pad_id: int
    total_steps: int
    schedule_steps: int = 0       # the steps the schedule spans (with the run continued)
    on_step: Callable[[dict[str, Any]], None] | None = None
    student: Student | None = None  # what is trained, and how it is saved
    fsdp: bool = False            # the module is sharded with FSDP2
    own_group: bool = False       # a single process's group started for its mesh
    own_teacher: bool = False     # the teacher was loaded here (not the caller's)

    def full_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(model, optimizer) state dicts, whole: on every process, or under FSDP on the
        main one (keyed by parameter name; the others get empty dicts); of a LoRA student
        its adapters only. Every process must call it."""
        if self.fsdp:
            return fsdp2.full_state(self.module, self.optimizer)
        model = self.acc.unwrap_model(self.module).state_dict()
        if self.lora:
            model = {k: v for k, v in model.items() if adapters.is_adapter_param(k)}
        return model, self.optimizer.state_dict()

    @property
    def lora(self) -> bool:
        return self.student is not None and self.student.peft is not None

    @property
    def reads_full_state(self) -> bool:
        """Whether this process passes the whole state to ``load_full_state`` (under FSDP
        the main process does and broadcasts it)."""
        return not self.fsdp or self.acc.is_main_process

    def load_full_state(self, model_sd: dict[str, torch.Tensor] | None,
                        optim_sd: dict[str, Any]) -> None:
        """Whole state dicts into the trainer; ``model_sd`` None keeps the weights."""
        if self.fsdp:
            fsdp2.load_full_state(self.module, self.optimizer, model_sd or {}, optim_sd)
            return
        if model_sd is not None:  # of a LoRA student its adapters, the base as it is
            result = self.acc.unwrap_model(self.module).load_state_dict(model_sd,
                                                                         strict=not self.lora)
            missing = [k for k in result.missing_keys if adapters.is_adapter_param(k)]
            if self.lora and (missing or result.unexpected_keys):
                raise TipError("the checkpoint does not hold this run's LoRA adapters "
                               f"({(missing + result.unexpected_keys)[0]}); start again with "
                               "--overwrite")
        self.optimizer.load_state_dict(optim_sd)

    def position(self) -> dict[str, Any]:
        """Where the run stands, as its checkpoints and final state record it."""
        opt = self.cfg.optim
        return {"step": self.state.step, "global_step": self.state.global_step,
                "schedule_steps": self.schedule_steps, "warmup": opt.warmup, "lr": opt.lr,
                "processes": self.acc.num_processes}

    def whole_student(self):
        """The trained student with whole parameters, on every process: the model itself,
        or under FSDP a copy built from the gathered shards. Every process must call it."""
        if not self.fsdp:
            return self.acc.unwrap_model(self.module).student
        return fsdp2.whole_copy(self.module.student, self.module)[0]

    def whole_lora_student(self):
        """(the whole student, the peft model around it): under FSDP a copy with the same
        adapters built from the gathered shards, else the trained ones. Every process must
        call it."""
        if not self.fsdp:
            return self.whole_student(), self.student.peft
        return fsdp2.whole_copy(self.module.student, self.module,
                                self.student.peft.peft_config["default"])

    def model_state(self) -> dict[str, torch.Tensor]:
        """The student's whole state dict (on the main process under FSDP)."""
        if self.fsdp:
            state = fsdp2.full_model_state(self.module)
        else:
            state = self.acc.get_state_dict(self.module)
        return {k.removeprefix("student."): v for k, v in state.items()}

    def close(self) -> None:
        """Close a teacher loaded here; end the process group a single-process FSDP run
        started."""
        if self.own_teacher:
            self.teacher.close()
        mesh_lib.end_group(self.own_group)
        self.own_group = False


def build_trainer(cfg: TrainConfig, acc: Accelerator, src: Source, seqs, tok,
                  student: Student | None = None, teacher=None,
                  prior: dict[str, Any] | None = None) -> Trainer:
    """Models, optimizer and schedule. ``student`` (float32) and ``teacher`` may be given
    already loaded (``tip distill`` keeps them between stages); else they are loaded.
    ``prior`` is the position of the run this one continues (``checkpoint.read_state``):
    the schedule is its, and this run's steps must fit in what is left of it."""
    opt = cfg.optim
    torch.manual_seed(cfg.seed)
    student, files = _student(cfg, src, student)
    check_model_fits_vocab(student.model, tok, src.student)
    student.prepare_training(cfg.training.gradient_checkpointing, cfg.lora)
    module = DistillModule(student.model, cfg.training.loss, real_vocab_size(tok),
                           src.temperature, cfg.training.train_chunk_size)
    total, schedule = run_steps(cfg, len(seqs), acc.num_processes, prior)
    offset = prior["global_step"] if prior else 0
    fsdp = cfg.training.fsdp
    mesh, own_group = mesh_lib.make_mesh(acc.device, acc.num_processes) if fsdp else (None, False)
    try:
        if fsdp:
            fsdp2.shard(module, mesh, bf16=accelerator_kwargs(cfg)["mixed_precision"] == "bf16")
            if files is not None:
                mesh_lib.load_sharded_weights(module, files, acc.device)
        optimizer = torch.optim.AdamW(student.trainable(module), lr=opt.lr,
                                      weight_decay=opt.weight_decay)
        scheduler = get_cosine_schedule_with_warmup(optimizer, opt.warmup, schedule)
        if not fsdp:
            module, optimizer = acc.prepare(module, optimizer)
        own_teacher = teacher is None or isinstance(teacher, torch.nn.Module)
        teacher = _teacher(cfg, acc, src, tok, teacher)
    except BaseException:
        mesh_lib.end_group(own_group)  # a single process's group is not left behind
        raise
    return Trainer(cfg, acc, module, optimizer, scheduler, TrainState(offset), teacher,
                   teacher.logits() if teacher else None, seqs, tok.pad_token_id, total,
                   schedule_steps=schedule, student=student, fsdp=fsdp, own_group=own_group,
                   own_teacher=teacher is not None and own_teacher)


def run_steps(cfg: TrainConfig, sequences: int, world: int,
              prior: dict[str, Any] | None = None) -> tuple[int, int]:
    """(the optimizer steps of this run, the steps its schedule spans): refused in one line
    when there is not one step of data, or when the steps do not fit in the schedule."""
    opt = cfg.optim
    per_epoch = steps_per_epoch(sequences, cfg, world)
    if per_epoch == 0:
        raise TipError(f"{sequences} sequences with kept tokens are fewer than one step's "
                       f"{opt.train_batch_size * opt.grad_accum * world} (batch "
                       "size x grad accum x processes); lower --train-batch-size or --grad-accum")
    total = opt.max_steps or opt.epochs * per_epoch
    offset = prior["global_step"] if prior else 0
    schedule = prior["schedule_steps"] if prior else (opt.schedule_steps or total)
    if offset + total > schedule:
        done = f"{offset} of its {schedule} steps are done, " if prior else ""
        raise TipError(f"this run takes {total} optimizer steps, but the learning-rate schedule "
                       f"spans {schedule} ({done}the cosine would rise again past its end): "
                       f"set --schedule-steps to at least {offset + total}"
                       + (" in the run continued" if prior else "") + ", or lower --max-steps")
    return total, schedule


def _student(cfg: TrainConfig, src: Source, student: Student | None):
    """(the student to train, the safetensors files of its tensors when it was made on the
    meta device for ``--fsdp``, else None): as given (float32), or loaded."""
    if student is not None:
        if student.dtype != torch.float32:
            raise ValueError("a student handed to training must hold float32 weights")
        return student, None
    if cfg.training.fsdp and not cfg.lora.lora_r:  # each process reads only its own rows
        empty, files = Student.empty(src.student, cfg.runtime.trust_remote_code)
        if empty is not None:
            return empty, files
    return Student.load(src.student, "cpu", torch.float32, cfg.runtime.trust_remote_code), None


def check_full_loss_teacher(cfg: TrainConfig, src: Source) -> None:
    """A *-full loss on a score by a teacher with another tokenizer is refused."""
    if LOSSES[cfg.training.loss].form != "full":
        return
    if src.stats.manifest.get("models", {}).get("teacher", {}).get("cross_tokenizer"):
        raise TipError(f"--loss {cfg.training.loss} needs the teacher's whole distribution over "
                       f"the student's vocabulary, but {src.stats.path} was scored by a teacher "
                       "with another tokenizer (--cross-tokenizer): use a *-topk loss (over "
                       "the candidates the two vocabularies share) or rkl-sampled")


def _teacher(cfg: TrainConfig, acc: Accelerator, src: Source, tok, teacher):
    """The teacher for the full-vocabulary losses only (``make_teacher``: as given, else
    loaded; sharded with ``--shard-teacher``), at the score's temperature."""
    if not cfg.teacher:
        return None
    rt = cfg.runtime
    if isinstance(teacher, torch.nn.Module) and not getattr(teacher, "hf_device_map", None):
        teacher.to(acc.device)  # a spread teacher stays where it is
    teacher = make_teacher(cfg.teacher, tok, rt, SimpleNamespace(world=acc.num_processes),
                           str(acc.device), resolve_dtype(rt.dtype, acc.device.type),
                           temperature=src.temperature, model=teacher)
    return require_in_process(teacher, f"--loss {cfg.training.loss}")


# ----------------------------------------------------------------------------- step


def micro_batches(tr: Trainer, step: int) -> list[MicroBatch]:
    """This process's micro-batches of ``step``, collated on the host."""
    acc = tr.acc
    return [make_micro_batch([tr.seqs[i] for i in idx], tr.pad_id)
            for idx in step_indices(len(tr.seqs), step, tr.cfg, acc.num_processes,
                                    acc.process_index)]


def train_step(tr: Trainer, step: int, micro: list[MicroBatch] | None = None
               ) -> dict[str, Any]:
    """One optimizer step over this process's micro-batches (``micro``, when collated
    ahead); returns global metrics. The per-token losses are summed on the device: the
    host waits for the device once a step, for the metrics."""
    acc = tr.acc
    micro = micro_batches(tr, step) if micro is None else micro
    kept = acc.reduce(torch.tensor(float(sum(m.rows_K.numel() for m in micro)),
                                   device=acc.device), "sum")
    scale = acc.num_processes / kept  # DDP and FSDP2 average gradients over processes
    quad_loss = torch.zeros(5, dtype=torch.float64, device=acc.device)
    quad_count = torch.zeros(5, dtype=torch.float64)
    tokens = 0
    for j, mb in enumerate(micro):
        sync = j == len(micro) - 1
        # FSDP2 reduce-scatters every micro-batch's gradients, so they stay sharded
        with contextlib.nullcontext() if sync or tr.fsdp else acc.no_sync(tr.module), \
                tr.teacher.gathered_head() if tr.teacher else contextlib.nullcontext():
            loss_sum, loss_K = _forward(tr, mb)
            acc.backward(loss_sum * scale)  # the teacher's logits are rebuilt in backward
        quad = mb.quadrant_K.long()
        quad_loss.index_add_(0, quad.to(acc.device), loss_K.detach().double())
        quad_count.index_add_(0, quad, torch.ones_like(quad, dtype=torch.float64))
        tokens += int(mb.attention_mask_BT.sum())
    max_norm = tr.cfg.optim.max_grad_norm or float("inf")
    if tr.fsdp:
        grad_norm = fsdp2.clip_grad_norm(tr.module.parameters(), max_norm)
    else:
        grad_norm = acc.clip_grad_norm_(tr.module.parameters(), max_norm)
    lr = tr.scheduler.get_last_lr()[0]
    tr.optimizer.step()
    tr.scheduler.step()
    tr.optimizer.zero_grad(set_to_none=True)
    return _step_metrics(acc, step, tr.state.offset, kept, quad_loss, quad_count, tokens,
                         grad_norm, lr)


def _forward(tr: Trainer, mb: MicroBatch):
    dev = tr.acc.device
    targets = {k: v.to(dev) for k, v in mb.targets.items()}
    rows, cols = mb.rows_K.to(dev), mb.cols_K.to(dev)
    ids, mask = mb.input_ids_BT.to(dev), mb.attention_mask_BT.to(dev)
    t_hidden = None
    # a sharded teacher's forward is a collective: every process runs it
    if tr.teacher is not None and (rows.numel() or tr.teacher.collective):
        hidden = tr.teacher.hidden(ids, mask)
        t_hidden = hidden[rows.to(hidden.device), cols.to(hidden.device)]
    return tr.module(ids, mask, rows, cols, targets, t_hidden, tr.t_head)


def _step_metrics(acc, step, offset, kept, quad_loss, quad_count, tokens, grad_norm,
                  lr) -> dict:
    """The step's metrics over every process: one reduction and one copy to the host."""
    counts = torch.cat([quad_count, torch.tensor([float(tokens)], dtype=torch.float64)])
    sums = acc.reduce(torch.cat([quad_loss, counts.to(acc.device)]), "sum")
    grad_norm = torch.as_tensor(grad_norm, device=acc.device)
    host = torch.cat([sums, kept.reshape(1).double(), grad_norm.reshape(1).double()]).cpu()
    q_loss, q_count = host[:5], host[5:10]
    by_quad = {QUADRANT_NAMES[q]: float(q_loss[q] / q_count[q]) for q in range(5)
               if q_count[q] > 0}
    return {"step": step + 1, "global_step": offset + step + 1,
            "loss": float(q_loss.sum() / host[11]),
            "kept_tokens": int(host[11]), "tokens": int(host[10]),
            "loss_by_quadrant": by_quad,
            "kept_by_quadrant": {QUADRANT_NAMES[q]: int(q_count[q]) for q in range(5)
                                 if q_count[q] > 0},
            "grad_norm": float(host[12]), "lr": lr}


# ----------------------------------------------------------------------------- loop


def run_loop(tr: Trainer) -> dict[str, Any]:
    """Steps from the trainer's position to the end, logging each and saving a checkpoint
    every ``save_every`` steps but the last; returns the run's summary."""
    acc, last = tr.acc, {}
    with progress_task("train", tr.total_steps, acc.is_main_process,
                       completed=tr.state.step) as advance, \
            ThreadPoolExecutor(1, thread_name_prefix="tip-collate") as ahead:
        # the next step's micro-batches are collated while this step computes
        upcoming = ahead.submit(micro_batches, tr, tr.state.step) \
            if tr.state.step < tr.total_steps else None
        while tr.state.step < tr.total_steps:
            t0 = time.perf_counter()
            micro = upcoming.result()
            if tr.state.step + 1 < tr.total_steps:
                upcoming = ahead.submit(micro_batches, tr, tr.state.step + 1)
            last = train_step(tr, tr.state.step, micro)
            last["tokens_per_s"] = last["tokens"] / (time.perf_counter() - t0)
            tr.state.step += 1
            _log(tr, last)
            advance(1, tokens=last["tokens"])
            # none after the last step: the trained model is saved next, and a resume
            # after a failed save repeats at most save_every steps
            if tr.cfg.save_every and tr.state.step % tr.cfg.save_every == 0 and \
                    tr.state.step < tr.total_steps:
                save_checkpoint(tr)
    return {"steps": tr.state.step, "final": last, "sequences": len(tr.seqs),
            "numel_per_process": numel_per_process(tr)}


def numel_per_process(tr: Trainer) -> dict[str, list[int]]:
    """Parameter and optimizer-state elements each process holds (by rank): all of them
    in every process with DDP, about 1/processes each under FSDP."""
    mine = fsdp2.local_numel(tr.module, tr.optimizer)
    keys = sorted(mine)
    every = tr.acc.gather(torch.tensor([[mine[k] for k in keys]], dtype=torch.int64,
                                       device=tr.acc.device)).cpu()
    return {k: [int(x) for x in every[:, i]] for i, k in enumerate(keys)}


def _log(tr: Trainer, metrics: dict[str, Any]) -> None:
    if tr.acc.is_main_process:
        with open(Path(tr.cfg.output) / METRICS, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        if tr.on_step is not None:
            tr.on_step(metrics)
