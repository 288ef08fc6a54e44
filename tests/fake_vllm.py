"""A stand-in for vLLM's OpenAI-compatible server, on 127.0.0.1, for the served-teacher
tests of the main suite (the real server's tests run under `make test-vllm`).

It answers the three endpoints tip uses as vLLM does: ``GET /v1/models``, ``POST
/tokenize`` and ``POST /v1/completions`` with ``prompt_logprobs`` (the top-k of every
prompt position, ranked, plus the prompt's own token), computed from a transformers model
in float64. ``max_logprobs`` refuses larger requests with vLLM's message; ``fail_next``
answers that many requests with HTTP 503; ``stop_after`` closes the server after that many
completions, as a server that dies mid-run.

``misbehave`` (one of ``MISBEHAVIOURS``) spoils every completion after the first ``good``
(counted from the server's start, the top-k probe included), as a broken or wrong server
would: NaN or +inf log-probs, malformed JSON, HTML (every request, the start-up checks
too, as a plain web server), fewer ranked entries than asked, 3 positions fewer or one
more (a BOS put in front) than sent, a ranked id past the vocabulary, the connection
closed mid-body, or no answer at all (a hung server; ``hung`` counts the requests held,
released at ``close``). Set ``misbehave = None`` and the server is fixed.
"""

from __future__ import annotations

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

MISBEHAVIOURS = ("nan", "inf", "bad-json", "html", "fewer-top-k", "fewer-positions",
                 "more-positions", "out-of-vocab", "close-mid-body", "hang")


class FakeVLLM:
    def __init__(self, model, tok, name: str = "teacher", max_logprobs: int = 20,
                 vocab: int | None = None, port: int = 0):
        self.model, self.tok, self.name = model.double().eval(), tok, name
        self.max_logprobs, self.vocab = max_logprobs, vocab or len(tok)
        self.fail_next, self.stop_after, self.completions = 0, None, 0
        self.misbehave: str | None = None
        self.good, self.hung, self.release = 0, 0, threading.Event()
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", port), self._handler())
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()

    def logprobs(self, ids: list[int], k: int) -> list:
        with torch.no_grad():
            logits = self.model(torch.tensor([ids])).logits[0, :, :self.vocab]
        lp = torch.log_softmax(logits, -1)
        out: list = [None]
        for i in range(1, len(ids)):
            row = lp[i - 1]
            order = torch.argsort(row, descending=True)
            rank = {int(t): r + 1 for r, t in enumerate(order.tolist())}
            keep = [int(t) for t in order[:k]] + [ids[i]]
            out.append({str(t): {"logprob": float(row[t]), "rank": rank[t],
                                 "decoded_token": self.tok.decode([t])} for t in keep})
        return out

    def spoil(self, out: list, k: int, sent: int) -> list:
        """``out`` (prompt log-probs as ``logprobs`` gives them, the last position's token
        ``sent``) as ``misbehave`` spoils it."""
        last = out[-1]
        other = next(t for t, v in last.items() if v["rank"] <= k and t != str(sent))
        if self.misbehave in ("nan", "inf"):
            next(iter(last.values()))["logprob"] = math.nan if self.misbehave == "nan" else math.inf
        elif self.misbehave == "fewer-top-k":  # one of the top-k left out
            out[-1] = {t: v for t, v in last.items() if t != other}
        elif self.misbehave == "fewer-positions":
            out = out[:-3]
        elif self.misbehave == "more-positions":
            out = [None, *out]
        elif self.misbehave == "out-of-vocab":
            out[-1] = {**{t: v for t, v in last.items() if t != other},
                       str(self.vocab + 5): last[other]}
        return out

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _send(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _html(self) -> None:
                data = b"<html><body><h1>It works!</h1></body></html>"
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _spoilt(self, body: dict, k: int) -> None:
                """A completion as ``fake.misbehave`` answers it."""
                kind = fake.misbehave
                if kind == "hang":
                    with fake.lock:
                        fake.hung += 1
                    fake.release.wait(60)
                    self.close_connection = True
                    return
                if kind in ("bad-json", "close-mid-body"):
                    data = json.dumps({"choices": [{"index": 0, "text": "", "prompt_logprobs":
                                                    fake.logprobs(body["prompt"], k)}]}).encode()
                    sent = data[:len(data) // 2] if kind == "bad-json" else data  # torn JSON
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(sent) if kind == "bad-json"
                                                           else len(data) * 2))  # or cut short
                    self.end_headers()
                    self.wfile.write(sent)
                    self.close_connection = True
                    return
                out = fake.spoil(fake.logprobs(body["prompt"], k), k, body["prompt"][-1])
                self._send(200, {"choices": [{"index": 0, "text": "", "prompt_logprobs": out}]})

            def do_GET(self):
                if fake.misbehave == "html":
                    self._html()
                elif self.path == "/v1/models":
                    self._send(200, {"data": [{"id": fake.name}]})
                else:
                    self._send(404, {"message": "not found"})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if fake.misbehave == "html":
                    self._html()
                    return
                with fake.lock:
                    if fake.fail_next > 0:
                        fake.fail_next -= 1
                        self._send(503, {"message": "busy"})
                        return
                if self.path == "/tokenize":
                    ids = fake.tok(body["prompt"], add_special_tokens=body.get(
                        "add_special_tokens", True))["input_ids"]
                    self._send(200, {"tokens": ids, "count": len(ids)})
                    return
                k = body.get("prompt_logprobs") or 0
                if k > fake.max_logprobs:
                    self._send(400, {"error": {"message": f"Requested prompt logprobs of {k}, "
                                                          "which is greater than max allowed: "
                                                          f"{fake.max_logprobs}"}})
                    return
                with fake.lock:
                    fake.completions += 1
                    dying = fake.stop_after is not None and fake.completions > fake.stop_after
                    spoilt = fake.misbehave is not None and fake.completions > fake.good
                if dying:
                    self.close_connection = True
                    threading.Thread(target=fake.close, daemon=True).start()
                    return
                if spoilt:
                    self._spoilt(body, k)
                    return
                self._send(200, {"choices": [{"index": 0, "text": "",
                                              "prompt_logprobs": fake.logprobs(
                                                  body["prompt"], k)}]})

        return Handler
