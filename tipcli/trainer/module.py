"""The student as one module whose forward returns the loss on the kept positions only.

The transformer body runs on whole sequences (kept tokens attend to every earlier token);
the hidden states at kept positions are gathered and the LM head and loss applied a chunk
at a time, each chunk's logits rebuilt in backward (``tipcli.ops.losses.chunked_token_loss``),
so memory grows with the chunk size, never with kept tokens x vocabulary. One module call
does all of it, so DDP and FSDP2 (``tipcli.dist.fsdp`` shards its student) see the whole
computation.

Shape letters: B sequences, T tokens, K kept positions, H hidden.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from tipcli.ops.forward import body_hidden, head_logits
from tipcli.ops.losses import chunked_token_loss


class DistillModule(torch.nn.Module):
    """``student`` plus the loss settings; ``forward`` returns (sum of the kept tokens'
    losses, the detached per-token losses)."""

    def __init__(self, student, loss: str, vocab: int, temperature: float, chunk_size: int):
        super().__init__()
        self.student = student
        self.loss, self.vocab, self.temperature, self.chunk_size = \
            loss, vocab, temperature, chunk_size

    def forward(self, input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor,
                rows_K: torch.Tensor, cols_K: torch.Tensor, targets: dict[str, torch.Tensor],
                t_hidden_KH: torch.Tensor | None = None, t_head: Callable | None = None):
        hidden_BTH = body_hidden(self.student, input_ids_BT, attention_mask_BT)
        head = head_logits(self.student, self.vocab, self.temperature)
        if rows_K.numel() == 0:  # no kept token: keep every parameter in the graph
            return head(hidden_BTH[:, :1]).sum() * 0.0, hidden_BTH.new_zeros(0)
        loss_K = chunked_token_loss(self.loss, hidden_BTH[rows_K, cols_K], head, targets,
                                    self.chunk_size, t_hidden_KH, t_head)
        return loss_K.sum(), loss_K.detach()


def distill_module(student, loss: str, vocab: int, temperature: float,
                   chunk_size: int) -> DistillModule:
    return DistillModule(student, loss, vocab, temperature, chunk_size)
