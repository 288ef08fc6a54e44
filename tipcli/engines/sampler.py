"""Samplers: how the responses of a rollout (and of `tip eval` and `tip distill`) are drawn.

    tip rollout --student S --prompts P -o runs/rollout --backend hf     # transformers
    tip rollout --student S --prompts P -o runs/rollout --backend vllm   # vLLM, an extra

A sampler turns token-id prompts into the flat tensors of a rollout shard
(``docs/format.md``, ``tipcli.engines.common``): responses up to and including EOS, the
finish reason, and each sampled token's log-prob under the distribution it was drawn from
(the logits over the real vocabulary divided by the temperature, truncated by top-k, then
top-p, as transformers' warpers do; at temperature 0, greedy, the plain log-softmax).
Its randomness follows from the rollout seed and each response's place, never from the
batch or the process that draws it.

Every caller (rollout, eval, the loop) goes through ``Sampler``; ``make_sampler`` is the
one place that picks the backend: ``hf`` (``tipcli.engines.hf``: transformers'
``generate`` on a loaded model) or ``vllm`` (``tipcli.engines.vllm_engine``: a vLLM engine
of its own). After training, ``update_weights`` gives the sampler the new student.
"""

from __future__ import annotations

from typing import Any, Protocol

from tipcli.configs import Runtime, Sampling
from tipcli.dist.processes import Processes
from tipcli.engines.common import Advance
from tipcli.models import loading
from tipcli.models.loading import resolve_dtype
from tipcli.records import RolloutBatch


class Sampler(Protocol):
    """What rollout, eval and the on-policy loop call."""

    name: str                  # the backend: "hf" or "vllm"
    context: int | None        # the model's context in tokens (None: unknown)
    eos: list[int]             # ids that end a response
    model: Any                 # the torch model sampled from (hf), or None (an engine's own)

    def sample_shard(self, prompts: list[list[int]], keys: list[tuple[int, int]],
                     cfg: Sampling, seed: int, shard: int,
                     advance: Advance | None = None) -> RolloutBatch:
        """One rollout shard's record: a response to every prompt. ``keys`` are the
        (prompt, sample) indices of the responses, ``shard`` the shard's index."""

    def update_weights(self, model, peft=None) -> float | None:
        """Sample from ``model``'s weights from now on (the student just trained; ``peft``:
        the peft model around it when it is a LoRA student); the seconds it took to copy
        them, or None when nothing had to be copied."""

    def close(self) -> None:
        """Free what the sampler holds beyond the model (an engine, its processes)."""


def make_sampler(name: str, tok, sampling: Sampling, runtime: Runtime,
                 procs: Processes = Processes(), model=None, lora_rank: int = 0) -> Sampler:
    """The sampler ``sampling.backend`` names, for model ``name`` (or its loaded ``model``:
    the hf sampler uses it as it is, the vllm engine loads ``name`` itself, with LoRA
    adapters up to ``lora_rank`` enabled when the student will be a LoRA one)."""
    if sampling.backend == "vllm":
        from tipcli.engines.vllm_engine import VLLMSampler

        return VLLMSampler(name, tok, runtime, procs, gpu_memory=sampling.vllm_gpu_memory,
                           lora_rank=lora_rank)
    from tipcli.engines.hf import HFSampler

    if model is None:
        device = procs.device_for(runtime.device)
        model = loading.load_model(name, device, resolve_dtype(runtime.dtype, device),
                           runtime.trust_remote_code)
    return HFSampler(model, tok)
