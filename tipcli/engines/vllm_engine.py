"""The ``vllm`` sampler (``--backend vllm``): continuous batching and paged attention.

    pip install 'tipcli[vllm]'          # on a CPU-only machine: see `make test-vllm`
    tip rollout --student S --prompts P -o runs/rollout --backend vllm

It writes the same shards as the ``hf`` sampler. What vLLM is asked for, and why:

- each response is its own request (n = 1) with its own seed, from (--seed, prompt,
  sample): vLLM draws a request's randomness from its own generator, so a response does
  not depend on the batch, the shard or the number of processes it was sampled in;
- ``logprobs_mode="processed_logprobs"``: the returned log-prob of each sampled token is
  then under the distribution it was drawn from (temperature, then top-k, then top-p),
  which is what ``rollout_logprob`` means (vLLM's default, raw log-probs, would be the
  untruncated temperature-1 distribution);
- ``generation_config="vllm"`` and explicit sampling parameters: nothing from a model's
  ``generation_config.json`` changes the sampling; logit columns past the tokenizer's
  vocabulary are never sampled (``allowed_token_ids``);
- on the CPU only, ``enforce_eager=True`` and ``enable_chunked_prefill=False`` (seeded
  requests with chunked prefill stop vLLM's CPU engine); a GPU keeps vLLM's defaults
  (CUDA graphs, chunked prefill);
- under a launcher, each process's engine sees one GPU: the ``LOCAL_RANK``-th entry of
  the job's ``CUDA_VISIBLE_DEVICES`` (``tipcli.dist.processes.visible_device``).

In `tip distill` the engine stays up for the whole run: after each iteration's training
the new weights are written to a temporary safetensors file (with ``lm_head.weight`` even
when it is tied to the embeddings: vLLM's CPU backend keeps its own copy) and loaded into
the running engine (``reload_weights``), and its prefix cache is reset.

A LoRA student (``--lora-r``, or a peft adapter directory as the model) is served by
vLLM's LoRA support: the engine loads the base once with LoRA enabled (``max_lora_rank``
the adapter's rank, rounded up to a rank vLLM supports), and every response is requested
with the current adapter (a ``LoRARequest``). After each iteration's training only the
adapter moves: it is written as a peft directory and loaded into the engine as a new LoRA
request; the base's weights stay as they are.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from tipcli.configs import Runtime, Sampling
from tipcli.dist.processes import Processes, visible_device
from tipcli.engines.common import Advance, flat_shard, item_seed
from tipcli.errors import TipError, first_line
from tipcli.models import adapters
from tipcli.models.adapters import adapter_base
from tipcli.models.loading import ModelSpec, _convert_gguf, real_vocab_size, resolve_device
from tipcli.records import RolloutBatch

CPU_KV_CACHE_GIB = 2  # on CPU, unless VLLM_CPU_KVCACHE_SPACE says otherwise


class VLLMSampler:
    """A vLLM engine for one model (a ``Sampler``); ``sample_shard`` as the hf sampler's."""

    name = "vllm"
    model = None  # the engine holds its own copy of the weights

    def __init__(self, name: str, tok, runtime: Runtime, procs: Processes = Processes(),
                 gpu_memory: float = 0.85, lora_rank: int = 0):
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # before vllm is imported
        try:
            from vllm import LLM
        except ImportError as exc:
            raise TipError(f"--backend vllm needs vLLM: pip install 'tipcli[vllm]' (on a "
                           f"CPU-only machine see `make test-vllm`) ({first_line(exc)})") from None
        base = adapter_base(name)  # an adapter directory: its base, with the adapter on it
        spec = ModelSpec.parse(base or name)
        path = str(_convert_gguf(spec)) if spec.gguf_file else spec.path
        if base is not None:
            lora_rank = max(lora_rank, _adapter_rank(name))
        self.lora_rank = _served_rank(lora_rank) if lora_rank else 0
        lora = {"enable_lora": True, "max_lora_rank": self.lora_rank, "max_loras": 1} \
            if self.lora_rank else {}
        device = resolve_device(runtime.device)
        on_gpu = device.startswith("cuda")
        if procs.world > 1 and on_gpu:  # one GPU per launched process, of the job's own
            os.environ["CUDA_VISIBLE_DEVICES"] = visible_device(procs.local_rank)
        dtype = runtime.dtype if runtime.dtype != "auto" else ("bfloat16" if on_gpu else
                                                               "float32")
        try:
            self.llm = LLM(model=path, tokenizer=path, dtype=dtype, seed=0,
                           logprobs_mode="processed_logprobs", generation_config="vllm",
                           trust_remote_code=runtime.trust_remote_code,
                           **engine_settings(on_gpu, gpu_memory), **lora)
        except Exception as exc:  # vLLM raises many kinds for a model it cannot serve
            raise TipError(f"vLLM could not load {name}: {first_line(exc)}") from None
        self.tok = tok
        self.vocab = real_vocab_size(tok)
        model_config = self.llm.llm_engine.model_config
        self.padded = model_config.get_vocab_size() > self.vocab
        self.context = model_config.max_model_len
        eos = {tok.eos_token_id} | set(_as_list(getattr(model_config.hf_config, "eos_token_id",
                                                        None)))
        self.eos = sorted(int(e) for e in eos if e is not None)
        self.reload_seconds: list[float] = []
        self.lora = None  # the LoRARequest every response is sampled with (None: the base)
        self._adapter_dir: Path | None = None  # where the engine's current adapter was written
        self._adapters = 0
        if base is not None:
            self._request(str(name))

    def _params(self, cfg: Sampling, seed: int):
        from vllm import SamplingParams

        return SamplingParams(
            n=1, temperature=cfg.temperature, top_p=cfg.top_p if cfg.temperature > 0 else 1.0,
            top_k=cfg.sample_top_k if cfg.temperature > 0 else 0, max_tokens=cfg.max_new_tokens,
            seed=seed, logprobs=0, stop_token_ids=self.eos, repetition_penalty=1.0,
            presence_penalty=0.0, frequency_penalty=0.0, min_p=0.0, detokenize=False,
            allowed_token_ids=list(range(self.vocab)) if self.padded else None)

    def sample_shard(self, prompts: list[list[int]], keys: list[tuple[int, int]],
                     cfg: Sampling, seed: int, shard: int,
                     advance: Advance | None = None
                     ) -> RolloutBatch:
        """All of a shard's responses in one call; each response seeded from (seed, prompt,
        sample), so ``shard`` does not matter."""
        from vllm.inputs import TokensPrompt

        params = [self._params(cfg, item_seed(seed, p, s)) for p, s in keys]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params,
                                 use_tqdm=False, lora_request=self.lora)
        rows, logprobs = [], []
        for out in outs:
            c = out.outputs[0]
            rows.append(list(c.token_ids))
            logprobs.append(torch.tensor([d[t].logprob for d, t in zip(c.logprobs, c.token_ids)],
                                         dtype=torch.float32))
        width = max((len(r) for r in rows), default=0)
        new_BS = torch.full((len(rows), width), -1, dtype=torch.long)
        logprob_BS = torch.zeros(len(rows), width)
        for b, (row, lp) in enumerate(zip(rows, logprobs)):
            new_BS[b, :len(row)] = torch.tensor(row, dtype=torch.long)
            logprob_BS[b, :lp.numel()] = lp
        out = flat_shard(prompts, new_BS, logprob_BS, self.eos, keys,
                         torch.tensor([len(r) for r in rows]))
        if advance:
            advance(out.num_sequences, out.num_tokens)
        return out

    def update_weights(self, model, peft=None) -> float:
        """Load ``model``'s weights into the running engine, or with ``peft`` (the peft
        model of a LoRA student) its adapter alone as a new LoRA request; the seconds it
        took."""
        t0 = time.perf_counter()
        if peft is not None:
            self._update_adapter(peft)
            self.reload_seconds.append(time.perf_counter() - t0)
            return self.reload_seconds[-1]
        if self.lora_rank:
            raise TipError("this vLLM engine serves LoRA adapters on a fixed base; a student "
                           "with every weight trained cannot be loaded into it")
        shm = Path("/dev/shm")
        folder = Path(tempfile.mkdtemp(prefix="tip-vllm-", dir=shm if shm.is_dir() else None))
        try:
            state = {k: v.detach().to("cpu", torch.float32).clone().contiguous()
                     for k, v in model.state_dict().items()}  # tied lm_head.weight included
            save_file(state, str(folder / "model.safetensors"))
            self.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(folder)})
            self.llm.reset_prefix_cache()  # cached prompt blocks hold the old weights' keys
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        self.reload_seconds.append(time.perf_counter() - t0)
        return self.reload_seconds[-1]

    def _update_adapter(self, peft) -> None:
        """Write ``peft``'s adapter as a peft directory and load it into the engine as the
        LoRA request of every later response; the one before is dropped."""
        if not self.lora_rank:
            raise TipError("this vLLM engine was started without LoRA: start the run with "
                           "--lora-r to sample a LoRA student with --backend vllm")
        if adapters.rank(peft) > self.lora_rank:
            raise TipError(f"the adapter's rank {adapters.rank(peft)} is above the engine's "
                           f"max_lora_rank {self.lora_rank}")
        shm = Path("/dev/shm")
        folder = Path(tempfile.mkdtemp(prefix="tip-vllm-lora-",
                                       dir=shm if shm.is_dir() else None))
        peft.save_pretrained(str(folder), safe_serialization=True)
        previous = self._adapter_dir
        self._request(str(folder))
        self._adapter_dir = folder
        if previous is not None:
            shutil.rmtree(previous, ignore_errors=True)

    def _request(self, path: str) -> None:
        """Load the adapter directory ``path`` into the engine now (not at its first
        response) as the request every response is sampled with."""
        from vllm.lora.request import LoRARequest

        old = self.lora
        self._adapters += 1
        self.lora = LoRARequest(f"tip-{self._adapters}", self._adapters, path)
        try:
            self.llm.llm_engine.add_lora(self.lora)
        except Exception as exc:  # vLLM raises many kinds for an adapter it cannot serve
            raise TipError(f"vLLM could not load the LoRA adapter {path}: "
                           f"{first_line(exc)}") from None
        if old is not None:
            self.llm.llm_engine.remove_lora(old.lora_int_id)

    def close(self) -> None:
        engine = getattr(self.llm.llm_engine, "engine_core", None)
        if engine is not None and hasattr(engine, "shutdown"):
            engine.shutdown()
        if self._adapter_dir is not None:
            shutil.rmtree(self._adapter_dir, ignore_errors=True)


