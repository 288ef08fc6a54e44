"""`tip train`: distil the teacher into the student on the kept tokens only.

    tip train runs/score --strategy soft-or --keep 0.5 --loss rkl-topk -o runs/train \
        --lr 1e-5 --batch-size 4 --grad-accum 2 --max-steps 100 --save-every 50

The input is a score directory (tokens selected on the fly with the same functions as
``tip select``), a selection directory, or, for the ``*-full`` losses with
``--teacher``, a rollout directory. Each step runs the transformer body on whole
sequences, gathers the hidden states at kept positions and applies the LM head and the
loss in chunks whose logits are rebuilt in backward (``tipcli.losses``). The loss is
the sum over kept tokens divided by the global number of kept tokens of the optimizer
step, across micro-batches and processes, so it does not depend on how a step is split.

Multi-process runs (DDP; FSDP through an accelerate config) go through accelerate::

    accelerate launch --multi_gpu --num_processes 2 -m tipcli train runs/score -o runs/train

(On a machine without GPUs the same command runs two CPU processes over gloo; note that
``accelerate launch --cpu --num_processes 2`` starts a single process.)

The output directory is a transformers checkpoint (``from_pretrained`` loads it, so it
can be the next rollout's ``--student``) plus ``manifest.json`` (stage ``train``),
``metrics.jsonl`` (one line per step) and, with ``--save-every``, the latest resumable
state under ``checkpoints/``. ``--resume`` continues from it; on CPU the result equals an
uninterrupted run. Data order depends only on (seed, epoch), so a step's sequences
follow from its number.

Shape letters: B sequences, T tokens, K kept positions, H hidden, V vocabulary, k top-k.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tipcli.config import option, to_dict
from tipcli.errors import TipError
from tipcli.losses import FULL_LOSSES, LOSSES, TOPK_LOSSES, loss_targets

METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
STATE = "trainer_state.json"
QUADRANT_NAMES = {0: "unknown", 1: "Q1", 2: "Q2", 3: "Q3", 4: "Q4"}


@dataclass(frozen=True)
class TrainConfig:
    input: str = option("", "Score, selection or (for *-full losses) rollout directory.")
    output: str = option("", "Output directory: the trained model, metrics and checkpoints.")
    student: str = option("", "Student model to train (default: the input's student).")
    teacher: str = option("", "Teacher model, loaded during training for the *-full losses.")
    loss: str = option("rkl-topk", f"Loss: {', '.join(LOSSES)}.")
    strategy: str = option("soft-or", "Selection strategy for a score directory, as in tip "
                           "select (all, random, entropy, soft-or, q3, quadrant:Q1+Q3, ...).")
    keep: float = option(0.5, "Fraction of response tokens kept, for a score directory.")
    scope: str = option("sequence", "Selection budget per 'sequence' or per 'group'.")
    divergence: str = option("rkl", "Divergence the selection ranks by: rkl, fkl, jsd.")
    normalize: str = option("minmax", "Selection normalisation: minmax, bound, rank.")
    group_size: int = option(64, "Sequences per selection normalisation group.")
    lr: float = option(1e-6, "Peak learning rate of AdamW.")
    weight_decay: float = option(0.0, "AdamW weight decay.")
    warmup: int = option(0, "Linear warmup steps before the cosine decay.")
    epochs: int = option(1, "Passes over the data (ignored when --max-steps is set).")
    max_steps: int = option(0, "Optimizer steps to run (0 = --epochs passes).")
    batch_size: int = option(4, "Sequences per micro-batch, per process.")
    grad_accum: int = option(1, "Micro-batches per optimizer step.")
    max_grad_norm: float = option(1.0, "Gradient clipping norm (0 = no clipping).")
    chunk_size: int = option(256, "Kept positions whose logits exist at once.")
    gradient_checkpointing: bool = option(False, "Recompute the body's activations in backward.")
    shuffle: bool = option(True, "Shuffle sequences each epoch (seeded).")
    seed: int = option(0, "Seed of data order, selection and initialisation.")
    save_every: int = option(0, "Save a resumable checkpoint every N steps (0 = never).")
    mixed_precision: str = option("auto", "auto (bf16 on GPU, none on CPU), no, bf16.")
    device: str = option("auto", "auto or cpu (accelerate places the model).")
    trust_remote_code: bool = option(False, "Allow model code from the hub (only if you trust it).")

    def validate(self) -> list[str]:
        p = []
        if not self.input:
            p.append("an input directory is required")
        if not self.output:
            p.append("-o/--output is required")
        if self.loss not in LOSSES:
            p.append(f"--loss must be one of {', '.join(LOSSES)} (got '{self.loss}')")
        if self.loss in FULL_LOSSES and not self.teacher:
            p.append(f"--loss {self.loss} needs --teacher")
        p += self.selection().validate()
        p += [f"--{n.replace('_', '-')} must be at least 1" for n in
              ("epochs", "batch_size", "grad_accum", "chunk_size") if getattr(self, n) < 1]
        p += [f"--{n.replace('_', '-')} must be >= 0" for n in
              ("warmup", "max_steps", "save_every", "max_grad_norm", "weight_decay")
              if getattr(self, n) < 0]
        if self.lr <= 0:
            p.append("--lr must be > 0")
        if self.mixed_precision not in ("auto", "no", "bf16"):
            p.append("--mixed-precision must be auto, no or bf16")
        if self.device not in ("auto", "cpu"):
            p.append("--device must be auto or cpu")
        return p

    def selection(self):
        """The ``tip select`` settings that pick the kept tokens of a score directory."""
        from tipcli.select import SelectConfig

        return SelectConfig(score=self.input or "-", output=self.output or "-",
                            strategy=self.strategy, keep=self.keep, scope=self.scope,
                            divergence=self.divergence, normalize=self.normalize,
                            group_size=self.group_size, seed=self.seed)


# ----------------------------------------------------------------------------- data


@dataclass
class Source:
    """The directories a run reads: the input, the score dir (if any) and the student."""

    input: Any                # StageDir given on the command line
    stats: Any                # StageDir whose shards hold tokens and teacher signal
    selection: list | None    # per shard {"selected", "quadrant"}, or None for all tokens
    student: str
    temperature: float


def open_source(cfg: TrainConfig) -> Source:
    from tipcli.shards import StageDir

    d = StageDir.open(cfg.input, stage=("score", "select", "rollout"))
    if d.stage == "select":
        score = StageDir.open(d.manifest["parent"]["path"], stage="score")
        selection = [d.load_shard(i) for i in range(len(d.shards))]
        if len(selection) != len(score.shards):
            raise TipError(f"{d.path} has {len(selection)} shards but its score directory "
                           f"{score.path} has {len(score.shards)}; run tip select again")
    elif d.stage == "score":
        score, selection = d, _select_on_the_fly(cfg, d)
    else:
        score, selection = d, None
        _check_rollout_loss(cfg, d)
    student = cfg.student or score.config.get("student") or \
        score.manifest["models"]["student"]["id"]
    temperature = float(score.config.get("temperature", 1.0)) if score.stage == "score" else 1.0
    return Source(d, score, selection, student, temperature)


def _check_rollout_loss(cfg: TrainConfig, d) -> None:
    if cfg.loss not in FULL_LOSSES:
        raise TipError(f"{d.path} is a rollout directory with no teacher signal; --loss "
                       f"{cfg.loss} needs a score directory (tip score), or use a *-full loss "
                       "with --teacher")
    if cfg.strategy != "all":
        raise TipError(f"{d.path} is a rollout directory: it holds no statistics to select "
                       "by; pass --strategy all or score it first (tip score)")


def _select_on_the_fly(cfg: TrainConfig, score) -> list[dict]:
    """The mask and quadrants ``tip select`` would write (with ``all``: every token, and
    the quadrants still known for the per-quadrant losses)."""
    from tipcli.select import compute_selection

    return compute_selection(score, cfg.selection())


def load_sequences(cfg: TrainConfig, src: Source) -> list[dict[str, Any]]:
    """Every sequence with at least one kept token: prompt and response ids, ``keep`` and
    ``quadrant`` per response token, and the per-token tensors the loss reads."""
    import torch

    from tipcli.shards import split_sequences

    needed = loss_targets(cfg.loss)
    seqs = []
    for i in range(len(src.stats.shards)):
        shard = src.stats.load_shard(i)
        _check_targets(cfg, src, shard, needed)
        keep_T = shard["response_mask"].bool()
        quad_T = torch.zeros_like(keep_T, dtype=torch.uint8)
        if src.selection is not None:
            keep_T = keep_T & src.selection[i]["selected"].bool()
            quad_T = src.selection[i]["quadrant"].to(torch.uint8)
        shard = {**shard, "keep": keep_T, "quadrant": quad_T}
        for seq in split_sequences(shard):
            if bool(seq["keep"].any()):
                seqs.append({n: seq[n] for n in ("prompt_ids", "response_ids", "keep",
                                                 "quadrant", *needed)})
    if not seqs:
        raise TipError(f"the selection of {src.input.path} keeps 0 tokens; raise --keep or "
                       "choose another --strategy")
    return seqs


def _check_targets(cfg: TrainConfig, src: Source, shard: dict, needed: tuple[str, ...]) -> None:
    missing = [n for n in needed if n not in shard]
    if not missing:
        return
    if cfg.loss in TOPK_LOSSES:
        raise TipError(f"--loss {cfg.loss} needs the teacher's top-k, but {src.stats.path} was "
                       f"scored with --top-k {src.stats.config.get('top_k', 0)}; score again "
                       "with --top-k > 0, or use --loss rkl-sampled or a *-full loss")
    raise TipError(f"--loss {cfg.loss} needs {', '.join(missing)}, missing from "
                   f"{src.stats.path}")


# ----------------------------------------------------------------------------- batches


def steps_per_epoch(num_sequences: int, cfg: TrainConfig, world: int) -> int:
    return num_sequences // (cfg.batch_size * cfg.grad_accum * world)


def step_indices(num_sequences: int, step: int, cfg: TrainConfig, world: int,
                 rank: int) -> list[list[int]]:
    """This process's micro-batches (sequence indices) for optimizer step ``step``.

    A step takes the next ``batch_size x grad_accum x world`` sequences of the epoch's
    order (seeded by seed and epoch); process ``rank`` takes its contiguous share."""
    import torch

    per_epoch = steps_per_epoch(num_sequences, cfg, world)
    epoch, i = divmod(step, per_epoch)
    if cfg.shuffle:
        order = torch.randperm(num_sequences,
                               generator=torch.Generator().manual_seed(cfg.seed * 100003 + epoch))
    else:
        order = torch.arange(num_sequences)
    per_rank = cfg.batch_size * cfg.grad_accum
    start = i * per_rank * world + rank * per_rank
    mine = order[start:start + per_rank].tolist()
    return [mine[a:a + cfg.batch_size] for a in range(0, per_rank, cfg.batch_size)]


@dataclass
class MicroBatch:
    input_ids_BT: Any
    attention_mask_BT: Any
    rows_K: Any
    cols_K: Any
    quadrant_K: Any
    targets: dict[str, Any]


def make_micro_batch(seqs: list[dict[str, Any]], pad_id: int) -> MicroBatch:
    """Right-padded sequences and, for each kept token, the hidden-state position that
    predicts it and its loss targets."""
    import torch

    from tipcli.forward import collate

    batch = collate(seqs, pad_id)
    keep_P = torch.cat([s["keep"] for s in seqs])
    names = [n for n in seqs[0] if n not in ("prompt_ids", "keep", "quadrant")]
    targets = {n: torch.cat([s[n] for s in seqs])[keep_P] for n in names}
    quad = torch.cat([s["quadrant"] for s in seqs])[keep_P]
    return MicroBatch(batch.input_ids_BT, batch.attention_mask_BT, batch.rows_P[keep_P],
                      batch.cols_P[keep_P], quad, targets)


# ----------------------------------------------------------------------------- model


def student_head(model, vocab: int, temperature: float):
    """hidden [*, H] -> logits [*, V], as ``tipcli.stats.head_logits`` but with the padded
    rows cut from the weight instead of from the logits, so backward builds no
    (positions x padded V) gradient to slice. Other head types fall back to head_logits."""
    import torch
    import torch.nn.functional as F

    from tipcli.stats import head_logits

    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear:
        return head_logits(model, vocab, temperature)
    cap = getattr(model.config, "final_logit_softcapping", None)
    scale = getattr(model.config, "logit_scale", None)

    def fn(hidden: torch.Tensor) -> torch.Tensor:
        bias = None if head.bias is None else head.bias[:vocab]
        logits = F.linear(hidden, head.weight[:vocab], bias)
        if scale is not None:
            logits = logits * scale
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits / temperature if temperature != 1.0 else logits

    return fn


def distill_module(student, loss: str, vocab: int, temperature: float, chunk_size: int):
    import torch

    from tipcli.forward import body_hidden
    from tipcli.losses import chunked_token_loss

    class DistillModule(torch.nn.Module):
        """The student, with a forward that returns the loss on kept positions only
        (one module call, so DDP and FSDP see the whole computation)."""

        def __init__(self):
            super().__init__()
            self.student = student

        def forward(self, input_ids_BT, attention_mask_BT, rows_K, cols_K, targets,
                    t_hidden_KH=None, t_head=None):
            hidden_BTH = body_hidden(self.student, input_ids_BT, attention_mask_BT)
            head = student_head(self.student, vocab, temperature)
            if rows_K.numel() == 0:  # no kept token: keep every parameter in the graph
                return head(hidden_BTH[:, :1]).sum() * 0.0, hidden_BTH.new_zeros(0)
            loss_K = chunked_token_loss(loss, hidden_BTH[rows_K, cols_K], head, targets,
                                        chunk_size, t_hidden_KH, t_head)
            return loss_K.sum(), loss_K.detach()

    return DistillModule()


def make_accelerator(cfg: TrainConfig):
    import torch
    from accelerate import Accelerator

    mp = cfg.mixed_precision
    cpu = cfg.device == "cpu" or not torch.cuda.is_available()
    if mp == "auto":
        mp = "no" if cpu else "bf16"
    try:
        return Accelerator(cpu=cpu, mixed_precision=mp)
    except (RuntimeError, ValueError) as exc:  # e.g. an FSDP launch on a machine without GPUs
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TipError(f"accelerate could not set up this launch: {first} "
                       "(check the `accelerate launch` options or `accelerate config`)") from None


@dataclass
class Trainer:
    """Everything a step needs, prepared by accelerate."""

    cfg: TrainConfig
    acc: Any
    module: Any
    optimizer: Any
    scheduler: Any
    state: Any
    teacher: Any
    t_head: Any
    seqs: list
    pad_id: int
    total_steps: int


class TrainState:
    """The data position, saved with every checkpoint."""

    def __init__(self):
        self.step = 0

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step}

    def load_state_dict(self, d: dict[str, int]) -> None:
        self.step = int(d["step"])


def build_trainer(cfg: TrainConfig, acc, src: Source, seqs, tok, student=None,
                  teacher=None) -> Trainer:
    """Models, optimizer and schedule. ``student`` (float32) and ``teacher`` may be given
    already loaded (``tip distill`` keeps them between stages); else they are loaded."""
    import torch
    from transformers import get_cosine_schedule_with_warmup

    from tipcli.models import (check_model_fits_vocab, load_model, real_vocab_size,
                               resolve_dtype)
    from tipcli.stats import head_logits

    torch.manual_seed(cfg.seed)
    if student is None:
        student = load_model(src.student, "cpu", torch.float32, cfg.trust_remote_code)
    elif student.dtype != torch.float32:
        raise ValueError("a student handed to training must hold float32 weights")
    student.requires_grad_(True)
    check_model_fits_vocab(student, tok, src.student)
    student.train()
    if cfg.gradient_checkpointing:
        enable = getattr(student, "activation_checkpointing_enable", None) or \
            student.gradient_checkpointing_enable  # its name in older transformers
        enable({"use_reentrant": False})
    vocab = real_vocab_size(tok)
    module = distill_module(student, cfg.loss, vocab, src.temperature, cfg.chunk_size)
    optimizer = torch.optim.AdamW(module.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    per_epoch = steps_per_epoch(len(seqs), cfg, acc.num_processes)
    if per_epoch == 0:
        raise TipError(f"{len(seqs)} sequences with kept tokens are fewer than one step's "
                       f"{cfg.batch_size * cfg.grad_accum * acc.num_processes} (batch size x "
                       "grad accum x processes); lower --batch-size or --grad-accum")
    total = cfg.max_steps or cfg.epochs * per_epoch
    scheduler = get_cosine_schedule_with_warmup(optimizer, cfg.warmup, total)
    module, optimizer = acc.prepare(module, optimizer)
    state = TrainState()
    acc.register_for_checkpointing(scheduler, state)
    t_head = None
    if not cfg.teacher:  # only the full-vocabulary losses use a teacher in training
        teacher = None
    elif teacher is None:
        teacher = load_model(cfg.teacher, str(acc.device),
                             resolve_dtype("auto", acc.device.type), cfg.trust_remote_code)
    if teacher is not None:
        teacher.to(acc.device)
        check_model_fits_vocab(teacher, tok, cfg.teacher)
        teacher.requires_grad_(False)
        t_head = head_logits(teacher, vocab, src.temperature)
    return Trainer(cfg, acc, module, optimizer, scheduler, state, teacher, t_head, seqs,
                   tok.pad_token_id, total)


# ----------------------------------------------------------------------------- step


def train_step(tr: Trainer, step: int) -> dict[str, Any]:
    """One optimizer step over this process's micro-batches; returns global metrics."""
    import contextlib

    import torch

    acc = tr.acc
    micro = [make_micro_batch([tr.seqs[i] for i in idx], tr.pad_id)
             for idx in step_indices(len(tr.seqs), step, tr.cfg, acc.num_processes,
                                     acc.process_index)]
    kept = acc.reduce(torch.tensor(float(sum(m.rows_K.numel() for m in micro)),
                                   device=acc.device), "sum")
    scale = acc.num_processes / kept  # DDP averages gradients over processes
    quad_loss, quad_count = torch.zeros(5, dtype=torch.float64), torch.zeros(5, dtype=torch.float64)
    tokens = 0
    for j, mb in enumerate(micro):
        sync = j == len(micro) - 1
        with contextlib.nullcontext() if sync else acc.no_sync(tr.module):
            loss_sum, loss_K = _forward(tr, mb)
            acc.backward(loss_sum * scale)
        quad = mb.quadrant_K.long()
        quad_loss.index_add_(0, quad, loss_K.double().cpu())
        quad_count.index_add_(0, quad, torch.ones_like(quad, dtype=torch.float64))
        tokens += int(mb.attention_mask_BT.sum())
    grad_norm = acc.clip_grad_norm_(tr.module.parameters(), tr.cfg.max_grad_norm or float("inf"))
    lr = tr.scheduler.get_last_lr()[0]
    tr.optimizer.step()
    tr.scheduler.step()
    tr.optimizer.zero_grad(set_to_none=True)
    return _step_metrics(acc, step, kept, quad_loss, quad_count, tokens, grad_norm, lr)


