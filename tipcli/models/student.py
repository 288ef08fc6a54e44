"""The student as a component: what is trained, how it is saved, how it reaches the sampler.

Training and the loop ask the ``Student`` instead of reaching into the model:

- what is trained: ``prepare_training`` (every weight, today) and ``trainable`` (the
  parameters the optimizer steps);
- how it is saved: ``save`` (a ``save_pretrained`` directory, weights and tokenizer), or
  ``save_config`` where the weights are written elsewhere (gathered from FSDP2 shards a
  tensor at a time, ``tipcli.dist.fsdp.save_whole``);
- how its weights reach the sampler: ``sync`` (the hf sampler samples from the module
  itself; a vLLM engine gets them in place, ``update_weights``).

``version`` is its policy version: the optimizer steps it has taken in this run (0 as it
was loaded, or what the tip train directory it was loaded from records). The records it
samples carry it (``tipcli.records``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from tipcli.errors import TipError, first_line
from tipcli.models import loading
from tipcli.models.loading import empty_model
from tipcli.store.stagedir import read_manifest


def recorded_version(name: str | Path) -> int:
    """The policy version a tip train directory records for its student; 0 for any other
    model (a hub id, a .gguf file, a directory tip did not train)."""
    m = read_manifest(name) if Path(name).is_dir() else None
    if m is None or m.get("stage") != "train" or not m.get("complete"):
        return 0
    version = m["summary"].get("policy_version") if isinstance(m.get("summary"), dict) else None
    return version if isinstance(version, int) and version >= 0 else 0


class Student:
    """The model ``name`` names, as one process holds it."""

    def __init__(self, name: str, model, version: int = 0):
        self.name, self.model, self.version = str(name), model, version

    @classmethod
    def load(cls, name: str, device, dtype, trust_remote_code: bool = False,
             version: int | None = None) -> Student:
        model = loading.load_model(name, device, dtype, trust_remote_code)
        return cls(name, model, recorded_version(name) if version is None else version)

    @classmethod
    def empty(cls, name: str, trust_remote_code: bool = False):
        """(the student on the meta device, the safetensors file of each of its tensors)
        for a process to load only its own rows; (None, None) without safetensors."""
        model, files = empty_model(name, trust_remote_code)
        return (None, None) if model is None else (cls(name, model, recorded_version(name)),
                                                   files)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    # ------------------------------------------------------------------ training

    def prepare_training(self, gradient_checkpointing: bool = False) -> None:
        """Every weight trained (full fine-tuning), train mode, and with
        ``gradient_checkpointing`` the body's activations recomputed in backward."""
        self.model.requires_grad_(True)
        self.model.train()
        if gradient_checkpointing:
            enable = getattr(self.model, "activation_checkpointing_enable", None) or \
                self.model.gradient_checkpointing_enable  # its name in older transformers
            enable({"use_reentrant": False})

    @staticmethod
    def trainable(module: torch.nn.Module) -> list[torch.nn.Parameter]:
        """The parameters of ``module`` (the student, or what wraps it) the optimizer steps."""
        return [p for p in module.parameters() if p.requires_grad]

    def for_inference(self, dtype: torch.dtype | None = None) -> Student:
        """Eval mode, no gradients (and cast to ``dtype``): for sampling and scoring."""
        self.model.eval()
        self.model.requires_grad_(False)
        if dtype is not None:
            self.model.to(dtype)
        return self

    # ------------------------------------------------------------------ saving

    def save(self, out: str | Path, tok, state: dict[str, torch.Tensor] | None = None) -> None:
        """A ``save_pretrained`` directory: weights (``state``, default the model's),
        config, generation config and tokenizer."""
        self._saving(out, lambda: self.model.save_pretrained(out, state_dict=state,
                                                              safe_serialization=True), tok)

    def save_config(self, out: str | Path, tok) -> None:
        """Everything of ``save`` but the weights (written by their own writer)."""
        def config() -> None:
            self.model.config.save_pretrained(out)
            if self.model.can_generate():
                self.model.generation_config.save_pretrained(out)

        self._saving(out, config, tok)

    @staticmethod
    def _saving(out, write, tok) -> None:
        try:
            write()
            tok.save_pretrained(out)
        except (OSError, SafetensorError) as exc:
            raise TipError(f"could not save the trained model into {out}: {first_line(exc)}; "
                           "free space, then run the same command with --resume (from its "
                           "last checkpoint)") from None

    # ------------------------------------------------------------------ sampling

    def sync(self, sampler: Any) -> float | None:
        """Give ``sampler`` this student's weights; the seconds a copy took, or None when
        nothing was copied (the hf sampler samples from the module itself)."""
        return sampler.update_weights(self.model)
