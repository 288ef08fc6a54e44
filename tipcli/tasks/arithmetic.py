"""The embedded default task: multi-digit addition with a worked scratchpad.

    python -m tipcli.tasks.arithmetic build            # teacher + student, cached
    python -m tipcli.tasks.arithmetic prompts -n 200 -o arith.jsonl --seed 1
    tip eval --model ~/.cache/tip/arith/teacher --prompts arith.jsonl -o runs/eval

A prompt is ``"487+65="`` (operands of 2 or 3 digits); the response works through the
columns from the right, each as ``a+b+carry=column sum``, and ends with the result:

    7+5+0=12 8+6+1=15 4+0+1=5 so 552

so the last number of a response is its answer (the ``last-number`` verifier grades it).
Nothing is downloaded: the tokenizer is the character tokenizer of :mod:`tipcli.tiny`,
and the models are small Llama models trained here from scratch by supervised
next-token training on worked examples (loss on response tokens only):

- the teacher (hidden 128, 4 layers) trains until it solves >= 95% of a validation set;
- the student (hidden 64, 2 layers) trains only until it solves 30% of it (checked
  every 20 steps), so it is neither random nor good and distillation has room to help.

Both are written with ``save_pretrained`` and the same tokenizer (and chat template)
under ``tipcli.models.cache_dir() / "arith"``, so `tip rollout --student` and
`tip score --teacher` load them like any checkpoint. Validation and test prompts are
excluded from training; everything is seeded (two builds on one machine give identical
weight files).

Measured on a 2-core CPU (torch 2.13, fp32): the build takes about 2 minutes on an idle
machine (teacher 800 steps, 101 s; student 360 steps, 16 s) and 6-9 minutes when other
jobs share the cores. Greedy accuracy on ``held_out_prompts(100)`` (graded by `tip eval
--verifier last-number`): teacher 100/100, student 37/100.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tipcli.configs import Sampling
from tipcli.evaluate import generate_responses
from tipcli.files import atomic_dir, write_atomic
from tipcli.models import cache_dir, quiet_transformers
from tipcli.progress import progress
from tipcli.sampling import HFSampler
from tipcli.settings import setting, to_flat, validate
from tipcli.tiny import build_tokenizer
from tipcli.verify import last_number

PLACEHOLDER = "\x00"
VOCAB_PAD = 28  # output rows past the 100-token vocabulary (128 in all), as real checkpoints pad
TEST_SEED = 12345  # seed of the held-out test prompts (`held_out_prompts`)
VALID_SEED = 777  # seed of the validation prompts that decide when training stops
NUM_HELD_OUT = 1000  # test prompts excluded from training and validation
LOSS_EVERY = 10  # steps averaged into one logged training loss


def solve(a: int, b: int) -> str:
    """The worked response for ``a + b``: one ``x+y+carry=sum`` step per column, then
    ``so`` and the result."""
    da, db = str(a)[::-1], str(b)[::-1]
    steps, carry = [], 0
    for i in range(max(len(da), len(db))):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        s = x + y + carry
        steps.append(f"{x}+{y}+{carry}={s}")
        carry = s // 10
    return " ".join(steps) + f" so {a + b}"


def _operand(rng: random.Random) -> int:
    digits = rng.choice((2, 3))
    return rng.randrange(10 ** (digits - 1), 10 ** digits)


def make_problems(n: int, seed: int, exclude: set[tuple[int, int]] = frozenset()
                  ) -> list[tuple[int, int]]:
    """``n`` distinct operand pairs (2 or 3 digits each), none of them in ``exclude``."""
    rng, seen, out = random.Random(seed), set(exclude), []
    while len(out) < n:
        pair = (_operand(rng), _operand(rng))
        if pair not in seen:
            seen.add(pair)
            out.append(pair)
    return out


def record(a: int, b: int) -> dict[str, str]:
    """A prompt record: ``prompt``, ``answer`` (the sum) and the worked ``solution``."""
    return {"prompt": f"{a}+{b}=", "answer": str(a + b), "solution": solve(a, b)}


def make_prompts(n: int, seed: int = 0) -> list[dict[str, str]]:
    """``n`` distinct addition prompts, deterministic in ``seed``."""
    return [record(a, b) for a, b in make_problems(n, seed)]


def held_out_prompts(n: int = 100) -> list[dict[str, str]]:
    """The test prompts; `build_models` never trains on them."""
    return make_prompts(n, TEST_SEED)


def write_prompts(path: str | Path, n: int, seed: int = 0) -> Path:
    """Write ``make_prompts(n, seed)`` as JSONL (one record a line); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in make_prompts(n, seed)))
    return path


# ---------------------------------------------------------------- tokens and batches