def _forward(tr: Trainer, mb: MicroBatch):
    import torch

    from tipcli.forward import body_hidden

    dev = tr.acc.device
    targets = {k: v.to(dev) for k, v in mb.targets.items()}
    rows, cols = mb.rows_K.to(dev), mb.cols_K.to(dev)
    ids, mask = mb.input_ids_BT.to(dev), mb.attention_mask_BT.to(dev)
    t_hidden = None
    if tr.teacher is not None and rows.numel():
        with torch.no_grad():
            t_hidden = body_hidden(tr.teacher, ids, mask)[rows, cols]
    return tr.module(ids, mask, rows, cols, targets, t_hidden, tr.t_head)


def _step_metrics(acc, step, kept, quad_loss, quad_count, tokens, grad_norm, lr) -> dict:
    import torch

    sums = acc.reduce(torch.cat([quad_loss, quad_count, torch.tensor([float(tokens)],
                                dtype=torch.float64)]).to(acc.device), "sum").cpu()
    q_loss, q_count = sums[:5], sums[5:10]
    by_quad = {QUADRANT_NAMES[q]: float(q_loss[q] / q_count[q]) for q in range(5)
               if q_count[q] > 0}
    return {"step": step + 1, "loss": float(q_loss.sum() / kept.cpu()),
            "kept_tokens": int(kept), "tokens": int(sums[10]),
            "loss_by_quadrant": by_quad,
            "kept_by_quadrant": {QUADRANT_NAMES[q]: int(q_count[q]) for q in range(5)
                                 if q_count[q] > 0},
            "grad_norm": float(grad_norm), "lr": lr}


