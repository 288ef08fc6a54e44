"""Loading students and teachers: hub ids, local directories and ``.gguf`` files.

Device and dtype are chosen automatically (CUDA when present, else CPU; bf16 on GPU,
fp32 on CPU) and can be overridden. Tokenizers are loaded and compared before any
model, so a vocabulary mismatch stops the run before the heavy work.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging as pylogging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging

from tipcli.configs import DTYPES, parse_max_memory
from tipcli.errors import TipError, first_line
from tipcli.models import adapters
from tipcli.store.files import atomic_dir, write_json_atomic


def quiet_transformers() -> None:
    """Silence transformers' own progress bars (tip draws its own on stderr) and
    accelerate's notice that an offloaded model has weights on the meta device."""
    pylogging.getLogger("accelerate.big_modeling").setLevel(pylogging.ERROR)
    logging.disable_progress_bar()
    logging.set_verbosity_error()


def resolve_device(device: str | None) -> str:
    """The device to run on: ``auto`` is CUDA when present, else the CPU; an accelerator
    asked for by name must be present (and its index in range)."""
    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    kind, _, index = device.partition(":")
    if kind == "cpu":
        return device
    names = {"cuda": "CUDA", "mps": "MPS", "xpu": "XPU", "npu": "NPU"}
    count = _device_count(kind)
    if count == 0:
        raise TipError(f"--device {device} asked for, but no {names.get(kind, kind)} device is "
                       "available here; use --device cpu (or auto)")
    if index and int(index) >= count:
        raise TipError(f"--device {device} asked for, but this machine has {count} "
                       f"{names.get(kind, kind)} device(s), numbered from 0")
    return device


def _device_count(kind: str) -> int:
    """How many devices of ``kind`` torch can use here (0 for a kind it does not know)."""
    if kind == "mps":
        return int(torch.backends.mps.is_available())
    module = getattr(torch, kind, None)  # torch.cuda, torch.xpu; torch.npu needs torch_npu
    try:
        return int(module.device_count()) if module and module.is_available() else 0
    except (AttributeError, RuntimeError):
        return 0


def resolve_dtype(dtype: str | None, device: str):
    if dtype in (None, "", "auto"):
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if dtype not in DTYPES:
        raise TipError(f"unknown dtype '{dtype}'; use one of {', '.join(DTYPES)}")
    return getattr(torch, dtype)


@dataclass(frozen=True)
class ModelSpec:
    """Where a model comes from: ``path`` for transformers, plus an optional gguf file."""

    name: str
    path: str
    gguf_file: str | None = None

    @classmethod
    def parse(cls, name: str) -> ModelSpec:
        p = Path(name)
        if name.endswith(".gguf"):
            if not p.is_file():
                raise TipError(f"model file {name} does not exist")
            return cls(name, str(p.parent), p.name)
        if p.exists() and not p.is_dir():
            raise TipError(f"model {name} is a file but not a .gguf file; give a model "
                           "directory, a .gguf file or a hub id")
        if p.is_dir() and not (p / "config.json").is_file() and \
                not (p / adapters.CONFIG).is_file():
            raise TipError(f"model directory {name} has no config.json; give a directory "
                           "written by save_pretrained (or a peft LoRA adapter's), a .gguf "
                           "file or a hub id")
        if not p.exists() and not HUB_ID.fullmatch(name):
            raise TipError(f"model path {name} does not exist (and is not a hub id like "
                           "org/name); check the path")
        if not p.exists() and (Path(name.split("/")[0]).is_dir()):
            raise TipError(f"model path {name} does not exist: {name.split('/')[0]}/ is a local "
                           "folder, so this is no hub id; check the path")
        return cls(name, name)


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def cache_dir() -> Path:
    return Path(os.environ.get("TIP_CACHE", Path.home() / ".cache" / "tip"))


