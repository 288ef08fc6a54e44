"""`tip eval`: generate answers to prompts and grade them against reference answers.

    tip eval --model runs/train --prompts heldout.jsonl -o runs/eval --verifier last-number

Generation is the rollout stage's sampler (``tipcli.engines.sampler``: transformers, or vLLM
with ``--backend vllm``), greedy by default (``--temperature 0``). Each response is
graded against the record's answer field by a verifier (`tipcli.ops.verify`). Accuracy is
the share of correct responses over all prompts x samples, with a 95% Wilson score
interval.

The output directory holds exactly two files:

- ``results.jsonl``: one line per response: prompt_index, sample_index, prompt,
  answer, response, correct;
- ``manifest.json`` (stage ``eval``): the resolved config, the model, the tokenizer
  fingerprint, the prompts' checksum and, as its summary, accuracy, interval and counts.

`run_eval` also takes a model and tokenizer already in memory (the distillation loop
evaluates its student without reloading it), and writes nothing when no output is given.
Under a launcher (torchrun) the processes share the responses out in shards, as rollout
does; each shard is seeded by its index, so the results do not depend on the number of
processes.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.table import Table

from tipcli.configs import EvalConfig, Sampling, validate
from tipcli.dist.processes import Processes, processes
from tipcli.engines.sampler import make_sampler
from tipcli.errors import TipError, first_line
from tipcli.models.loading import load_tokenizer, model_ref, tokenizer_info
from tipcli.models.prompts import encode_prompt, fit_context, load_prompts
from tipcli.ops.verify import get_verifier
from tipcli.progress import console, progress_task
from tipcli.store.layout import EVAL, RESULTS
from tipcli.store.stagedir import StageWriter

SHARD_BATCHES = 16  # sampler batches per shard of responses (as tip distill's rollouts)



@dataclass
class EvalResult:
    accuracy: float
    interval: tuple[float, float]
    n: int
    correct: int
    rows: list[dict[str, Any]] = field(default_factory=list)
    output: Path | None = None
    groups: dict[str, dict[str, Any]] = field(default_factory=dict)  # --group-field

    def summary(self) -> dict[str, Any]:
        return {"accuracy": self.accuracy, "interval_95": list(self.interval), "n": self.n,
                "correct": self.correct, **({"groups": self.groups} if self.groups else {})}


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


def run_eval(cfg: EvalConfig, model=None, tokenizer=None, show_progress: bool = True,
             overwrite: bool = False, sampler=None) -> EvalResult:
    """Generate, grade and (when ``cfg.output`` is set) write results; see the module doc.
    Pass ``show_progress=False`` when called inside another live progress display. An
    output holding the same evaluation, finished, is read back instead of generated
    again; one holding another is replaced only with ``overwrite``."""
    run = StageWriter.for_run(EVAL, cfg, overwrite) if cfg.output else None
    if run is None:
        validate(cfg)
    rt = cfg.runtime
    procs = processes(rt.device, rt.dist_timeout)
    verify = get_verifier(cfg.grading.verifier)
    records, answers = _load_records(cfg)
    tok = tokenizer or load_tokenizer(cfg.model, rt.trust_remote_code)
    writer = None
    if run is not None:
        writer = run.start({"model": model_ref(cfg.model, model)}, tokenizer_info(tok),
                            inputs={"prompts_sha256": records_sha256(records)}, procs=procs)
        if writer.complete:
            return _read_back(writer)
    sampler = sampler or make_sampler(cfg.model, tok, cfg.sampling, rt, procs, model=model)
    prompt_ids = fit_context(_encode(tok, records, cfg), sampler.context, cfg.sampling,
                             cfg.prompts)
    items = [(p, s) for p in range(len(records)) for s in range(cfg.sampling.num_samples)]
    responses = shared_responses(sampler, tok, prompt_ids, items, cfg, procs,
                                 "eval" if show_progress and procs.main else None)
    rows = [_row(records[p], p, s, answers[p], r, verify, cfg)
            for (p, s), r in zip(items, responses)]
    correct = sum(r["correct"] for r in rows)
    result = EvalResult(correct / len(rows), wilson_interval(correct, len(rows)), len(rows),
                        correct, rows, groups=by_group(records, rows, cfg.group_field))
    if writer is not None:
        if procs.main:
            writer.write_file(RESULTS, "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                               for r in rows))
        result.output = writer.finish({**result.summary(), "num_prompts": len(records)})
    return result


def by_group(records: list[dict[str, Any]], rows: list[dict[str, Any]], field_name: str
             ) -> dict[str, dict[str, Any]]:
    """{value of ``field_name``: accuracy, interval, n, correct} over the rows of the
    prompts with that value (a prompt without the field: the value "none")."""
    if not field_name:
        return {}
    out: dict[str, list[bool]] = {}
    for r in rows:
        value = records[r["prompt_index"]].get(field_name)
        out.setdefault("none" if value is None else str(value), []).append(bool(r["correct"]))
    return {k: {"accuracy": sum(v) / len(v), "interval_95": list(wilson_interval(sum(v),
                                                                                 len(v))),
                "n": len(v), "correct": sum(v)} for k, v in out.items()}


def shared_responses(sampler, tok, prompt_ids: list[list[int]], items: list[tuple[int, int]],
                     cfg: EvalConfig, procs: Processes, label: str | None) -> list[str]:
    """The responses to ``items`` (prompt, sample), on every process: drawn in shards of
    ``SHARD_BATCHES`` batches, each seeded by its index as a rollout's are, process r
    taking shards r, r + W, ...; the same responses for any number of processes."""
    size = cfg.sampling.sample_batch_size * SHARD_BATCHES
    shards = [items[a:a + size] for a in range(0, len(items), size)]
    mine = procs.mine(range(len(shards)))
    drawn = {}
    with progress_task(label, sum(len(shards[si]) for si in mine)) as advance:
        for si in mine:
            batch = sampler.sample_shard([prompt_ids[p] for p, _ in shards[si]], shards[si],
                                         cfg.sampling, cfg.seed, si, advance)
            drawn[si] = _decode(tok, batch)
    every = {si: texts for part in procs.gather(drawn) for si, texts in part.items()}
    return [text for si in range(len(shards)) for text in every[si]]


def records_sha256(records: list[dict[str, Any]]) -> str:
    """A checksum of the prompt records as read (prompts and answers)."""
    return hashlib.sha256(json.dumps(records, sort_keys=True, default=str).encode()).hexdigest()


def _read_back(writer) -> EvalResult:
    """The finished evaluation in ``writer``'s directory."""
    s = writer.manifest["summary"]
    text = (writer.path / RESULTS).read_text(encoding="utf-8")
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    return EvalResult(s["accuracy"], tuple(s["interval_95"]), s["n"], s["correct"], rows,
                      writer.path, s.get("groups", {}))