# ----------------------------------------------------------------------------- run


def run_train(cfg: TrainConfig, overwrite: bool = False, resume: bool = False) -> Path:
    """Train the student on the kept tokens of ``cfg.input``; returns the output directory."""
    return train_model(cfg, overwrite, resume)[0]


def train_model(cfg: TrainConfig, overwrite: bool = False, resume: bool = False,
                student=None, teacher=None):
    """``run_train`` on models that may already be loaded (see ``build_trainer``).

    Returns the output directory and the trained student in eval mode (None when the run
    had already completed and nothing was trained)."""
    from tipcli.models import load_tokenizer, quiet_transformers

    quiet_transformers()
    acc = make_accelerator(cfg)
    src = open_source(cfg)
    seqs = load_sequences(cfg, src)
    tok = load_tokenizer(src.student, cfg.trust_remote_code)
    _check_tokenizer(tok, src)
    _check_output(cfg, overwrite, resume)
    acc.wait_for_everyone()  # every process has checked before the main one writes
    writer = _writer(cfg, src, tok, overwrite) if acc.is_main_process else None
    acc.wait_for_everyone()
    if _finished(cfg.output):  # the same run already completed: nothing to do
        return Path(cfg.output), None
    tr = build_trainer(cfg, acc, src, seqs, tok, student, teacher)
    if resume:
        _load_latest(tr)
    summary = _loop(tr)
    _save_model(tr, tok)
    if writer is not None:
        writer.finish(summary)
    acc.wait_for_everyone()
    trained = acc.unwrap_model(tr.module).student
    acc.free_memory()  # drop the optimizer state and accelerate's references to the model
    trained.eval()
    trained.requires_grad_(False)
    return Path(cfg.output), trained


