"""A tiny scripted OpenAI completions server on 127.0.0.1 for unit tests.

It answers `POST /v1/completions` like an OpenAI-compatible server would, with
fixed next-token log-probs, and can be told to fail (`fail_with`: status codes
answered before succeeding, or `always_fail`), to be slow (`delay`), to return
no log-probs, or to shift echoed prompt log-probs by one position as
llama.cpp's server does. It records every request body and header, and the
largest number of requests it held at once.
"""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

# Next-token distribution of every prompt (part of it: the mass sums to < 1).
TOP = {" yes": -0.3, " no": -1.8, " 8": -3.0}
TOKEN = re.compile(r"\s?[^\s,]+|,")


class FakeOpenAI:
    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.fail_with: list[int] = []
        self.always_fail: int | None = None
        self.delay = 0.0
        self.no_logprobs = False
        self.shifted_echo = False
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    @property
    def api_base(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self) -> "FakeOpenAI":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # keep test output quiet
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake._lock:
                    fake.requests.append(body)
                    fake.headers.append(dict(self.headers))
                    fake.in_flight += 1
                    fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
                    status = fake.fail_with.pop(0) if fake.fail_with else fake.always_fail
                try:
                    time.sleep(fake.delay)
                    if status:
                        self._send(status, {"error": {"message": f"scripted {status}", "type": "server_error"}})
                    else:
                        self._send(200, fake.completion(body))
                finally:
                    with fake._lock:
                        fake.in_flight -= 1

            def _send(self, status: int, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler

    def completion(self, body: dict[str, Any]) -> dict[str, Any]:
        prompt = body["prompt"] if isinstance(body["prompt"], str) else body["prompt"][0]
        text = f"echo:{prompt[-12:]}"
        logprobs = None
        if body.get("logprobs") is not None and not self.no_logprobs:
            logprobs = self._echo(prompt) if body.get("echo") else self._next_token()
            if body.get("echo"):
                text = prompt + " 9"
        elif body.get("logprobs") is not None:
            logprobs = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        return {
            "id": "cmpl-fake",
            "object": "text_completion",
            "created": 0,
            "model": body.get("model", "fake"),
            "choices": [{"index": 0, "text": text, "finish_reason": "length", "logprobs": logprobs}],
            "usage": {"prompt_tokens": len(TOKEN.findall(prompt)), "completion_tokens": 2, "total_tokens": 0},
        }

    def _next_token(self) -> dict[str, Any]:
        return {"tokens": [" yes"], "token_logprobs": [TOP[" yes"]], "top_logprobs": [dict(TOP)], "text_offset": [0]}

    def _echo(self, prompt: str) -> dict[str, Any]:
        """A context-free model: each token after the first gets its value in
        TOP (-1.0 if unlisted); shifted, each gets its right neighbour's."""
        tokens = [*TOKEN.findall(prompt), " 9"]
        values: list[float | None] = [None] + [TOP.get(t, -1.0) for t in tokens[1:]]
        if self.shifted_echo:
            values = [None, *values[2:], -3.0]
        offsets, at = [], 0
        for token in tokens:
            at = prompt.find(token, at) if token != tokens[-1] else len(prompt)
            offsets.append(at)
            at += len(token)
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": None, "text_offset": offsets}
