"""A teacher on its own serving engine: vLLM's OpenAI-compatible server (``--teacher-url``).

    vllm serve T --max-logprobs 64 --port 8000          # the teacher, on its own GPUs
    tip score runs/rollout --teacher T --teacher-url http://HOST:8000 -o runs/score

``--teacher-url`` is the server's address, with or without the ``/v1`` that OpenAI
clients put in their ``base_url``. For each response one request to the server's
completions endpoint: the prompt and the response as token ids, ``max_tokens`` 1,
``prompt_logprobs`` = ``--teacher-top-k``. The answer gives, at every response position,
the teacher's log-prob of the sampled token and its top-k ids and log-probs: exact. The
student runs here, exactly as ever; what needs the teacher's whole distribution becomes a
stated estimate (``tipcli.ops.stats.served_stats``): the divergences over the top-k and one
tail bucket (as the ``*-topk`` losses), and no teacher entropy at all. The score manifest
says which statistic is which.

Before any scoring the server is checked: reachable, serving ``--teacher``, tokenizing as
the student does (its ``/tokenize`` endpoint on probe strings; for a teacher with another
tokenizer, as that tokenizer read here from ``--teacher`` does), and allowing
``--teacher-top-k`` prompt log-probs (vLLM's ``--max-logprobs``). Only JSON crosses the
wire, and no answer is trusted: each must be JSON of the expected shape with exactly one
entry per position sent, the sent token and at least the top-k ranked at each response
position, ids of the student's vocabulary and finite log-probs of at most 0. Requests go
out ``--teacher-concurrency`` at a time on daemon threads; one that fails (no connection,
``--teacher-timeout`` passed, a 5xx answer, an answer that fails those checks) is tried
again with backoff, ``RETRIES`` tries within ``DEADLINE_TIMEOUTS`` x ``--teacher-timeout``
in all. Then the stage stops with one line naming the server, the response (shard and
sequence) and what was wrong; the finished shards stay and the same command resumes. A 4xx
answer other than 408 and 429 (the server refuses the request) stops it at once. Ctrl-C
stops tip at once too: no thread is waited for, so a hung server cannot hold it.
"""

from __future__ import annotations

import http.client
import json
import math
import queue
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import torch

from tipcli.errors import TipError, first_line
from tipcli.models.loading import real_vocab_size

RETRIES = 5              # tries of one request: no connection, a timeout, 5xx, a bad answer
BACKOFF_SECONDS = 0.5    # doubled after each failed try
TIMEOUT_SECONDS = 300.0  # one try's answer, unless given (--teacher-timeout)
DEADLINE_TIMEOUTS = 3    # one request's tries stop after this many timeouts in all
LOGPROB_SLACK = 1e-3     # how far above 0 a served log-prob may round
PROBES = ("Hello, world!", "  two spaces, tabs\tand\nnew lines", "naïve café 東京 🙂",
          "def f(x):\n    return x ** 2  # 42")
_NEVER = threading.Event()  # the stop flag of the start-up checks (the main thread's)


class ServerError(TipError):
    """The server did not answer (after retries), refused a request, or answered what
    cannot be used."""


class _Failed(Exception):
    """One try that failed (tried again)."""


class _NoAnswer(_Failed):
    """No answer: no connection, a timeout, a body cut short, a 5xx answer."""


class _BadAnswer(_Failed):
    """An answer that cannot be used: not JSON, or not of the shape asked for."""


def served_url(url: str) -> str:
    """The server's root: ``url`` without a trailing ``/`` or ``/v1`` (the OpenAI clients'
    ``base_url``, as vLLM's docs give it)."""
    return url.rstrip("/").removesuffix("/v1").rstrip("/")