def _finished(output: str) -> bool:
    from tipcli.shards import MANIFEST

    return bool(json.loads((Path(output) / MANIFEST).read_text()).get("complete"))


def _check_tokenizer(tok, src: Source) -> None:
    from tipcli.models import tokenizer_info

    if tokenizer_info(tok)["fingerprint"] != src.stats.manifest["tokenizer"]["fingerprint"]:
        raise TipError(f"student {src.student} tokenizer differs from the one that wrote "
                       f"{src.stats.path}; pass the input's student with --student")


def _check_output(cfg: TrainConfig, overwrite: bool, resume: bool) -> None:
    from tipcli.shards import MANIFEST

    mpath = Path(cfg.output) / MANIFEST
    if overwrite and resume:
        raise TipError("--resume and --overwrite exclude each other")
    if resume and not mpath.is_file():
        raise TipError(f"--resume given but {cfg.output} holds no train run to resume")
    if mpath.is_file() and not overwrite and not resume and \
            not json.loads(mpath.read_text()).get("complete"):
        raise TipError(f"{cfg.output} holds an unfinished train run; pass --resume to continue "
                       "it or --overwrite to start again")


def _writer(cfg: TrainConfig, src: Source, tok, overwrite: bool):
    from tipcli.models import model_ref, tokenizer_info
    from tipcli.shards import StageWriter

    models = {"student": model_ref(src.student)}
    if cfg.teacher:
        models["teacher"] = model_ref(cfg.teacher)
    resolved = {**to_dict(cfg), "student": src.student, "temperature": src.temperature}
    if src.input.stage == "select":
        resolved["selection"] = src.input.config
    return StageWriter(cfg.output, "train", resolved, models, tokenizer_info(tok),
                       parent=src.input, overwrite=overwrite)