class Encoder:
    """Fast ids for the character tokenizer: prompt through the chat template, plus the
    response and EOS. Equal to ``encode_prompt`` + ``tokenizer(response)``."""

    def __init__(self, tok):
        text = tok.apply_chat_template([{"role": "user", "content": PLACEHOLDER}],
                                       tokenize=False, add_generation_prompt=True)
        self.before, self.after = text.split(PLACEHOLDER)
        self.vocab = tok.get_vocab()
        self.eos, self.pad = tok.eos_token_id, tok.pad_token_id

    def ids(self, text: str) -> list[int]:
        return [self.vocab[c] for c in text]

    def prompt(self, prompt: str) -> list[int]:
        return self.ids(self.before + prompt + self.after)

    def example(self, rec: dict[str, str]) -> tuple[list[int], list[int]]:
        return self.prompt(rec["prompt"]), self.ids(rec["solution"]) + [self.eos]


def sft_batch(enc: Encoder, records: list[dict[str, str]]):
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 except on
    response tokens and EOS)."""
    pairs = [enc.example(r) for r in records]
    width = max(len(p) + len(r) for p, r in pairs)
    ids_BT = torch.full((len(pairs), width), enc.pad, dtype=torch.long)
    mask_BT = torch.zeros_like(ids_BT)
    labels_BT = torch.full_like(ids_BT, -100)
    for b, (p, r) in enumerate(pairs):
        n = len(p) + len(r)
        ids_BT[b, :n] = torch.tensor(p + r)
        mask_BT[b, :n] = 1
        labels_BT[b, len(p):n] = torch.tensor(r)
    return ids_BT, mask_BT, labels_BT


# ---------------------------------------------------------------- models and training

@dataclass(frozen=True)
class TrainSpec:
    """Size and schedule of one model trained from scratch on worked examples."""

    name: str = setting("teacher", "Directory name of the model.", required=True)
    hidden: int = setting(128, "Hidden size.", ge=1)
    layers: int = setting(4, "Transformer layers.", ge=1)
    heads: int = setting(4, "Attention heads.", ge=1)
    max_steps: int = setting(3000, "Most optimizer steps.", ge=1)
    batch_size: int = setting(64, "Worked examples per step.", ge=1)
    lr: float = setting(3e-3, "Peak AdamW learning rate (linear warmup, cosine decay).", gt=0)
    warmup: int = setting(100, "Warmup steps.", ge=0)
    eval_every: int = setting(100, "Steps between validation checks.", ge=1)
    target: float = setting(0.95, "Stop once greedy validation accuracy reaches this.", ge=0,
                            le=1)
    seed: int = setting(0, "Seed of the initial weights and the training examples.")

    def rules(self) -> list[str]:
        return ["--hidden must be a multiple of --heads"] if self.hidden % self.heads else []


TEACHER = TrainSpec("teacher", hidden=128, layers=4, heads=4, max_steps=3000, target=0.95,
                    seed=1)
STUDENT = TrainSpec("student", hidden=64, layers=2, heads=4, max_steps=1500, lr=2e-3,
                    eval_every=20, target=0.3, seed=2)


def new_model(tok, spec: TrainSpec):
    """A randomly initialised Llama sized by ``spec`` (vocab padded by ``VOCAB_PAD``)."""
    torch.manual_seed(spec.seed)
    config = LlamaConfig(vocab_size=len(tok) + VOCAB_PAD, hidden_size=spec.hidden,
                         intermediate_size=2 * spec.hidden, num_hidden_layers=spec.layers,
                         num_attention_heads=spec.heads, num_key_value_heads=spec.heads,
                         max_position_embeddings=256, tie_word_embeddings=False,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id)
    return LlamaForCausalLM(config)


def _lr_at(step: int, spec: TrainSpec) -> float:
    if step < spec.warmup:
        return spec.lr * (step + 1) / spec.warmup
    frac = (step - spec.warmup) / max(1, spec.max_steps - spec.warmup)
    return spec.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


def greedy_accuracy(model, tok, records: list[dict[str, str]], batch_size: int = 128) -> float:
    """Share of ``records`` whose greedy response's last number equals the answer."""
    model.eval()
    prompts = [Encoder(tok).prompt(r["prompt"]) for r in records]
    greedy = Sampling(temperature=0.0, max_new_tokens=48, batch_size=batch_size)
    keys = [(i, 0) for i in range(len(prompts))]
    responses = generate_responses(HFSampler(model, tok), tok, prompts, keys, greedy, seed=0)
    return sum(last_number(s, r["answer"]) for s, r in zip(responses, records)) / len(records)