class ServedClient:
    """The teacher named ``name`` on the vLLM server at ``url``, checked against the
    student's tokenizer ``tok`` and the top-k it must return; ``timeout`` seconds for one
    try's answer."""

    def __init__(self, url: str, name: str, tok, top_k: int, concurrency: int = 8,
                 timeout: float = TIMEOUT_SECONDS, own: bool = False):
        self.url, self.name = served_url(url), name
        self.vocab = real_vocab_size(tok)
        self.top_k = min(top_k, self.vocab)
        self.concurrency, self.timeout = concurrency, timeout
        self._check_served()
        self._check_tokenizer(tok, own)
        self._check_top_k()

    @classmethod
    def served_model(cls, url: str, timeout: float = TIMEOUT_SECONDS) -> str:
        """The one model the server at ``url`` serves (``--teacher NAME=URL``), asked
        before the client is made; one line where it serves none or several."""
        probe = cls.__new__(cls)
        probe.url, probe.name, probe.timeout = served_url(url), "(the served model)", timeout
        served = probe._ask("/v1/models", None, _model_names)
        if len(served) != 1:
            raise TipError(f"the server at {probe.url} serves {len(served)} models "
                           f"({', '.join(map(str, served))}): name the one to use with "
                           "--teacher NAME=MODEL --teacher-url NAME=URL")
        return str(served[0])

    # ------------------------------------------------------------------ HTTP

    def _ask(self, path: str, body: dict | None, check: Callable[[Any], Any], where: str = "",
             stop: threading.Event = _NEVER) -> Any:
        """``check`` of the JSON answer to one request (a POST of ``body``, or a GET), tried
        until ``check`` passes it: no connection, a timeout, a 5xx, 408 or 429 answer or one
        ``check`` refuses is tried again with backoff, ``RETRIES`` tries within
        ``DEADLINE_TIMEOUTS`` timeouts, while ``stop`` is not set. Any other 4xx answer is a
        ServerError at once."""
        at = f"{path} for {where}" if where else path
        data = None if body is None else json.dumps(body).encode()
        start = time.monotonic()
        deadline, wait = start + DEADLINE_TIMEOUTS * self.timeout, BACKOFF_SECONDS
        tries, failed = 0, _NoAnswer("not asked")
        while tries < RETRIES and not stop.is_set() and time.monotonic() < deadline:
            tries += 1
            try:
                left = max(0.01, min(self.timeout, deadline - time.monotonic()))
                return check(_json(self._fetch(path, data, left, at)))
            except _Failed as exc:
                failed = exc
            if tries < RETRIES:
                stop.wait(max(0.0, min(wait, deadline - time.monotonic())))
                wait *= 2
        raise self._gave_up(failed, tries, time.monotonic() - start, at)

    def _fetch(self, path: str, data: bytes | None, timeout: float, at: str) -> bytes:
        """The body of one answer; _NoAnswer when there is none, a ServerError on 4xx."""
        req = urllib.request.Request(self.url + path, data=data,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as answer:
                return answer.read()
        except urllib.error.HTTPError as exc:
            message = _message(exc)
            if exc.code >= 500 or exc.code in (408, 429):  # busy: worth another try
                raise _NoAnswer(f"HTTP {exc.code}: {message}") from None
            hint = (" (is --teacher-url the address of vLLM's server, http://HOST:PORT?)"
                    if exc.code == 404 else "")
            kept = "; fix that, then run the same command again: what was complete is kept" \
                if " for " in at else ""
            raise ServerError(f"the teacher server at {self.url} refused {at}: "
                              f"{message}{hint}{kept}") from None
        except http.client.IncompleteRead as exc:
            raise _NoAnswer(f"the answer was cut short after {len(exc.partial)} bytes") from None
        except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
            raise _NoAnswer(first_line(getattr(exc, "reason", None) or exc)) from None

    def _gave_up(self, failed: _Failed, tries: int, seconds: float, at: str) -> ServerError:
        again = "then run the same command again: what was complete is kept"
        if isinstance(failed, _BadAnswer):
            return ServerError(
                f"the teacher server at {self.url} answered {at} with {failed} ({tries} "
                f"tries): check that it is vLLM's server (`vllm serve`) serving --teacher "
                f"{self.name} as it should, {again}")
        return ServerError(
            f"the teacher server at {self.url} does not answer {at} ({failed}) after {tries} "
            f"tries in {seconds:.0f} s; start it (or check --teacher-url; for a busy server "
            f"raise --teacher-timeout, now {self.timeout:g} s), {again}")

    # ------------------------------------------------------------------ checks

    def _check_served(self) -> None:
        """The server serves the teacher by its name."""
        served = self._ask("/v1/models", None, _model_names)
        if self.name not in served:
            raise TipError(f"the server at {self.url} serves {', '.join(map(str, served))}, not "
                           f"--teacher {self.name}; pass the served model's name")

    def _check_tokenizer(self, tok, own: bool) -> None:
        """The server's tokenizer gives ``tok``'s ids on every probe string: the student's,
        or (``own``) the teacher's as read here from ``--teacher``."""
        for text in PROBES:
            ours = tok(text, add_special_tokens=False)["input_ids"]
            theirs = self._ask("/tokenize", {"model": self.name, "prompt": text,
                                             "add_special_tokens": False}, _token_ids)
            if theirs == ours:
                continue
            if own:
                raise TipError(f"the teacher served at {self.url} tokenizes {text!r} as "
                               f"{theirs}, the tokenizer of --teacher {self.name} here as "
                               f"{ours}: serve the model that --teacher names")
            raise TipError(f"the teacher served at {self.url} tokenizes {text!r} as {theirs}, "
                           f"the student as {ours}: the same vocabulary is needed unless tip "
                           "reads the teacher's tokenizer to align the two: pass --teacher as "
                           "the served model's path or hub id (--cross-tokenizer auto)")

    def _check_top_k(self) -> None:
        """The server allows ``top_k`` prompt log-probs (vLLM's --max-logprobs)."""
        if self.top_k == 0:
            return
        try:
            self._ask("/v1/completions", self._body([0, 0]), _an_object)
        except ServerError as exc:
            if "logprobs" not in str(exc) or "refused" not in str(exc):
                raise
            raise TipError(f"the teacher server at {self.url} returns fewer than "
                           f"--teacher-top-k {self.top_k} log-probs: start it with "
                           f"`vllm serve ... --max-logprobs {self.top_k}` (or lower "
                           "--teacher-top-k)") from None

    def close(self) -> None:
        """Nothing is held here: the server goes on serving."""

    # ------------------------------------------------------------------ scoring

    def _body(self, ids: list[int]) -> dict:
        return {"model": self.name, "prompt": ids, "max_tokens": 1, "temperature": 0,
                "prompt_logprobs": max(self.top_k, 1), "add_special_tokens": False}

    def score(self, sequences: list[tuple[list[int], list[int]]],
              names: list[str] | None = None) -> list[dict[str, torch.Tensor]]:
        """For each (prompt ids, response ids): ``teacher_logprob`` [P] of each response
        token, ``teacher_topk_ids`` [P, k] and ``teacher_topk_logprobs`` [P, k] (in the
        server's order, most likely first), from concurrent requests; ``names`` name the
        sequences in errors (default: sequence i)."""
        names = names or [f"sequence {i}" for i in range(len(sequences))]
        return in_threads(len(sequences), lambda i, stop: self._one(sequences[i], names[i],
                                                                    stop), self.concurrency)

    def _one(self, seq: tuple[list[int], list[int]], name: str,
             stop: threading.Event) -> dict[str, torch.Tensor]:
        prompt, response = seq
        return self._ask("/v1/completions", self._body([*prompt, *response]),
                         lambda answer: self._read(answer, prompt, response), name, stop)

    def _read(self, answer: Any, prompt: list[int], response: list[int]
              ) -> dict[str, torch.Tensor]:
        """The tensors of one answer, after checking it: one entry per position sent, and at
        each response position the sent token and at least the top-k ranked."""
        positions = _prompt_logprobs(answer)
        sent, k = len(prompt) + len(response), self.top_k
        if len(positions) != sent:
            raise _BadAnswer(f"log-probs for {len(positions)} positions where {sent} were sent")
        logprob_P, ids_Pk, logprobs_Pk = [], [], []
        for p, token in enumerate(response, len(prompt)):
            entries = self._entries(positions[p], p)
            if token not in entries:
                raise _BadAnswer(f"no log-prob of the sent token {token} at position {p}")
            ranked = sorted(entries.items(), key=lambda e: (e[1][1], -e[1][0]))
            top = sum(rank <= k for _, (_, rank) in ranked)
            if top < k:
                raise _BadAnswer(f"{top} ranked log-probs at position {p} where "
                                 f"--teacher-top-k {k} were asked")
            logprob_P.append(entries[token][0])
            ids_Pk.append([t for t, _ in ranked[:k]])
            logprobs_Pk.append([lp for _, (lp, _) in ranked[:k]])
        return {"teacher_logprob": torch.tensor(logprob_P, dtype=torch.float32),
                "teacher_topk_ids": torch.tensor(ids_Pk, dtype=torch.int32).reshape(-1, k),
                "teacher_topk_logprobs": torch.tensor(logprobs_Pk, dtype=torch.float32)
                .reshape(-1, k)}

    def _entries(self, at: Any, p: int) -> dict[int, tuple[float, int]]:
        """Position ``p``'s {token id: (log-prob, rank)}, each checked: an id of the
        student's vocabulary, a finite log-prob of at most 0 (within ``LOGPROB_SLACK``;
        stored at most 0), a rank of at least 1."""
        if not isinstance(at, dict):
            raise _BadAnswer(f"{_shown(at)} instead of log-probs at position {p}")
        out = {}
        for key, v in at.items():
            if not (key.isascii() and key.isdigit() and int(key) < self.vocab):
                raise _BadAnswer(f"token id {key!r} at position {p}, outside the student's "
                                 f"vocabulary of {self.vocab} ids")
            lp, rank = (v.get("logprob"), v.get("rank")) if isinstance(v, dict) else (None, None)
            if not _real(lp) or not math.isfinite(lp) or lp > LOGPROB_SLACK:
                raise _BadAnswer(f"log-prob {_shown(lp)} of token {key} at position {p} (a "
                                 "log-prob is finite and at most 0)")
            if type(rank) is not int or rank < 1:
                raise _BadAnswer(f"rank {_shown(rank)} of token {key} at position {p}")
            out[int(key)] = (min(float(lp), 0.0), rank)
        return out


def in_threads(n: int, job: Callable[[int, threading.Event], Any], concurrency: int) -> list:
    """``job(i, stop)`` for i < ``n``, ``concurrency`` at a time on daemon threads, the
    results in order. The first error is raised as it comes (so is Ctrl-C, which reaches the
    main thread while it waits); then ``stop`` is set, so no thread starts another request
    or try, and no thread is waited for: a hung request cannot hold the process."""
    stop, todo, done = threading.Event(), queue.SimpleQueue(), queue.SimpleQueue()
    for i in range(n):
        todo.put(i)

    def work() -> None:
        while not stop.is_set():
            try:
                i = todo.get_nowait()
            except queue.Empty:
                return
            try:
                done.put((i, job(i, stop), None))
            except BaseException as exc:  # handed to the main thread, raised there
                stop.set()
                done.put((i, None, exc))

    for _ in range(min(concurrency, n)):
        threading.Thread(target=work, daemon=True, name="tip-served-teacher").start()
    out: list = [None] * n
    try:
        for _ in range(n):
            i, result, exc = _next(done)
            if exc is not None:
                raise exc
            out[i] = result
    finally:
        stop.set()
    return out


def _next(done: queue.SimpleQueue):
    """The next finished job, waited for in short steps (the main thread stays free to
    take Ctrl-C)."""
    while True:
        try:
            return done.get(timeout=0.2)
        except queue.Empty:
            continue


# ---------------------------------------------------------------------- answers


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise _BadAnswer(f"what is not JSON (it starts {raw[:40]!r})") from None


def _an_object(answer: Any) -> dict:
    if not isinstance(answer, dict):
        raise _BadAnswer(f"{_shown(answer)} instead of a JSON object")
    return answer


def _model_names(answer: Any) -> list:
    data = _an_object(answer).get("data")
    if not isinstance(data, list) or not all(isinstance(m, dict) for m in data):
        raise _BadAnswer("no list of models under 'data'")
    return [m.get("id") for m in data]


def _token_ids(answer: Any) -> list[int]:
    tokens = _an_object(answer).get("tokens")
    if not isinstance(tokens, list) or not all(type(t) is int for t in tokens):
        raise _BadAnswer("no list of token ids under 'tokens'")
    return tokens


def _prompt_logprobs(answer: Any) -> list:
    choices = _an_object(answer).get("choices")
    first = choices[0] if isinstance(choices, list) and choices else None
    positions = first.get("prompt_logprobs") if isinstance(first, dict) else None
    if not isinstance(positions, list):
        raise _BadAnswer("no list under 'choices'[0]['prompt_logprobs']")
    return positions


def _real(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _shown(x: Any) -> str:
    """A JSON value in a message: at most 40 characters of it."""
    text = json.dumps(x)
    return text if len(text) <= 40 else text[:37] + "..."


def _message(exc: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(exc.read().decode())
        return first_line(body.get("message") or body.get("error", {}).get("message") or body)
    except (ValueError, AttributeError, OSError, http.client.HTTPException):
        return exc.reason or f"HTTP {exc.code}"
