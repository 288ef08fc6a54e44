"""The student as a component: what is trained, how it is saved, how it reaches the sampler.

Training and the loop ask the ``Student`` instead of reaching into the model:

- what is trained: ``prepare_training`` (every weight, or with ``--lora-r`` LoRA adapters
  on a frozen base, through peft: ``tipcli.models.adapters``) and ``trainable`` (the
  parameters the optimizer steps);
- how it is saved: ``save`` (a ``save_pretrained`` directory, weights and tokenizer; a
  peft adapter directory for a LoRA student), or
  ``save_config`` where the weights are written elsewhere (gathered from FSDP2 shards a
  tensor at a time, ``tipcli.dist.fsdp.save_whole``);
- how its weights reach the sampler: ``sync`` (the hf sampler samples from the module
  itself; a vLLM engine gets them in place, ``update_weights``, or a LoRA student's
  adapter alone as a new LoRA request).

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
from tipcli.models import adapters, loading
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

    def __init__(self, name: str, model, version: int = 0, peft=None, base: str = ""):
        self.name, self.model, self.version = str(name), model, version
        # with LoRA: the peft model around ``model`` (whose adapters sit inside it), and the
        # base model's name
        self.peft, self.base = peft, base or str(name)

    @classmethod
    def load(cls, name: str, device, dtype, trust_remote_code: bool = False,
             version: int | None = None) -> Student:
        """The model ``name`` names; a LoRA adapter directory on its base, kept apart and
        trainable."""
        version = recorded_version(name) if version is None else version
        base = adapters.adapter_base(name)
        if base is not None:
            peft = loading.load_adapter(name, base, device, dtype, trust_remote_code,
                                        trainable=True)
            return cls(name, peft.get_base_model(), version, peft, base)
        return cls(name, loading.load_model(name, device, dtype, trust_remote_code), version)

    @property
    def lora_rank(self) -> int:
        """The rank of its LoRA adapters; 0 when every weight is its own."""
        return adapters.rank(self.peft) if self.peft is not None else 0

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

    def prepare_training(self, gradient_checkpointing: bool = False, lora=None) -> None:
        """What is trained, train mode, and with ``gradient_checkpointing`` the body's
        activations recomputed in backward. Every weight; or with ``lora`` (the ``Lora``
        settings, ``lora_r`` > 0) LoRA adapters on the frozen base: made now, or the ones
        the student was loaded with (of the same rank)."""
        r = lora.lora_r if lora is not None else 0
        if self.peft is None and r:
            self.peft = adapters.add_adapters(self.model, lora, self.name)
        elif self.peft is not None and r != self.lora_rank:
            raise TipError(f"{self.name} is a LoRA adapter of rank {self.lora_rank}: pass "
                           f"--lora-r {self.lora_rank} to train it further, or train its merged "
                           "model (tip train ... --merged-output DIR) with the rank you want")
        if self.peft is not None:
            for name, p in self.model.named_parameters():
                p.requires_grad_(adapters.is_adapter_param(name))
        else:
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
        config, generation config and tokenizer; for a LoRA student a peft adapter directory
        (its adapters, ``state`` or as they are now, the base named inside) and the
        tokenizer."""
        if self.peft is not None:  # ``state``: the adapters' alone
            self._saving(out, lambda: adapters.save(self.peft, out, self.base, state), tok)
            return
        self._saving(out, lambda: self.model.save_pretrained(out, state_dict=state,
                                                              safe_serialization=True), tok)

    def save_merged(self, out: str | Path, tok) -> None:
        """A LoRA student with its adapters merged into the base's weights, as an ordinary
        ``save_pretrained`` directory. The merge happens in place: afterwards the student
        holds the merged model and no adapters."""
        merged = self.peft.merge_and_unload()
        self.model, self.peft = merged, None
        self.save(out, tok)

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
        return sampler.update_weights(self.model, self.peft)
