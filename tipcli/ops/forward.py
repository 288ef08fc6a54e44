"""Model inputs from stored sequences; the transformer body and the LM head, apart.

Sequences are right-padded prompt + response. The hidden state at position j predicts
token j + 1, so response token i of a sequence with prompt length L is predicted by the
hidden state at L + i - 1. Every stage runs the body once and applies the head to the
positions it needs, a chunk at a time (``head_logits``), so no (B x T x V) logits tensor
is ever built. Shape letters: B batch, T tokens, H hidden, P positions, V vocabulary.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.distributed.fsdp import FSDPModule


@dataclass
class Batch:
    input_ids_BT: torch.Tensor
    attention_mask_BT: torch.Tensor
    rows_P: torch.Tensor        # batch row of each response token
    cols_P: torch.Tensor        # position of the hidden state that predicts it
    tokens_P: torch.Tensor      # the response token ids, flat in sequence order
    lengths: list[int]          # response length of each sequence


def collate(seqs: list[dict[str, torch.Tensor]], pad_id: int) -> Batch:
    """Right-pad prompt + response of each sequence; index every response token."""
    full = [torch.cat([s["prompt_ids"].long(), s["response_ids"].long()]) for s in seqs]
    width = max(int(f.numel()) for f in full)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    rows, cols, lengths = [], [], []
    for b, (s, f) in enumerate(zip(seqs, full)):
        ids[b, :f.numel()] = f
        mask[b, :f.numel()] = 1
        lp, lr = int(s["prompt_ids"].numel()), int(s["response_ids"].numel())
        rows.append(torch.full((lr,), b, dtype=torch.long))
        cols.append(torch.arange(lp - 1, lp + lr - 1, dtype=torch.long))
        lengths.append(lr)
    tokens = torch.cat([s["response_ids"].long() for s in seqs])
    return Batch(ids, mask, torch.cat(rows), torch.cat(cols), tokens, lengths)


def body_hidden(model, input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor,
                **kwargs) -> torch.Tensor:
    """Final hidden states [B, T, H] of the transformer body (final norm included),
    without the LM head: a full (B x T x V) logits tensor is never built."""
    body = model.get_decoder()
    out = body(input_ids=input_ids_BT, attention_mask=attention_mask_BT, use_cache=False,
               **kwargs)
    return out.last_hidden_state


def response_hidden(model, batch: Batch, device) -> torch.Tensor:
    """Hidden states [P, H] at the positions that predict each response token."""
    hidden = body_hidden(model, batch.input_ids_BT.to(device), batch.attention_mask_BT.to(device))
    return hidden[batch.rows_P.to(hidden.device), batch.cols_P.to(hidden.device)]


def wide(x: torch.Tensor) -> torch.Tensor:
    """float32 for half-precision tensors; float32 and float64 stay as they are."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _no_autocast(device_type: str):
    """Autocast off for one operation, where it may be on (the CPU and accelerators)."""
    if device_type in ("cpu", "cuda", "xpu", "mps"):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def head_logits(model, vocab_size: int, temperature: float = 1.0) -> Callable:
    """hidden [*, H] -> float32 (float64) logits [*, V] for ``model``: its LM head restricted to the
    real vocabulary (padded rows are cut from the weight, so neither the logits nor, in
    training, their gradient ever has the padded columns), the final-logit soft-capping
    or scale of architectures that have one, divided by ``temperature``.

    Whatever the model's dtype, a chunk's logits are computed in float32: the hidden
    states and the head's weight rows are upcast for the product (and autocast is off for
    it). In bf16 a logit near 16-32 would otherwise be rounded to steps of 0.125 nats,
    and so would every statistic and loss built on it. Out of training, a head stored in
    a narrower dtype is upcast once for all the chunks the returned function is called on
    (again only if the weight changes in place); a head sharded with FSDP2, whose whole
    weight exists only while it is gathered, is upcast per chunk."""
    head = model.get_output_embeddings()
    cap = getattr(model.config, "final_logit_softcapping", None)
    scale = getattr(model.config, "logit_scale", None)
    # a head that accelerate offloads loads its weight in its own forward: call it whole
    linear = isinstance(head, torch.nn.Linear) and not hasattr(head, "_hf_hook")

    upcast: dict[str, tuple] = {}  # the float32 weight rows and bias, made once a call
    # a copy worth keeping: an upcast of a head no FSDP2 gather frees and refills
    keep = linear and head.weight.dtype != torch.float32 and \
        not isinstance(model, FSDPModule)

    def weights():
        if not keep or (head.weight.requires_grad and torch.is_grad_enabled()):
            # in training the upcast is part of the graph, made anew for each chunk
            return (wide(head.weight[:vocab_size]),
                    None if head.bias is None else wide(head.bias[:vocab_size]))
        key = (head.weight.data_ptr(), head.weight._version)
        if upcast.get("key") != key:
            upcast["key"] = key
            upcast["rows"] = (wide(head.weight[:vocab_size]),
                              None if head.bias is None else wide(head.bias[:vocab_size]))
        return upcast["rows"]

    def fn(hidden: torch.Tensor) -> torch.Tensor:
        if linear:
            weight, bias = weights()
            with _no_autocast(hidden.device.type):
                logits = F.linear(wide(hidden), weight, bias)
        else:
            logits = wide(head(hidden)[..., :vocab_size])
        if scale is not None:
            logits = logits * scale
        if cap:
            logits = torch.tanh(logits / cap) * cap
        if temperature == 1.0:
            return logits
        return logits / temperature if logits.requires_grad else logits.div_(temperature)

    return fn
