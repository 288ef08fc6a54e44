"""The demo's two models, trained from scratch on the addition task (``tip demo --rebuild``).

    tip demo --rebuild                      # into <tip cache>/arith, then the demo on them
    tip demo --rebuild --models DIR         # into DIR (e.g. tipcli/demo_models, to refresh
                                            # the pair the package ships)

Small Llama models with the character tokenizer of ``tipcli.models.tiny``, trained by supervised
next-token training on worked examples (loss on response tokens only, fresh examples each
step, never a validation or test prompt):

- the teacher (hidden 128, 4 layers) trains until it solves all of a validation set of
  200 prompts (checked every 100 steps);
- the student (hidden 64, 2 layers) trains only until it solves 30% of it (checked every
  20 steps), so it is neither random nor good and distillation has room to help.

Both are written with ``save_pretrained`` and the same tokenizer, and ``build.json``
records what built them: the commit, the settings, the versions, the CPU, the steps each
model took and its validation accuracy. Everything is seeded, but float results differ
between CPUs (AVX2 against AVX-512), and training that stops at an accuracy threshold
amplifies that: the same commit builds another pair on another CPU. That is why the
package ships one pair (``tipcli/demo_models``) and `tip demo` uses it.
"""

from __future__ import annotations

import json
import platform
import random
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from tipcli import __version__
from tipcli.configs import Sampling
from tipcli.engines.hf import HFSampler
from tipcli.errors import TipError
from tipcli.models.loading import quiet_transformers
from tipcli.models.tiny import build_model, build_tokenizer
from tipcli.ops.verify import last_number
from tipcli.progress import progress_task
from tipcli.settings import setting, to_flat, validate
from tipcli.stages.evaluate import generate_responses
from tipcli.store.files import atomic_dir, write_json_atomic
from tipcli.tasks.arithmetic import (
    NUM_HELD_OUT,
    OPS,
    TEST_SEED,
    VALID_SEED,
    make_problems,
    random_problem,
    record,
    solve,
)

BUILD_RECORD = "build.json"
PLACEHOLDER = "\x00"
VOCAB_PAD = 28  # output rows past the 100-token vocabulary (128 in all), as real checkpoints pad
CONTEXT = 256
LOSS_EVERY = 10  # steps averaged into one logged training loss


@dataclass(frozen=True)
class TrainSpec:
    """Size and schedule of one model trained from scratch on worked examples."""

    name: str = setting("teacher", "Directory name of the model.", required=True)
    hidden: int = setting(128, "Hidden size.", ge=1)
    layers: int = setting(4, "Transformer layers.", ge=1)
    heads: int = setting(4, "Attention heads.", ge=1)
    max_steps: int = setting(3000, "Most optimizer steps.", ge=1)
    batch_size: int = setting(64, "Worked examples per step.", ge=1)
    lr: float = setting(3e-3, "Peak AdamW learning rate (linear warmup, cosine decay to a "
                              "tenth).", gt=0)
    warmup: int = setting(100, "Warmup steps.", ge=0)
    eval_every: int = setting(100, "Steps between validation checks.", ge=1)
    target: float = setting(0.95, "Stop once greedy validation accuracy reaches this.", ge=0,
                            le=1)
    seed: int = setting(0, "Seed of the initial weights and the training examples.")

    def rules(self) -> list[str]:
        return ["--hidden must be a multiple of --heads"] if self.hidden % self.heads else []


TEACHER = TrainSpec("teacher", hidden=128, layers=4, heads=4, max_steps=1200, target=1.0,
                    seed=1)
CROSS_TEACHER = TrainSpec("teacher-bpe", hidden=128, layers=4, heads=4, max_steps=1200,
                          target=1.0, seed=3)
BPE_SIZE = 384  # byte-level BPE: 256 bytes, 4 specials and 124 merges of the task's text
STUDENT = TrainSpec("student", hidden=64, layers=2, heads=4, max_steps=1500, lr=2e-3,
                    eval_every=20, target=0.3, seed=2)


# ---------------------------------------------------------------- tokens and batches


class Encoder:
    """Ids of a worked example: prompt through the chat template, plus the response and
    EOS. Equal to ``encode_prompt`` + ``tokenizer(response)``; for the character tokenizer
    by a lookup a character, for another (the cross-tokenizer teacher's BPE) through it."""

    def __init__(self, tok):
        text = tok.apply_chat_template([{"role": "user", "content": PLACEHOLDER}],
                                       tokenize=False, add_generation_prompt=True)
        self.before, self.after = text.split(PLACEHOLDER)
        self.tok, self.vocab = tok, tok.get_vocab()
        self.chars = all(len(t) == 1 or t.startswith("<") for t in self.vocab)
        self.eos, self.pad = tok.eos_token_id, tok.pad_token_id

    def ids(self, text: str) -> list[int]:
        if self.chars:
            return [self.vocab[c] for c in text]
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

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