def train(tok, spec: TrainSpec, valid: list[dict[str, str]], exclude: set[tuple[int, int]],
          advance=None) -> tuple[Any, dict[str, Any]]:
    """Train a new model on fresh worked examples until it reaches ``spec.target`` greedy
    accuracy on ``valid`` (checked every ``eval_every`` steps) or ``spec.max_steps``.
    ``advance(steps, description, total=None)`` reports progress."""
    validate(spec)
    model, enc = new_model(tok, spec), Encoder(tok)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.01,
                            betas=(0.9, 0.98))
    rng, acc, step, losses, window = random.Random(spec.seed), 0.0, 0, [], []
    while step < spec.max_steps:
        records = [record(*_fresh_pair(rng, exclude)) for _ in range(spec.batch_size)]
        window.append(_sft_step(model, opt, sft_batch(enc, records), _lr_at(step, spec)))
        step += 1
        if len(window) == LOSS_EVERY:
            losses.append(round(sum(window) / len(window), 4))
            window = []
        if advance:
            advance(1, None)
        if step % spec.eval_every == 0 or step == spec.max_steps:
            acc = greedy_accuracy(model, tok, valid)
            if advance:
                advance(0, f"{spec.name} (valid acc {acc:.2f})")
            if acc >= spec.target:
                break
    if advance:
        advance(0, f"{spec.name} (valid acc {acc:.2f}, {step} steps)", step)
    info = {"steps": step, "valid_accuracy": acc, "losses": losses, "spec": to_flat(spec)}
    return model.eval(), info


def _fresh_pair(rng: random.Random, exclude: set[tuple[int, int]]) -> tuple[int, int]:
    while True:
        pair = (_operand(rng), _operand(rng))
        if pair not in exclude:
            return pair


def _sft_step(model, opt, batch, lr: float) -> float:
    model.train()
    ids_BT, mask_BT, labels_BT = batch
    for group in opt.param_groups:
        group["lr"] = lr
    loss = model(input_ids=ids_BT, attention_mask=mask_BT, labels=labels_BT).loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return float(loss.detach())


# ---------------------------------------------------------------- build and cache

def default_dir() -> Path:
    return cache_dir() / "arith"


def build_models(out_dir: str | Path | None = None, force: bool = False,
                 student: TrainSpec = STUDENT, teacher: TrainSpec = TEACHER,
                 valid_size: int = 200) -> tuple[Path, Path]:
    """Train (once) and save the task's teacher and student; returns (student_dir,
    teacher_dir). An existing build under ``out_dir`` is reused unless ``force``."""
    out = Path(out_dir) if out_dir else default_dir()
    dirs = (out / student.name, out / teacher.name)
    if not force and all((d / "config.json").is_file() for d in dirs):
        return dirs
    quiet_transformers()
    tok = build_tokenizer()
    held = set(make_problems(NUM_HELD_OUT, TEST_SEED))
    valid = [record(a, b) for a, b in make_problems(valid_size, VALID_SEED, exclude=held)]
    exclude = held | {_pair(r) for r in valid}
    info, start = {}, time.perf_counter()
    with _progress() as advance_for:
        for spec, d in ((teacher, dirs[1]), (student, dirs[0])):
            model, info[spec.name] = train(tok, spec, valid, exclude, advance_for(spec))
            _save(model, tok, d)
    info["seconds"] = round(time.perf_counter() - start, 1)
    write_atomic(out / "build.json", json.dumps(info, indent=2) + "\n")
    return dirs


def _pair(rec: dict[str, str]) -> tuple[int, int]:
    a, b = rec["prompt"].rstrip("=").split("+")
    return int(a), int(b)


def _save(model, tok, path: Path) -> None:
    """save_pretrained into a temporary directory, then rename into place."""
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)


class _progress:
    """One rich progress row per trained model; ``advance_for(spec)`` gives its callback."""

    def __enter__(self):
        self.bar = progress().__enter__()
        return self.advance_for

    def __exit__(self, *exc):
        return self.bar.__exit__(*exc)

    def advance_for(self, spec: TrainSpec):
        task = self.bar.add_task(spec.name, total=spec.max_steps, tokens=0)

        def advance(steps: int, description: str | None, total: int | None = None) -> None:
            self.bar.update(task, advance=steps, total=total)
            if description:
                self.bar.update(task, description=description)

        return advance


def main(argv: list[str] | None = None) -> None:
    """``build`` the models or write ``prompts``; prints the output path(s) on stdout."""
    parser = argparse.ArgumentParser(prog="python -m tipcli.tasks.arithmetic",
                                     description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="Train and cache the teacher and student.")
    b.add_argument("--out", default=None, help="Directory (default: <tip cache>/arith).")
    b.add_argument("--force", action="store_true", help="Rebuild even if cached.")
    p = sub.add_parser("prompts", help="Write addition prompts with answers as JSONL.")
    p.add_argument("-n", type=int, default=100, help="Number of prompts.")
    p.add_argument("-o", "--output", required=True, help="JSONL file to write.")
    p.add_argument("--seed", type=int, default=0, help="Seed of the prompts.")
    args = parser.parse_args(argv)
    if args.command == "build":
        student, teacher = build_models(args.out, args.force)
        print(f"{student}\n{teacher}")
    else:
        print(write_prompts(args.output, args.n, args.seed))


if __name__ == "__main__":
    main()
