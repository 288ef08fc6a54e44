"""Model inputs from stored sequences, and the transformer body without the LM head.

Sequences are right-padded prompt + response. The hidden state at position j predicts
token j + 1, so response token i of a sequence with prompt length L is predicted by the
hidden state at L + i - 1. Shape letters: B batch, T tokens, H hidden, P positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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
    return hidden[batch.rows_P.to(device), batch.cols_P.to(device)]
