"""LoRA adapters through peft: made on a student, loaded from a directory, saved as one.

A peft adapter directory (``adapter_config.json``, ``adapter_model.safetensors``; what
``tip train --lora-r R`` writes, with the student's tokenizer beside them) names its base
model in ``base_model_name_or_path``. Every command that takes a model takes such a
directory: the base is loaded and the adapter put on it (``put_on``), merged into the
weights for sampling and scoring (``tipcli.models.loading.load_model``), or kept apart and
trainable for training (``tipcli.models.student``). The adapter's modules sit inside the
transformers model itself (peft replaces the targeted linear layers in place), so what
runs a model, its body and its head, runs an adapted one unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from tipcli.errors import TipError, first_line

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"


def adapter_base(name: str | Path) -> str | None:
    """The base model the adapter directory ``name`` is for; None when ``name`` is not an
    adapter directory."""
    path = Path(name) / CONFIG
    if not path.is_file():
        return None
    try:
        base = json.loads(path.read_text()).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        base = None
    if not isinstance(base, str) or not base:
        raise TipError(f"{path} names no base model (base_model_name_or_path): write the "
                       "base model's hub id or path there")
    return base


def put_on(model, name: str, base: str, trainable: bool):
    """The adapter directory ``name`` on ``model`` (its base, loaded): a peft model, the
    adapter kept apart and, with ``trainable``, trained."""
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, name, is_trainable=trainable)
    except Exception as exc:  # peft raises many kinds for an adapter that does not fit
        raise TipError(f"could not put the LoRA adapter {name} on its base {base}: "
                       f"{first_line(exc)}") from None


def merged(peft_model):
    """The adapted model with its adapters merged into the base's weights: a plain
    transformers model, in eval mode."""
    model = peft_model.merge_and_unload()
    model.eval()
    return model


def base_missing(name: str, base: str, exc: TipError) -> TipError:
    return TipError(f"the LoRA adapter {name} is for the base model {base}, which could not "
                    f"be loaded ({str(exc).removeprefix('error: ')}); put the base there, or "
                    f"set base_model_name_or_path in {Path(name) / CONFIG}")


def add_adapters(model, lora, name: str):
    """New LoRA adapters (``lora``: the ``Lora`` settings) on ``model``, in place; returns the
    peft model around it. A target that matches no module is one line listing those that
    exist."""
    from peft import LoraConfig, get_peft_model

    targets: Any = lora.lora_targets
    if targets != "all-linear":
        targets = [t.strip() for t in targets.split(",")]
        leaves = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules() if n}
        missing = [t for t in targets if t not in leaves]
        if missing:
            linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                             if isinstance(m, torch.nn.Linear)} - {"lm_head"})
            raise TipError(f"--lora-targets names {missing[0]}, which matches no module of "
                           f"{name}; its linear layers are {', '.join(linear)} (or use "
                           "all-linear)")
    config = LoraConfig(r=lora.lora_r, lora_alpha=lora.lora_alpha,
                        lora_dropout=lora.lora_dropout, target_modules=targets,
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def rank(peft_model) -> int:
    return int(peft_model.peft_config["default"].r)


def is_adapter_param(name: str) -> bool:
    """Whether a parameter (by its name in the model) belongs to a LoRA adapter."""
    return "lora_" in name


def save(peft_model, out: str | Path, base: str, state: dict | None = None) -> None:
    """The adapter as a peft directory whose ``base_model_name_or_path`` is ``base`` (a
    local directory as an absolute path, so it loads from anywhere). ``state``: the
    adapters' tensors named as in the model inside (under FSDP gathered from the shards);
    default the peft model's own."""
    config = peft_model.peft_config["default"]
    config.base_model_name_or_path = str(Path(base).resolve()) if Path(base).exists() else base
    kw = {} if state is None else {"state_dict": {f"base_model.model.{k}": v
                                                  for k, v in state.items()}}
    peft_model.save_pretrained(str(out), safe_serialization=True, **kw)