def _gguf_cache_path(spec: ModelSpec) -> Path:
    f = Path(spec.path) / spec.gguf_file
    st = f.stat()
    key = hashlib.sha256(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir() / "gguf" / f"{f.stem}-{key}"


HUB_TIMEOUT = 5.0  # seconds the hub has to answer before a hub id is looked up in the cache only


def hub_problem() -> str | None:
    """Why the hub cannot be reached, or None (it answers, or HF_HUB_OFFLINE is set): one
    request with a short timeout, where huggingface_hub would retry each file 5 times
    (about a minute without a network) before it tried its cache."""
    from huggingface_hub import constants

    return None if constants.HF_HUB_OFFLINE else _hub_problem(constants.ENDPOINT)


@functools.lru_cache(maxsize=8)
def _hub_problem(endpoint: str) -> str | None:
    from huggingface_hub.utils import get_session

    try:
        get_session().head(endpoint, timeout=HUB_TIMEOUT)
    except Exception as exc:  # httpx's many errors: no route, no name, a timeout, a proxy
        return f"{endpoint} cannot be reached ({first_line(exc)})"
    return None


def _hub_options(spec: ModelSpec) -> dict[str, Any]:
    """``local_files_only`` for a hub id while the hub cannot be reached (its cached copy,
    if any, still loads)."""
    if Path(spec.path).exists() or hub_problem() is None:
        return {}
    return {"local_files_only": True}


def _load_error(kind: str, spec: ModelSpec, exc: Exception) -> TipError:
    if Path(spec.path).exists():
        return TipError(f"could not load {kind} '{spec.name}': {first_line(exc)}")
    offline = hub_problem()
    if offline:
        return TipError(f"could not load {kind} '{spec.name}': no local directory of that "
                        f"name, the hub {offline}, and no copy is in the cache; check the "
                        "path, or the network (and HTTPS_PROXY)")
    return TipError(f"could not load {kind} '{spec.name}': no local directory of that name, "
                    f"and the hub: {first_line(exc)}")


def load_tokenizer(name: str, trust_remote_code: bool = False):
    """The tokenizer of a model (a converted gguf's cached copy when there is one; for a
    LoRA adapter directory without one, its base's)."""
    quiet_transformers()
    base = adapters.adapter_base(name)
    if base is not None and not (Path(name) / "tokenizer_config.json").is_file():
        name = base
    spec = ModelSpec.parse(name)
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code, **_hub_options(spec)}
    path = spec.path
    if spec.gguf_file:
        cached = _gguf_cache_path(spec)
        if (cached / "tokenizer_config.json").is_file():
            path = str(cached)
        else:
            kwargs["gguf_file"] = spec.gguf_file
    try:
        tok = AutoTokenizer.from_pretrained(path, **kwargs)
    except Exception as exc:  # transformers raises many kinds for a bad model
        raise _load_error("tokenizer", spec, exc) from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(name: str, device: str = "cpu", dtype=None, trust_remote_code: bool = False,
               device_map: str = "", max_memory: str = ""):
    """A causal LM in eval mode on ``device``, or spread by accelerate's big-model loading
    over the devices (then the CPU, then disk) with ``device_map``. GGUF files are
    converted once and cached."""
    quiet_transformers()
    base = adapters.adapter_base(name)
    if base is not None:  # a LoRA adapter directory: its base, the adapter merged in
        return adapters.merged(load_adapter(name, base, device, dtype, trust_remote_code))
    spec = ModelSpec.parse(name)
    path, kwargs = spec.path, {"trust_remote_code": trust_remote_code, **_hub_options(spec)}
    if spec.gguf_file:
        path = str(_convert_gguf(spec))
    config = _without_gguf_quantization(path, trust_remote_code)
    if config is not None:
        kwargs["config"] = config
    if device_map:
        offload = cache_dir() / "offload" / model_fingerprint(path)[:16]
        kwargs.update(device_map=device_map, offload_folder=str(offload),
                      max_memory=check_max_memory(max_memory) if max_memory else None)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    except Exception as exc:
        raise _load_error("model", spec, exc) from None
    if not device_map:
        model.to(device)
    model.eval()
    return model


def load_adapter(name: str, base: str, device: str = "cpu", dtype=None,
                 trust_remote_code: bool = False, trainable: bool = False):
    """The LoRA adapter directory ``name`` on its base model ``base``: a peft model."""
    try:
        model = load_model(base, device, dtype, trust_remote_code)
    except TipError as exc:
        raise adapters.base_missing(name, base, exc) from None
    return adapters.put_on(model, name, base, trainable)


