"""`tip student`: a smaller student cut from a teacher by removing decoder layers.

    tip student HuggingFaceTB/SmolLM2-135M-Instruct --drop-layers 5,7,12 -o runs/student
    tip distill --student runs/student --teacher HuggingFaceTB/SmolLM2-135M-Instruct ...

The student is the teacher without the layers named (``--drop-layers``, or the others
than ``--keep-layers``): the same embeddings, final norm, head and tokenizer, and each
kept layer's weights unchanged, renumbered in order (``cut_layers``). A student cut from
its teacher shares its vocabulary and starts close to it, which on-policy distillation
needs. The output is a ``save_pretrained`` directory (``from_pretrained`` loads it, so it
is any command's ``--student``) plus ``manifest.json`` (stage ``student``), whose summary
records the teacher's layer count and the layers kept and removed. The teacher is loaded
on the CPU in its checkpoint's dtype. Models whose decoder layers are one ``ModuleList``
of ``config.num_hidden_layers`` layers (Llama, Qwen, Mistral, Gemma, SmolLM, GPT-2, ...)
can be cut.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from transformers import AutoModelForCausalLM

from tipcli.configs import StudentConfig, parse_layers
from tipcli.errors import TipError
from tipcli.models import loading
from tipcli.models.loading import load_config, load_tokenizer, model_ref, tokenizer_info
from tipcli.progress import console
from tipcli.store.layout import STUDENT
from tipcli.store.stagedir import StageWriter, read_manifest

PER_LAYER = ("layer_types", "no_rope_layers")  # config lists with one entry per layer


def kept_layers(cfg: StudentConfig, total: int) -> list[int]:
    """The teacher's layers the student keeps, in order, from ``--drop-layers`` or
    ``--keep-layers``; one-line errors for a layer out of range or none kept."""
    flag, text = ("--drop-layers", cfg.drop_layers) if cfg.drop_layers else \
        ("--keep-layers", cfg.keep_layers)
    named = parse_layers(text)
    beyond = [i for i in named if i >= total]
    if beyond:
        raise TipError(f"{flag} names layer {beyond[0]}, but {cfg.teacher} has {total} decoder "
                       f"layers, numbered 0 to {total - 1}")
    keep = sorted(named) if cfg.keep_layers else [i for i in range(total) if i not in named]
    if not keep:
        raise TipError(f"{flag} {text} removes all {total} decoder layers of {cfg.teacher}; "
                       "keep at least one")
    return keep


def decoder_layers(model) -> str:
    """The name of the model's ``ModuleList`` of decoder layers (``model.layers`` ...)."""
    n = model.config.num_hidden_layers
    names = [name for name, m in model.named_modules()
             if isinstance(m, torch.nn.ModuleList) and len(m) == n]
    if len(names) != 1:
        raise TipError(f"cannot tell the decoder layers of this {type(model).__name__} ("
                       f"{len(names)} lists of {n} modules); tip student cuts models with one")
    return names[0]


def cut_layers(model, keep: list[int]):
    """A new model: ``model`` with only its decoder layers ``keep`` (in order, renumbered
    from 0), every kept weight equal to the original's (the tensors are shared)."""
    prefix = decoder_layers(model) + "."
    config = copy.deepcopy(model.config)
    total = config.num_hidden_layers
    for attr in PER_LAYER:
        values = getattr(config, attr, None)
        if isinstance(values, list) and len(values) == total:
            setattr(config, attr, [values[i] for i in keep])
    config.num_hidden_layers = len(keep)
    new_index = {old: new for new, old in enumerate(keep)}
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith(prefix):
            index, rest = key[len(prefix):].split(".", 1)
            if int(index) not in new_index:
                continue
            key = f"{prefix}{new_index[int(index)]}.{rest}"
        state[key] = value
    with init_empty_weights(include_buffers=False):
        student = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    student.load_state_dict(state, assign=True)
    student.tie_weights()
    return student.eval()


def run_student(cfg: StudentConfig, overwrite: bool = False) -> Path:
    """Cut the student and write it into ``cfg.output``; returns the directory."""
    run = StageWriter.for_run(STUDENT, cfg, overwrite)
    total = load_config(cfg.teacher).num_hidden_layers
    keep = kept_layers(cfg, total)
    tok = load_tokenizer(cfg.teacher)
    writer = run.start({"teacher": model_ref(cfg.teacher)}, tokenizer_info(tok))
    if writer.complete:
        return writer.path
    teacher = loading.load_model(cfg.teacher, "cpu", "auto")
    student = cut_layers(teacher, keep)
    student.save_pretrained(writer.path, safe_serialization=True)
    tok.save_pretrained(writer.path)
    return writer.finish(_summary(teacher, student, keep))


def _summary(teacher, student, keep: list[int]) -> dict[str, Any]:
    total = teacher.config.num_hidden_layers
    return {"teacher_layers": total, "kept_layers": keep,
            "removed_layers": [i for i in range(total) if i not in keep],
            "teacher_parameters": sum(p.numel() for p in teacher.parameters()),
            "student_parameters": sum(p.numel() for p in student.parameters())}


def run_student_cli(cfg: StudentConfig, overwrite: bool = False) -> Path:
    """``run_student`` for the command line: one summary line on stderr, then the path."""
    path = run_student(cfg, overwrite)
    s = read_manifest(path)["summary"]
    removed = ", ".join(map(str, s["removed_layers"])) or "none"
    console.print(f"student: {len(s['kept_layers'])} of {s['teacher_layers']} decoder layers "
                  f"kept (removed {removed}), {_count(s['student_parameters'])} of "
                  f"{_count(s['teacher_parameters'])} parameters", markup=False,
                  highlight=False, soft_wrap=True)
    return path


def _count(n: int) -> str:
    return f"{n / 1e6:,.1f}M" if n >= 1e6 else f"{n:,}"
