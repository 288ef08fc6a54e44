"""A causal LM whose every output is set by construction, for tests that need a model that
"knows" given answers on any CPU (a tiny model trained to memorise them does so on one
CPU and not on the next: float rounding differs).

    model = scripted_model(tok, {prompt_ids: response_ids, ...})

Given a prompt it was scripted with, it emits the scripted response, then EOS; after
anything else it emits EOS at once. The logit of the token it means is 10, every other
logit 0, so greedy decoding picks it and sampling at temperature 1 almost always does.
It runs through transformers' ``generate`` like any model (no KV cache: each step sees
the whole sequence).
"""

from __future__ import annotations

import torch
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

SCRIPTED_LOGIT = 10.0


class ScriptedConfig(PretrainedConfig):
    model_type = "tip-scripted"

    def __init__(self, vocab_size: int = 8, max_position_embeddings: int = 256, **kwargs):
        self.vocab_size = vocab_size
        self.max_position_embeddings = max_position_embeddings
        self.num_hidden_layers = 1  # generate sets up a KV cache (left unused) by this
        super().__init__(**kwargs)


class ScriptedLM(PreTrainedModel, GenerationMixin):
    config_class = ScriptedConfig

    def __init__(self, config: ScriptedConfig, script: dict[tuple[int, ...], int] | None = None):
        super().__init__(config)
        self.embed = torch.nn.Embedding(config.vocab_size, 1)
        self.head = torch.nn.Linear(1, config.vocab_size, bias=False)
        self.script = dict(script or {})

    def get_input_embeddings(self):
        return self.embed

    def get_output_embeddings(self):
        return self.head

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def forward(self, input_ids, attention_mask=None, **kwargs):
        B, T = input_ids.shape
        logits = torch.zeros(B, T, self.config.vocab_size)
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        for b in range(B):
            row = input_ids[b][mask[b].bool()].tolist()
            for t in range(len(row)):  # left padding: row position t is column T - len + t
                nxt = self.script.get(tuple(row[:t + 1]), self.config.eos_token_id)
                logits[b, T - len(row) + t, nxt] = SCRIPTED_LOGIT
        return CausalLMOutputWithPast(logits=logits.to(self.head.weight.device))


def scripted_model(tok, answers: dict[tuple[int, ...], list[int]]) -> ScriptedLM:
    """A model that answers each prompt (token ids) of ``answers`` with its response ids."""
    script = {}
    for prompt, response in answers.items():
        seq = [*prompt, *response, tok.eos_token_id]
        for t in range(len(prompt) - 1, len(seq) - 1):
            script[tuple(seq[:t + 1])] = seq[t + 1]
    config = ScriptedConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    return ScriptedLM(config, script).eval()