def load_config(name: str, trust_remote_code: bool = False):
    """A model's transformers config, without its weights (a .gguf file converted first;
    a LoRA adapter directory's base's)."""
    quiet_transformers()
    name = adapters.adapter_base(name) or name
    spec = ModelSpec.parse(name)
    path = str(_convert_gguf(spec)) if spec.gguf_file else spec.path
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code,
                                          **_hub_options(spec))
    except Exception as exc:
        raise _load_error("model config", spec, exc) from None


def check_max_memory(text: str) -> dict[int | str, str]:
    """``--max-memory`` as accelerate takes it, each device it names present here."""
    limits = parse_max_memory(text)
    count = max(_device_count(k) for k in ("cuda", "xpu", "npu"))
    for key in limits:
        if key == "mps" and not _device_count("mps"):
            have = "no MPS device"
        elif isinstance(key, int) and key >= count:
            have = f"{count} accelerator(s), numbered from 0" if count else "no accelerator"
        else:
            continue
        raise TipError(f"--max-memory {text} names device {key}, but this machine has "
                       f"{have}; name only devices it has (cpu=... works everywhere), or drop "
                       "--max-memory")
    return limits


def empty_model(name: str, trust_remote_code: bool = False):
    """The model ``name`` names with its parameters on the meta device (no memory, no
    values; its buffers real), and the safetensors file of every tensor of its checkpoint
    (name -> path): for loading only the rows a process needs (FSDP2). None where the
    checkpoint has no safetensors (then the whole model is loaded as usual)."""
    from accelerate import init_empty_weights

    quiet_transformers()
    if adapters.adapter_base(name) is not None:  # a LoRA adapter: loaded on its base
        return None, None
    spec = ModelSpec.parse(name)
    path = Path(_convert_gguf(spec) if spec.gguf_file else spec.path)
    if not path.is_dir():
        try:
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors"],
                                          **_hub_options(spec)))
        except Exception as exc:  # the hub's many errors, as loading reports them
            raise _load_error("model", spec, exc) from None
    files = safetensors_files(path)
    if files is None:
        return None, None
    config = _without_gguf_quantization(str(path), trust_remote_code) or \
        AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32,
                                                 trust_remote_code=trust_remote_code)
    model.tie_weights()  # as from_pretrained does (an output head tied to the embeddings)
    return model, files


def safetensors_files(path: Path) -> dict[str, str] | None:
    """Tensor name -> the safetensors file holding it, for a model directory (one file, or
    several with an index); None when it has none."""
    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {k: str(path / f) for k, f in weight_map.items()}
    single = path / "model.safetensors"
    if not single.is_file():
        return None
    with safe_open(str(single), "pt") as f:
        return dict.fromkeys(f.keys(), str(single))


def input_device(model) -> torch.device:
    """Where a model's inputs go: its first device (accelerate's hooks move them on)."""
    dmap = getattr(model, "hf_device_map", None)
    if dmap:
        first = next(iter(dmap.values()))
        if isinstance(first, int):
            return torch.device(f"cuda:{first}")
        return torch.device("cpu" if first == "disk" else first)
    return next(model.parameters()).device