def new_model(tok, spec: TrainSpec):
    """A randomly initialised Llama sized by ``spec`` (vocabulary padded by ``VOCAB_PAD``)."""
    return build_model(tok, hidden=spec.hidden, layers=spec.layers, heads=spec.heads,
                       vocab_pad=VOCAB_PAD, seed=spec.seed, context=CONTEXT, head_scale=1.0)


def greedy_accuracy(model, tok, records: list[dict[str, str]], batch_size: int = 128) -> float:
    """Share of ``records`` whose greedy response's last number equals the answer."""
    model.eval()
    prompts = [Encoder(tok).prompt(r["prompt"]) for r in records]
    greedy = Sampling(temperature=0.0, max_new_tokens=48, sample_batch_size=batch_size)
    keys = [(i, 0) for i in range(len(prompts))]
    responses = generate_responses(HFSampler(model, tok), tok, prompts, keys, greedy, seed=0)
    return sum(last_number(s, r["answer"]) for s, r in zip(responses, records)) / len(records)


def train(tok, spec: TrainSpec, valid: list[dict[str, str]], exclude: set[tuple[int, int]],
          ops: tuple[str, ...] = ("+",)) -> tuple[Any, dict[str, Any]]:
    """Train a new model on fresh worked examples (of each of ``ops`` in turn) until it
    reaches ``spec.target`` greedy accuracy on ``valid`` (checked every ``eval_every``
    steps) or ``spec.max_steps``."""
    validate(spec)
    model, enc = new_model(tok, spec), Encoder(tok)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.01,
                            betas=(0.9, 0.98))
    schedule = get_cosine_with_min_lr_schedule_with_warmup(opt, spec.warmup, spec.max_steps,
                                                           min_lr_rate=0.1)
    rng, acc, step, losses, window = random.Random(spec.seed), 0.0, 0, [], []
    with progress_task(spec.name, spec.max_steps) as advance:
        while step < spec.max_steps:
            records = [record(*_fresh_pair(rng, exclude, op), op) for op in
                       (ops[i % len(ops)] for i in range(spec.batch_size))]
            window.append(_sft_step(model, opt, schedule, sft_batch(enc, records)))
            step += 1
            if len(window) == LOSS_EVERY:
                losses.append(round(sum(window) / len(window), 4))
                window = []
            advance(1)
            if step % spec.eval_every == 0 or step == spec.max_steps:
                acc = greedy_accuracy(model, tok, valid)
                advance(0, description=f"{spec.name} (valid acc {acc:.2f})")
                if acc >= spec.target:
                    break
        advance(0, total=step)
    info = {"steps": step, "valid_accuracy": acc, "losses": losses, "spec": to_flat(spec),
            **({"ops": list(ops)} if ops != ("+",) else {})}
    return model.eval(), info


def _fresh_pair(rng: random.Random, exclude: set[tuple[int, int]], op: str = "+"
                ) -> tuple[int, int]:
    while True:
        pair = random_problem(rng, op)
        if pair not in exclude:
            return pair


def _sft_step(model, opt, schedule, batch) -> float:
    model.train()
    ids_BT, mask_BT, labels_BT = batch
    loss = model(input_ids=ids_BT, attention_mask=mask_BT, labels=labels_BT).loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    schedule.step()
    return float(loss.detach())


# ---------------------------------------------------------------- the pair and its record


def build_models(out: str | Path, student: TrainSpec = STUDENT, teacher: TrainSpec = TEACHER,
                 valid_size: int = 200) -> tuple[Path, Path]:
    """Train the task's teacher and student into ``out`` (``out/student``, ``out/teacher``
    and the build record); returns (student_dir, teacher_dir). ``out`` must be new, empty,
    or an earlier build (it holds a build record): nothing else is ever replaced."""
    out = Path(out)
    check_build_dir(out)
    quiet_transformers()
    tok = build_tokenizer()
    valid, exclude = validation(valid_size)
    info: dict[str, Any] = {"valid_size": valid_size}
    start = time.perf_counter()
    for spec in (teacher, student):
        model, info[spec.name] = train(tok, spec, valid["+"], exclude)
        save_model(model, tok, out / spec.name)
    info["seconds"] = round(time.perf_counter() - start, 1)
    write_json_atomic(out / BUILD_RECORD, {**provenance(), **info})
    return out / student.name, out / teacher.name


def task_tokenizer(size: int = BPE_SIZE, exclude: set[tuple[int, int]] = frozenset()):
    """A byte-level BPE tokenizer trained on the task's text (prompts through the chat
    template, worked solutions) of problems outside ``exclude``: another tokenizer for the
    same text, whose tokens are often several of the character tokenizer's."""
    from tipcli.models.tiny import CHARS, build_bpe_tokenizer

    corpus = [f"U: {a}+{b}=\nA: {solve(a, b)}" for a, b in
              make_problems(2000, seed=11, exclude=exclude)]
    return build_bpe_tokenizer([CHARS] + corpus, size)


