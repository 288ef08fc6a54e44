"""`tip eval`: generate answers to prompts and grade them against reference answers.

    python -m tipcli.tasks.arithmetic prompts -n 100 -o arith.jsonl --seed 7
    tip eval --model ~/.cache/tip/arith/student --prompts arith.jsonl -o runs/eval

Generation is the rollout stage's batched generation (`tipcli.rollout.generate_batch`),
greedy by default (``--temperature 0``). Each response is graded against the record's
answer field by a verifier (`tipcli.verify`). Accuracy is the share of correct
responses over all prompts x samples, with a 95% Wilson score interval.

The output directory holds exactly two files:

- ``results.jsonl``: one line per response: prompt_index, sample_index, prompt,
  answer, response, correct;
- ``summary.json``: accuracy, interval, counts, the resolved config, the model and the
  tokenizer fingerprint.

`run_eval` also takes a model and tokenizer already in memory (the distillation loop
evaluates its student without reloading it), and writes nothing when no output is given.
"""

from __future__ import annotations

import json
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tipcli.config import option, to_dict
from tipcli.errors import TipError
from tipcli.verify import BUILTIN

RESULTS, SUMMARY = "results.jsonl", "summary.json"


@dataclass(frozen=True)
class EvalConfig:
    model: str = option("", "Model to evaluate: hub id, local directory or .gguf file.")
    prompts: str = option("", "Prompts with reference answers: .jsonl, .parquet, .csv, dataset.")
    output: str = option("", "Output directory for per-prompt results (empty = write nothing).")
    verifier: str = option("auto", "Grader: auto, exact, last-number, boxed or module:function.")
    answer_field: str = option("answer", "Record field holding the reference answer.")
    num_samples: int = option(1, "Responses per prompt.")
    temperature: float = option(0.0, "Sampling temperature (0 = greedy).")
    top_p: float = option(1.0, "Nucleus sampling mass (1 = off).")
    max_new_tokens: int = option(256, "Most tokens per response.")
    batch_size: int = option(32, "Sequences generated together.")
    max_prompts: int = option(0, "Use only the first N prompts (0 = all).")
    seed: int = option(0, "Random seed for sampling.")
    prompt_field: str = option("prompt", "Record field holding the prompt text.")
    messages_field: str = option("messages", "Record field holding chat messages.")
    split: str = option("train", "Dataset split, for datasets with several.")
    device: str = option("auto", "Device: auto, cpu, cuda, cuda:1 ...")
    dtype: str = option("auto", "Model dtype: auto (bf16 on GPU, fp32 on CPU), float32, bfloat16.")
    trust_remote_code: bool = option(False, "Allow model code from the hub (only if you trust it).")

    def validate(self) -> list[str]:
        p = []
        if not self.model:
            p.append("--model is required")
        if not self.prompts:
            p.append("--prompts is required")
        if self.verifier not in BUILTIN and ":" not in self.verifier:
            p.append(f"--verifier must be one of {', '.join(BUILTIN)} or module:function")
        if self.num_samples < 1:
            p.append("--num-samples must be at least 1")
        if self.temperature < 0:
            p.append("--temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            p.append("--top-p must be in (0, 1]")
        if self.max_new_tokens < 1:
            p.append("--max-new-tokens must be at least 1")
        if self.batch_size < 1:
            p.append("--batch-size must be at least 1")
        if self.max_prompts < 0:
            p.append("--max-prompts must be >= 0")
        return p


@dataclass
class EvalResult:
    accuracy: float
    interval: tuple[float, float]
    n: int
    correct: int
    rows: list[dict[str, Any]] = field(default_factory=list)
    output: Path | None = None

    def summary(self) -> dict[str, Any]:
        return {"accuracy": self.accuracy, "interval_95": list(self.interval), "n": self.n,
                "correct": self.correct}


def wilson_interval(correct: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (95% for the default z)."""
    if n == 0:
        return (0.0, 1.0)
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    lo = 0.0 if correct == 0 else max(0.0, centre - half)
    hi = 1.0 if correct == n else min(1.0, centre + half)
    return (lo, hi)


def run_eval(cfg: EvalConfig, model=None, tokenizer=None, show_progress: bool = True
             ) -> EvalResult:
    """Generate, grade and (when ``cfg.output`` is set) write results; see the module doc.
    Pass ``show_progress=False`` when called inside another live progress display."""
    from tipcli.verify import get_verifier

    verify = get_verifier(cfg.verifier)
    records, answers = _load_records(cfg)
    model, tok = _load(cfg, model, tokenizer)
    prompt_ids = _encode(tok, records, cfg)
    items = [(p, s) for p in range(len(records)) for s in range(cfg.num_samples)]
    responses = generate_responses(model, tok, [prompt_ids[p] for p, _ in items], cfg,
                                   progress_label="eval" if show_progress else None)
    rows = [_row(records[p], p, s, answers[p], r, verify, cfg)
            for (p, s), r in zip(items, responses)]
    correct = sum(r["correct"] for r in rows)
    result = EvalResult(correct / len(rows), wilson_interval(correct, len(rows)), len(rows),
                        correct, rows)
    if cfg.output:
        result.output = _write(cfg, result, model, tok)
    return result


def _load_records(cfg: EvalConfig) -> tuple[list[dict[str, Any]], list[str]]:
    from tipcli.prompts import load_prompts

    records = load_prompts(cfg.prompts, cfg.prompt_field, cfg.messages_field, cfg.split,
                           cfg.max_prompts or None)
    answers = []
    for i, rec in enumerate(records):
        if rec.get(cfg.answer_field) is None:
            raise TipError(f"{cfg.prompts} record {i} has no '{cfg.answer_field}' field "
                           f"(fields: {', '.join(rec) or 'none'}); name it with --answer-field")
        answers.append(str(rec[cfg.answer_field]))
    return records, answers


def _load(cfg: EvalConfig, model, tokenizer):
    from tipcli.models import load_model, load_tokenizer, resolve_device, resolve_dtype

    tok = tokenizer or load_tokenizer(cfg.model, cfg.trust_remote_code)
    if model is None:
        device = resolve_device(cfg.device)
        model = load_model(cfg.model, device, resolve_dtype(cfg.dtype, device),
                           cfg.trust_remote_code)
    return model, tok


def _encode(tok, records, cfg: EvalConfig) -> list[list[int]]:
    from tipcli.prompts import encode_prompt

    ids = [encode_prompt(tok, r, cfg.prompt_field, cfg.messages_field) for r in records]
    for i, p in enumerate(ids):
        if not p:
            raise TipError(f"prompt {i} of {cfg.prompts} encodes to no tokens")
    return ids


def generate_responses(model, tok, prompts: list[list[int]], cfg: EvalConfig,
                       progress_label: str | None = None) -> list[str]:
    """Decoded responses to token-id prompts, generated in batches of ``cfg.batch_size``
    with the rollout stage's `generate_batch`; each batch is seeded from (seed, batch).
    A progress bar is drawn only when ``progress_label`` is given."""
    import torch

    from tipcli.rollout import RolloutConfig, generate_batch

    rcfg = RolloutConfig(temperature=cfg.temperature, top_p=cfg.top_p,
                         max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size,
                         seed=cfg.seed)
    device = next(model.parameters()).device
    was_training, out = model.training, []
    model.eval()
    with _bar(progress_label, len(prompts)) as advance:
        for bi, start in enumerate(range(0, len(prompts), cfg.batch_size)):
            torch.manual_seed(cfg.seed * 1_000_003 + bi)
            batch = generate_batch(model, tok, prompts[start:start + cfg.batch_size], rcfg,
                                   device)
            out.extend(_decode(tok, batch))
            advance(len(prompts[start:start + cfg.batch_size]), int(batch["response_mask"].sum()))
    model.train(was_training)
    return out


@contextmanager
def _bar(label: str | None, total: int):
    """Yields ``advance(sequences, tokens)``; a no-op without a label."""
    if label is None:
        yield lambda n, t: None
        return
    from tipcli.progress import progress

    with progress() as bar:
        task = bar.add_task(label, total=total, tokens=0)

        def advance(n: int, tokens: int) -> None:
            bar.update(task, advance=n, tokens=bar.tasks[task].fields["tokens"] + tokens)

        yield advance


def _decode(tok, batch) -> list[str]:
    ids, offs = batch["response_ids"].tolist(), batch["response_offsets"].tolist()
    return [tok.decode(ids[a:b], skip_special_tokens=True) for a, b in zip(offs, offs[1:])]


def _prompt_text(rec: dict[str, Any], cfg: EvalConfig) -> str:
    text = rec.get(cfg.prompt_field)
    if isinstance(text, str) and text:
        return text
    return str(rec[cfg.messages_field][-1]["content"])


def _row(rec, p: int, s: int, answer: str, response: str, verify, cfg: EvalConfig):
    try:
        ok = bool(verify(response, answer))
    except Exception as exc:  # a user verifier failing is the user's to fix
        raise TipError(f"verifier '{cfg.verifier}' raised {type(exc).__name__} on prompt {p}: "
                       f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    return {"prompt_index": p, "sample_index": s, "prompt": _prompt_text(rec, cfg),
            "answer": answer, "response": response, "correct": ok}


def _write(cfg: EvalConfig, result: EvalResult, model, tok) -> Path:
    from tipcli.models import model_ref, tokenizer_info

    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in result.rows)
    summary = {**result.summary(), "num_prompts": result.n // cfg.num_samples,
               "config": to_dict(cfg), "model": model_ref(cfg.model, model),
               "tokenizer": tokenizer_info(tok)}
    for name, text in ((RESULTS, lines), (SUMMARY, json.dumps(summary, indent=2) + "\n")):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, out / name)
    return out


def render_summary(cfg: EvalConfig, result: EvalResult) -> None:
    """Accuracy and its 95% interval as a rich table on stderr."""
    from rich.table import Table

    from tipcli.progress import console

    lo, hi = result.interval
    table = Table(title="eval", title_justify="left", show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    for key, value in (("model", cfg.model), ("prompts", cfg.prompts),
                       ("verifier", cfg.verifier),
                       ("responses", f"{result.n} ({cfg.num_samples} per prompt)"),
                       ("correct", f"{result.correct}/{result.n}"),
                       ("accuracy", f"{result.accuracy:.3f}"),
                       ("95% interval (Wilson)", f"[{lo:.3f}, {hi:.3f}]")):
        table.add_row(key, value)
    console.print(table)