def _load_records(cfg: EvalConfig) -> tuple[list[dict[str, Any]], list[str]]:
    records = load_prompts(cfg.prompts, cfg.source)
    answers, field_name = [], cfg.grading.answer_field
    for i, rec in enumerate(records):
        if rec.get(field_name) is None:
            raise TipError(f"{cfg.prompts} record {i} has no '{field_name}' field "
                           f"(fields: {', '.join(rec) or 'none'}); name it with --answer-field")
        answers.append(str(rec[field_name]))
    return records, answers


def _encode(tok, records, cfg: EvalConfig) -> list[list[int]]:
    ids = [encode_prompt(tok, r, cfg.source) for r in records]
    for i, p in enumerate(ids):
        if not p:
            raise TipError(f"prompt {i} of {cfg.prompts} encodes to no tokens")
    return ids


def generate_responses(sampler, tok, prompts: list[list[int]], keys: list[tuple[int, int]],
                       sampling: Sampling, seed: int, progress_label: str | None = None
                       ) -> list[str]:
    """Decoded responses to token-id prompts from ``sampler`` (``keys``: each one's (prompt,
    sample) index); seeded as the rollout's shard 0 is. A progress bar is drawn only when
    ``progress_label`` is given."""
    with progress_task(progress_label, len(prompts)) as advance:
        batch = sampler.sample_shard(prompts, keys, sampling, seed, 0, advance)
    return _decode(tok, batch)


def _decode(tok, batch) -> list[str]:
    ids, offs = batch.response_ids_T.tolist(), batch.response_offsets_N1.tolist()
    return [tok.decode(ids[a:b], skip_special_tokens=True) for a, b in zip(offs, offs[1:])]


def _prompt_text(rec: dict[str, Any], cfg: EvalConfig) -> str:
    text = rec.get(cfg.source.prompt_field)
    if isinstance(text, str) and text:
        return text
    return str(rec[cfg.source.messages_field][-1]["content"])


def _row(rec, p: int, s: int, answer: str, response: str, verify, cfg: EvalConfig):
    try:
        ok = bool(verify(response, answer))
    except Exception as exc:  # a user verifier failing is the user's to fix
        raise TipError(f"verifier '{cfg.grading.verifier}' raised {type(exc).__name__} on "
                       f"prompt {p}: {first_line(exc)}") from None
    return {"prompt_index": p, "sample_index": s, "prompt": _prompt_text(rec, cfg),
            "answer": answer, "response": response, "correct": ok}


def render_summary(cfg: EvalConfig, result: EvalResult) -> None:
    """Accuracy and its 95% interval as a rich table on stderr."""
    lo, hi = result.interval
    table = Table(title="eval", title_justify="left", show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    for key, value in (("model", cfg.model), ("prompts", cfg.prompts),
                       ("verifier", cfg.grading.verifier),
                       ("responses", f"{result.n} ({cfg.sampling.num_samples} per prompt)"),
                       ("correct", f"{result.correct}/{result.n}"),
                       ("accuracy", f"{result.accuracy:.3f}"),
                       ("95% interval (Wilson)", f"[{lo:.3f}, {hi:.3f}]")):
        table.add_row(key, value)
    for name, g in result.groups.items():
        table.add_row(f"{cfg.group_field} = {name}",
                      f"{g['accuracy']:.3f} ({g['correct']}/{g['n']}; 95% "
                      f"[{g['interval_95'][0]:.3f}, {g['interval_95'][1]:.3f}])")
    console.print(table)


def run_eval_cli(cfg: EvalConfig, overwrite: bool = False) -> str:
    """``run_eval`` for the command line: the summary table, then the line to print (the
    results directory, or the accuracy when nothing is written)."""
    result = run_eval(cfg, overwrite=overwrite)
    render_summary(cfg, result)
    return str(result.output) if result.output else f"{result.accuracy:.4f}"