def build_cross_teacher(out: str | Path, spec: TrainSpec = CROSS_TEACHER,
                        valid_size: int = 200) -> Path:
    """Train the task's teacher on its own tokenizer (``task_tokenizer``) into
    ``out/teacher-bpe``, beside a pair ``build_models`` wrote (its build record gains the
    teacher's entry); returns the teacher's directory."""
    out = Path(out)
    check_build_dir(out)
    quiet_transformers()
    valid, exclude = validation(valid_size)
    tok = task_tokenizer(exclude=exclude)
    start = time.perf_counter()
    model, info = train(tok, spec, valid["+"], exclude)
    save_model(model, tok, out / spec.name, half=True)
    info.update(seconds=round(time.perf_counter() - start, 1), tokenizer_size=len(tok),
                weights="float16", **provenance())
    rec = out / BUILD_RECORD
    known = json.loads(rec.read_text()) if rec.is_file() else {}
    write_json_atomic(rec, {**known, spec.name: info})
    return out / spec.name


SUB_TEACHER = TrainSpec("teacher-sub", hidden=128, layers=4, heads=4, max_steps=1500,
                        target=1.0, seed=4)
BOTH_STUDENT = TrainSpec("student-both", hidden=64, layers=2, heads=4, max_steps=1500, lr=2e-3,
                         eval_every=20, target=0.3, seed=5)


def build_two_tasks(out: str | Path, teacher: TrainSpec = SUB_TEACHER,
                    student: TrainSpec = BOTH_STUDENT, valid_size: int = 100) -> tuple[Path, Path]:
    """The several-teachers example's models into ``out``: a subtraction teacher (the
    addition one is the demo's) and a student of both tasks, trained to a weak start on
    each (``student.target`` on a validation set half of each); returns (student_dir,
    teacher_dir)."""
    out = Path(out)
    check_build_dir(out)
    quiet_transformers()
    tok = build_tokenizer()
    valid, exclude = validation(valid_size, OPS)
    info: dict[str, Any] = {"valid_size": valid_size}
    start = time.perf_counter()
    for spec, ops in ((teacher, ("-",)), (student, OPS)):
        model, info[spec.name] = train(tok, spec, [r for op in ops for r in valid[op]],
                                       exclude, ops)
        info[spec.name]["valid_accuracy_per_op"] = {
            op: greedy_accuracy(model, tok, valid[op]) for op in ops}
        save_model(model, tok, out / spec.name, half=spec is teacher)
        if spec is teacher:
            info[spec.name]["weights"] = "float16"
    info["seconds"] = round(time.perf_counter() - start, 1)
    write_json_atomic(out / BUILD_RECORD, {**provenance(), **info})
    return out / student.name, out / teacher.name


def validation(size: int, ops: tuple[str, ...] = ("+",)
               ) -> tuple[dict[str, list[dict[str, str]]], set[tuple[int, int]]]:
    """Each op's validation records (``size``, none of the held-out test problems) and the
    problems training must exclude (the test problems of every op and the validation
    ones)."""
    held = {p for op in ops for p in make_problems(NUM_HELD_OUT, TEST_SEED, op=op)}
    valid = {op: [record(a, b, op) for a, b in make_problems(size, VALID_SEED, exclude=held,
                                                             op=op)] for op in ops}
    return valid, held | {_pair(r) for rs in valid.values() for r in rs}


def save_model(model, tok, path: Path, half: bool = False) -> None:
    """``model`` and ``tok`` into the new directory ``path``, atomically; with ``half`` the
    weights are stored in float16 (half the bytes of a shipped teacher) and loaded back in
    float32, the dtype its config keeps."""
    with atomic_dir(path) as tmp:
        state = {k: v.half() for k, v in model.state_dict().items()} if half else None
        model.save_pretrained(tmp, state_dict=state)
        tok.save_pretrained(tmp)


def check_build_dir(out: Path) -> None:
    """Refuse to build into a folder that holds anything but an earlier build."""
    if out.exists() and not out.is_dir():
        raise TipError(f"--models {out} is a file; give a directory for the built models")
    if out.is_dir() and any(out.iterdir()) and not (out / BUILD_RECORD).is_file():
        raise TipError(f"--models {out} is not empty and holds no {BUILD_RECORD} of an earlier "
                       "build; choose a new or empty directory (nothing was deleted)")
    out.mkdir(parents=True, exist_ok=True)


def provenance() -> dict[str, Any]:
    """What built a pair: the commit (when tip runs from a git checkout), versions, CPU."""
    import transformers

    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(here), "describe", "--always", "--dirty",
                                 "--abbrev=40"], capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"commit": commit, "tip_version": __version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "cpu": cpu_name(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads()}


def cpu_name() -> str:
    """The processor's model name (/proc/cpuinfo on Linux), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _pair(rec: dict[str, str]) -> tuple[int, int]:
    a, b = rec["prompt"].rstrip("=").replace("-", "+").split("+")
    return int(a), int(b)
