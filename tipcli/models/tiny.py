"""Tiny random models with a character-level tokenizer, built offline in a second.

They drive the built-in demo and the test suite: nothing is downloaded. A model's
output layer can be padded past the tokenizer's vocabulary, as real checkpoints are.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from tipcli.models.loading import quiet_transformers

CHARS = string.ascii_letters + string.digits + string.punctuation + " \n"
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'][0] | upper }}: {{ m['content'] }}\n"
                 "{% endfor %}{% if add_generation_prompt %}A: {% endif %}")


def build_tokenizer(chars: str = CHARS, size: int = 0):
    """A character-level fast tokenizer with <pad>, <s>, </s>, <unk> and a chat template;
    ``size`` > its characters adds filler tokens ``<tN>`` (never produced by encoding) up
    to that many entries, for a vocabulary as large as a real model's."""
    base = SPECIALS + sorted(set(chars))
    vocab = {tok: i for i, tok in enumerate(base + [f"<t{i}>" for i in range(size - len(base))])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_bpe_tokenizer(corpus: list[str], size: int = 320):
    """A byte-level BPE tokenizer (GPT-2 style: any text round-trips) trained on ``corpus``
    up to ``size`` entries, with the same specials and chat template as
    ``build_tokenizer``: another tokenizer for the same texts."""
    from tokenizers import trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=size, special_tokens=SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(tokenizer, hidden: int = 32, layers: int = 2, heads: int = 4,
                vocab_pad: int = 0, seed: int = 0, context: int = 2048,
                head_scale: float = 8.0, tied: bool = False):
    """A random Llama-architecture causal LM; ``vocab_pad`` extra (unused) output rows,
    ``context`` positions, the LM head's initial weights times ``head_scale``, the head
    ``tied`` to the input embeddings or not."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer) + vocab_pad, hidden_size=hidden,
                         intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=context, tie_word_embeddings=tied,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    model = LlamaForCausalLM(config)
    # Random init gives near-uniform logits; a wider spread (the default) makes the tiny
    # test pair disagree in interesting ways (peaked and flat positions).
    if head_scale != 1.0:
        with torch.no_grad():
            model.lm_head.weight.mul_(head_scale)
    return model.eval()


def save_pair(out: str | Path, seed: int = 0, vocab_pad: int = 13) -> tuple[Path, Path]:
    """Write a tiny student and a (wider, deeper) tiny teacher under ``out``."""
    quiet_transformers()
    out = Path(out)
    tok = build_tokenizer()
    paths = []
    for name, kw in (("student", dict(hidden=32, layers=2, seed=seed)),
                     ("teacher", dict(hidden=48, layers=3, seed=seed + 1))):
        d = out / name
        if not (d / "config.json").is_file():
            build_model(tok, vocab_pad=vocab_pad, **kw).save_pretrained(d)
            tok.save_pretrained(d)
        paths.append(d)
    return paths[0], paths[1]
