"""A teacher on its own serving engine: vLLM's OpenAI-compatible server (``--teacher-url``).

    vllm serve T --max-logprobs 64 --port 8000          # the teacher, on its own GPUs
    tip score runs/rollout --teacher T --teacher-url http://HOST:8000 -o runs/score

For each response one request to the server's completions endpoint: the prompt and the
response as token ids, ``max_tokens`` 1, ``prompt_logprobs`` = ``--teacher-top-k``. The
answer gives, at every response position, the teacher's log-prob of the sampled token and
its top-k ids and log-probs: exact. The student runs here, exactly as ever; what needs
the teacher's whole distribution becomes a stated estimate (``tipcli.stats.served_stats``):
the divergences over the top-k and one tail bucket (as the ``*-topk`` losses), and no
teacher entropy at all. The score manifest says which statistic is which.

Requests go out ``--teacher-concurrency`` at a time, with retries and backoff on
connection errors and 5xx answers. Before any scoring the server is checked: reachable,
serving ``--teacher``, tokenizing as the student does (its ``/tokenize`` endpoint on
probe strings), and allowing ``--teacher-top-k`` prompt log-probs (vLLM's
``--max-logprobs``). Only JSON crosses the wire.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import torch

from tipcli.errors import TipError, first_line

RETRIES = 5            # tries of one request on connection errors and 5xx answers
BACKOFF_SECONDS = 0.5  # doubled after each failed try
TIMEOUT_SECONDS = 600  # one request's answer (a long prompt on a busy server)
PROBES = ("Hello, world!", "  two spaces, tabs\tand\nnew lines", "naïve café 東京 🙂",
          "def f(x):\n    return x ** 2  # 42")


class ServerError(TipError):
    """The server did not answer (after retries), or answered an error."""


class ServedTeacher:
    """The teacher named ``name`` on the vLLM server at ``url``, checked against the
    student's tokenizer ``tok`` and the top-k it must return."""

    def __init__(self, url: str, name: str, tok, top_k: int, concurrency: int = 8):
        self.url, self.name, self.top_k = url.rstrip("/"), name, top_k
        self.concurrency = concurrency
        served = [m.get("id") for m in self._get("/v1/models").get("data", [])]
        if name not in served:
            raise TipError(f"the server at {self.url} serves {', '.join(map(str, served))}, not "
                           f"--teacher {name}; pass the served model's name")
        self._check_tokenizer(tok)
        self._check_top_k()

    # ------------------------------------------------------------------ HTTP

    def _request(self, path: str, body: dict | None = None) -> dict:
        """One request (a POST of ``body`` as JSON, or a GET), retried with backoff on
        connection errors and 5xx answers; a 4xx answer is returned as a ServerError
        holding the server's message."""
        data = None if body is None else json.dumps(body).encode()
        wait, last = BACKOFF_SECONDS, ""
        for attempt in range(RETRIES):
            req = urllib.request.Request(self.url + path, data=data,
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=TIMEOUT_SECONDS) as answer:
                    return json.loads(answer.read().decode())
            except urllib.error.HTTPError as exc:
                message = _message(exc)
                if exc.code < 500:
                    raise ServerError(f"the teacher server at {self.url} refused {path}: "
                                      f"{message}") from None
                last = f"HTTP {exc.code}: {message}"
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as exc:
                last = first_line(getattr(exc, "reason", exc))
            if attempt + 1 < RETRIES:
                time.sleep(wait)
                wait *= 2
        raise ServerError(f"the teacher server at {self.url} does not answer ({last}) after "
                          f"{RETRIES} tries; start it (or check --teacher-url), then run the "
                          "same command again: what was complete is kept")

    def _get(self, path: str) -> dict:
        return self._request(path)

    # ------------------------------------------------------------------ checks

    def _check_tokenizer(self, tok) -> None:
        """The server's tokenizer gives the student's ids on every probe string."""
        for text in PROBES:
            ours = tok(text, add_special_tokens=False)["input_ids"]
            theirs = self._request("/tokenize", {"model": self.name, "prompt": text,
                                                 "add_special_tokens": False}).get("tokens")
            if theirs != ours:
                raise TipError(f"the teacher served at {self.url} tokenizes {text!r} as "
                               f"{theirs}, the student as {ours}: distillation needs the same "
                               "vocabulary (serve a teacher of the student's family)")

    def _check_top_k(self) -> None:
        """The server allows ``top_k`` prompt log-probs (vLLM's --max-logprobs)."""
        if self.top_k == 0:
            return
        try:
            self._request("/v1/completions", self._body([0, 0]))
        except ServerError as exc:
            if "logprobs" not in str(exc):
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

    def score(self, sequences: list[tuple[list[int], list[int]]]
              ) -> list[dict[str, torch.Tensor]]:
        """For each (prompt ids, response ids): ``teacher_logprob`` [m] of each response
        token, ``teacher_topk_ids`` [m, k] and ``teacher_topk_logprobs`` [m, k] (in the
        server's order, most likely first), from concurrent requests."""
        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(self._one, sequences))

    def _one(self, seq: tuple[list[int], list[int]]) -> dict[str, torch.Tensor]:
        prompt, response = seq
        answer = self._request("/v1/completions", self._body([*prompt, *response]))
        positions = answer["choices"][0]["prompt_logprobs"][len(prompt):]
        sampled, ids, values = [], [], []
        for token, at in zip(response, positions):
            entries = {int(t): v for t, v in at.items()}
            sampled.append(entries[token]["logprob"])
            best = sorted(entries.items(), key=lambda kv: kv[1]["rank"])[:self.top_k]
            ids.append([t for t, _ in best])
            values.append([v["logprob"] for _, v in best])
        k = self.top_k
        return {"teacher_logprob": torch.tensor(sampled, dtype=torch.float32),
                "teacher_topk_ids": torch.tensor(ids, dtype=torch.int32).reshape(-1, k),
                "teacher_topk_logprobs": torch.tensor(values, dtype=torch.float32)
                .reshape(-1, k)}


def _message(exc: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(exc.read().decode())
        return first_line(body.get("message") or body.get("error", {}).get("message") or body)
    except (ValueError, AttributeError, OSError):
        return exc.reason or f"HTTP {exc.code}"