def _loop(tr: Trainer) -> dict[str, Any]:
    from tipcli.progress import progress

    acc, last = tr.acc, {}
    bar = progress()
    bar.disable = bar.disable or not acc.is_main_process
    with bar:
        task = bar.add_task("train", total=tr.total_steps, tokens=0)
        bar.update(task, completed=tr.state.step)
        done_tokens = 0
        while tr.state.step < tr.total_steps:
            t0 = time.perf_counter()
            last = train_step(tr, tr.state.step)
            last["tokens_per_s"] = last["tokens"] / (time.perf_counter() - t0)
            tr.state.step += 1
            _log(tr, last)
            done_tokens += last["tokens"]
            bar.update(task, advance=1, tokens=done_tokens)
            if tr.cfg.save_every and tr.state.step % tr.cfg.save_every == 0:
                save_checkpoint(tr)
    return {"steps": tr.state.step, "final": last, "sequences": len(tr.seqs)}


def _log(tr: Trainer, metrics: dict[str, Any]) -> None:
    if tr.acc.is_main_process:
        with open(Path(tr.cfg.output) / METRICS, "a") as f:
            f.write(json.dumps(metrics) + "\n")


def save_checkpoint(tr: Trainer) -> Path:
    """Weights, optimizer, scheduler, RNG and data position under checkpoints/step-N;
    the previous checkpoint is removed once the new one is complete."""
    root = Path(tr.cfg.output) / CHECKPOINTS
    final = root / f"step-{tr.state.step:06d}"
    tmp = root / f".{final.name}.tmp"
    tr.acc.save_state(str(tmp), safe_serialization=True)
    tr.acc.wait_for_everyone()
    if tr.acc.is_main_process:
        _truncate_metrics(tr.cfg.output, tr.state.step)
        (tmp / STATE).write_text(json.dumps({"step": tr.state.step}) + "\n")
        tmp.rename(final)
        for old in root.iterdir():
            if old != final:
                shutil.rmtree(old)
    tr.acc.wait_for_everyone()
    return final


