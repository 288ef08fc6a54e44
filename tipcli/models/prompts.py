"""Prompts from JSONL, Parquet, CSV or a `datasets` dataset (hub name or saved directory).

Each record gives either a text prompt (``prompt_field``) or chat messages
(``messages_field``, a list of ``{"role", "content"}``). Prompts are rendered with the
tokenizer's chat template when it has one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets

from tipcli.configs import PromptSource, Sampling
from tipcli.errors import TipError, first_line


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    records = []
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark is read, not refused
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[:exc.start].count(b"\n") + 1
        raise TipError(f"{path} line {line} is not UTF-8 text (byte {exc.object[exc.start]:#x}); "
                       "save the file as UTF-8") from None
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TipError(f"{path} line {lineno} is not valid JSON ({exc.msg}); "
                           "each line must be one JSON object") from None
        if not isinstance(rec, dict):
            raise TipError(f"{path} line {lineno} is not a JSON object; each line must be "
                           'one object such as {"prompt": "..."}')
        records.append(rec)
    return records


def _read_dataset(source: str, split: str) -> list[dict[str, Any]]:
    datasets.disable_progress_bars()
    p = Path(source)
    try:
        if p.is_file():
            kind = {".parquet": "parquet", ".csv": "csv", ".json": "json"}.get(p.suffix)
            if kind is None:
                raise TipError(f"prompt file {source}: unknown format; use .jsonl, .json, "
                               ".parquet, .csv or a datasets directory")
            ds = datasets.load_dataset(kind, data_files=str(p), split="train")
        elif p.is_dir():
            ds = datasets.load_from_disk(str(p))
        else:
            ds = datasets.load_dataset(source, split=split)
    except TipError:
        raise
    except Exception as exc:  # datasets raises many kinds
        raise TipError(f"could not load prompts from {source}: {first_line(exc)}") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise TipError(f"dataset {source} has no split '{split}' (splits: "
                           f"{', '.join(ds)}); choose one with --split")
        ds = ds[split]
    return [dict(r) for r in ds]


def load_prompts(source: str, fields: PromptSource = PromptSource()) -> list[dict[str, Any]]:
    """The prompt records (the first ``fields.max_prompts`` when set), each checked for a
    usable prompt or messages field."""
    prompt_field, messages_field = fields.prompt_field, fields.messages_field
    p = Path(source)
    looks_local = p.suffix in (".jsonl", ".json", ".parquet", ".csv") or "/" not in source
    if looks_local and p.suffix and not p.exists():
        raise TipError(f"prompt file {source} does not exist")
    records = _read_jsonl(p) if p.suffix == ".jsonl" else _read_dataset(source, fields.split)
    if not records:
        raise TipError(f"prompt source {source} holds no prompts")
    for i, rec in enumerate(records):
        where = f"line {i + 1}" if p.suffix == ".jsonl" else f"record {i}"
        _check_contents(rec.get(messages_field), f"{source} {where}", messages_field)
        if not _has_text(rec.get(prompt_field)) and not _has_messages(rec.get(messages_field)):
            raise TipError(f"{source} {where} has no '{prompt_field}' text nor "
                           f"'{messages_field}' list (fields: {', '.join(rec) or 'none'}); "
                           "name the field with --prompt-field or --messages-field")
    return records[:fields.max_prompts] if fields.max_prompts else records


def _has_text(v: Any) -> bool:
    return isinstance(v, str) and v != ""


def _has_messages(v: Any) -> bool:
    return isinstance(v, list) and len(v) > 0 and all(
        isinstance(m, dict) and "role" in m and isinstance(m.get("content"), str) for m in v)


def _check_contents(v: Any, where: str, field: str) -> None:
    """Refuse chat messages whose ``content`` is no string (an object, a list, null): the
    prompt would be its Python repr."""
    if not isinstance(v, list):
        return
    for j, m in enumerate(v):
        content = m.get("content", "") if isinstance(m, dict) else ""
        if not isinstance(content, str):
            kind = {dict: "an object", list: "a list", type(None): "null",
                    bool: "a boolean"}.get(type(content), "a number")
            raise TipError(f"{where}: '{field}'[{j}] content is {kind}, not a string; each "
                           "message's content must be its text")


def encode_prompt(tokenizer, record: dict[str, Any], fields: PromptSource = PromptSource()
                  ) -> list[int]:
    """Token ids of one prompt, through the chat template when the tokenizer has one."""
    messages = record.get(fields.messages_field)
    if not _has_messages(messages):
        messages = [{"role": "user", "content": record[fields.prompt_field]}]
    if getattr(tokenizer, "chat_template", None):
        enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = enc["input_ids"] if not isinstance(enc, list) else enc
        return [int(i) for i in ids]
    text = "\n".join(m["content"] for m in messages)
    return [int(i) for i in tokenizer(text)["input_ids"]]


def fit_context(prompt_ids: list[list[int]], context: int | None, sampling: Sampling,
                source: str) -> list[list[int]]:
    """Prompts that leave ``max_new_tokens`` of the model's context (e.g. its
    ``max_position_embeddings``) free: refused, or cut to their last tokens with a warning,
    as ``sampling.long_prompts`` says. A model without a known context is not checked."""
    if not isinstance(context, int):
        return prompt_ids
    room = context - sampling.max_new_tokens
    if room < 1:
        raise TipError(f"--max-new-tokens {sampling.max_new_tokens} fills the model's whole "
                       f"context of {context} tokens; lower it")
    long = [i for i, p in enumerate(prompt_ids) if len(p) > room]
    if not long:
        return prompt_ids
    if sampling.long_prompts == "error":
        i = long[0]
        raise TipError(f"prompt {i} of {source} has {len(prompt_ids[i])} tokens, but the model's "
                       f"context of {context} with --max-new-tokens {sampling.max_new_tokens} "
                       f"leaves room for {room} ({len(long)} prompts too long); shorten them, "
                       "lower --max-new-tokens, or pass --long-prompts truncate")
    from tipcli.progress import console

    console.print(f"warning: {len(long)} prompts of {source} cut to their last {room} tokens "
                  f"to fit the model's context of {context}", style="yellow", markup=False,
                  soft_wrap=True)
    return [p[-room:] if len(p) > room else p for p in prompt_ids]