def _without_gguf_quantization(path: str, trust_remote_code: bool):
    """The config of a model directory whose ``config.json`` keeps a gguf
    ``quantization_config`` (some GGUF conversions save one), without it: the weights in
    the directory are already dequantised, and transformers would refuse to save a model
    it believes quantised. None for every other model."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return None
    try:
        quant = json.loads(cfg.read_text()).get("quantization_config")
    except (ValueError, AttributeError):
        return None
    if not (isinstance(quant, dict) and quant.get("quant_method") == "gguf"):
        return None
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    del config.quantization_config
    return config


def _convert_gguf(spec: ModelSpec) -> Path:
    """Dequantise a .gguf file into a plain safetensors checkpoint, once.

    A model loaded with ``gguf_file=`` refuses ``save_pretrained``; rebuilding it from its
    config and loading the (already dequantised) weights gives a normal model.
    """
    out = _gguf_cache_path(spec)
    if (out / "config.json").is_file():
        _drop_quantization_config(out / "config.json")  # entries cached by older versions
        return out
    try:
        loaded = AutoModelForCausalLM.from_pretrained(spec.path, gguf_file=spec.gguf_file)
        tok = AutoTokenizer.from_pretrained(spec.path, gguf_file=spec.gguf_file)
    except ImportError as exc:
        raise TipError(f"loading {spec.name} needs the gguf package: pip install 'tipcli[gguf]' "
                       f"({first_line(exc)})") from None
    except Exception as exc:
        raise _load_error("model", spec, exc) from None
    model = AutoModelForCausalLM.from_config(loaded.config)
    model.load_state_dict(loaded.state_dict())
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        _drop_quantization_config(tmp / "config.json")
    return out


def _drop_quantization_config(path: Path) -> None:
    """Remove the gguf ``quantization_config`` a conversion's config.json keeps: its weights
    are dequantised, and other loaders (vLLM) refuse a gguf-quantised config."""
    config = json.loads(path.read_text())
    if isinstance(config.get("quantization_config"), dict):
        del config["quantization_config"]
        write_json_atomic(path, config)


def model_ref(name: str, model=None) -> dict[str, Any]:
    """Provenance of a model for manifests: the id as given, its revision if known, and a
    fingerprint of its files (a model replaced at the same path gets another one)."""
    revision = getattr(getattr(model, "config", None), "_commit_hash", None) if model else None
    return {"id": name, "revision": revision, "fingerprint": model_fingerprint(name, revision)}


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


def model_fingerprint(name: str, revision: str | None = None) -> str:
    """sha256 of what identifies a model's content without reading its weights: the config
    and, for each weight file, its name, size and modification time (a hub id: the id and
    revision)."""
    p = Path(name)
    h = hashlib.sha256()
    if p.is_file():
        files = [p]
    elif p.is_dir():
        cfg = p / "config.json"
        h.update(cfg.read_bytes() if cfg.is_file() else b"")
        files = sorted(f for f in p.iterdir() if f.suffix in WEIGHT_SUFFIXES and f.is_file())
    else:
        h.update(f"hub:{name}@{revision}".encode())
        files = []
    for f in files:
        st = f.stat()
        h.update(f"{f.name}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()


def context_length(model) -> int | None:
    """The longest sequence ``model`` takes (anything with a ``config``): its config's
    ``max_position_embeddings``; None where it has none."""
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


def real_vocab_size(tokenizer) -> int:
    """Rows of the vocabulary the tokenizer can emit; logit columns beyond are padding."""
    return len(tokenizer)


def tokenizer_info(tokenizer) -> dict[str, Any]:
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    special = {k: getattr(tokenizer, k, None) for k in ("bos_token", "eos_token", "pad_token")}
    blob = json.dumps({"vocab": vocab, "special": special}, ensure_ascii=False).encode()
    return {"fingerprint": hashlib.sha256(blob).hexdigest(), "vocab_size": len(tokenizer)}


def check_tokenizer_matches(tok, manifest: dict[str, Any], model: str, path) -> None:
    """Stop when ``tok`` is not the tokenizer that wrote the stage directory ``path``."""
    if tokenizer_info(tok)["fingerprint"] != manifest["tokenizer"]["fingerprint"]:
        raise TipError(f"student {model} tokenizer differs from the one that wrote {path}; "
                       "pass that directory's student with --student")


def check_same_vocab(student_tok, teacher_tok, student: str = "student",
                     teacher: str = "teacher") -> None:
    """Stop with the first differing token when two tokenizers map tokens to ids differently."""
    s = {i: t for t, i in student_tok.get_vocab().items()}
    t = {i: tok for tok, i in teacher_tok.get_vocab().items()}
    for i in range(max(len(s), len(t), max(s, default=-1) + 1, max(t, default=-1) + 1)):
        if s.get(i) != t.get(i):
            raise TipError(f"student {student} and teacher {teacher} tokenizers differ at id {i}: "
                           f"{s.get(i)!r} vs {t.get(i)!r}; this needs the same vocabulary "
                           "(tip score and tip distill align other tokenizers: "
                           "--cross-tokenizer auto)")


def model_vocab_size(model) -> int:
    return model.get_output_embeddings().weight.shape[0]


def check_model_fits_vocab(model, tokenizer, name: str) -> None:
    if model_vocab_size(model) < real_vocab_size(tokenizer):
        raise TipError(f"model {name} has {model_vocab_size(model)} output rows but its tokenizer "
                       f"has {real_vocab_size(tokenizer)} tokens")