def _load_latest(tr: Trainer) -> None:
    root = Path(tr.cfg.output) / CHECKPOINTS
    done = sorted(p for p in root.glob("step-*") if (p / STATE).is_file()) if root.is_dir() else []
    if not done:
        _truncate_metrics(tr.cfg.output, 0)
        return
    tr.acc.load_state(str(done[-1]))
    if tr.acc.is_main_process:
        _truncate_metrics(tr.cfg.output, tr.state.step)
    tr.acc.wait_for_everyone()


def _truncate_metrics(output: str, step: int) -> None:
    """Drop metric lines past ``step`` (a killed run may have logged steps it did not save)."""
    path = Path(output) / METRICS
    if not path.is_file():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    path.write_text("".join(ln + "\n" for ln in lines if json.loads(ln)["step"] <= step))


def _save_model(tr: Trainer, tok) -> None:
    """The trained student as a plain transformers checkpoint at the top of the output."""
    state = tr.acc.get_state_dict(tr.module)
    state = {k.removeprefix("student."): v for k, v in state.items()}
    student = tr.acc.unwrap_model(tr.module).student
    if tr.acc.is_main_process:
        student.save_pretrained(tr.cfg.output, state_dict=state, safe_serialization=True)
        tok.save_pretrained(tr.cfg.output)