def engine_settings(on_gpu: bool, gpu_memory: float) -> dict:
    """What the engine is started with beyond the model: on a GPU the share of its memory
    vLLM may take; on the CPU a KV cache size and the CPU workarounds (eager mode, no
    chunked prefill), which a GPU does not need."""
    if on_gpu:
        return {"gpu_memory_utilization": gpu_memory}
    return {"kv_cache_memory_bytes": int(os.environ.get("VLLM_CPU_KVCACHE_SPACE",
                                                        CPU_KV_CACHE_GIB)) << 30,
            "enforce_eager": True, "enable_chunked_prefill": False}


SERVED_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # what vLLM's max_lora_rank takes


def _served_rank(rank: int) -> int:
    """The smallest rank vLLM's engine takes that is at least ``rank``."""
    fits = [r for r in SERVED_RANKS if r >= rank]
    if not fits:
        raise TipError(f"vLLM serves LoRA adapters up to rank {SERVED_RANKS[-1]}, and this one "
                       f"has rank {rank}: lower --lora-r, or sample with --backend hf")
    return fits[0]


def _adapter_rank(name: str) -> int:
    import json

    return int(json.loads((Path(name) / adapters.CONFIG).read_text()).get("r", 8))


def _as_list(v) -> list:
    return v if isinstance(v, list) else [] if v is None else [v]
