"""The local model server every system talks to, and the proxy that counts.

Every system sends its requests to a small proxy on 127.0.0.1 that forwards them
unchanged to one llama.cpp OpenAI-compatible server and adds up, per request,
the `usage` the server reports. Calls and tokens are therefore measured the same
way for every system, whatever its own accounting says.

The one thing it changes: llama-cpp-python's server ignores OpenAI's newer
`max_completion_tokens` (what litellm and DSPy send) and would generate to the
end of the context, so the proxy copies it into `max_tokens` when that is absent.
"""

from __future__ import annotations

import http.client
import json
import logging
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

log = logging.getLogger(__name__)


@dataclass
class Usage:
    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    errors: int = 0

    def add(self, body: bytes, status: int) -> None:
        self.calls += 1
        if status >= 400:
            self.errors += 1
            return
        try:
            usage = json.loads(body).get("usage") or {}
        except (ValueError, AttributeError):
            return
        self.prompt_tokens += int(usage.get("prompt_tokens") or 0)
        self.completion_tokens += int(usage.get("completion_tokens") or 0)


def with_max_tokens(body: bytes) -> bytes:
    try:
        request = json.loads(body)
    except ValueError:
        return body
    if not isinstance(request, dict) or "max_completion_tokens" not in request or "max_tokens" in request:
        return body
    return json.dumps({**request, "max_tokens": request["max_completion_tokens"]}).encode()


class CountingProxy:
    """Forwards POST/GET to `upstream` and counts model calls (POSTs) and tokens."""

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self._host, self._port = parts.hostname or "127.0.0.1", parts.port or 80
        self._lock = threading.Lock()
        self.usage = Usage()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> "CountingProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def take(self) -> Usage:
        """The usage since the last take, and a fresh counter."""
        with self._lock:
            usage, self.usage = self.usage, Usage()
        return usage

    def _forward(self, method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[int, list, bytes]:
        conn = http.client.HTTPConnection(self._host, self._port, timeout=600)
        try:
            conn.request(method, path, body=body or None, headers=headers)
            response = conn.getresponse()
            return response.status, response.getheaders(), response.read()
        finally:
            conn.close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _relay(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = with_max_tokens(self.rfile.read(length) if length else b"")
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("host", "connection", "content-length")}
                status, response_headers, payload = proxy._forward(self.command, self.path, headers, body)
                if self.command == "POST":
                    with proxy._lock:
                        proxy.usage.add(payload, status)
                self.send_response(status)
                for key, value in response_headers:
                    if key.lower() not in ("content-length", "transfer-encoding", "connection"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                try:
                    self.wfile.write(payload)
                except BrokenPipeError:  # the client gave up (timeout); the server's work is still counted
                    log.warning("proxy: client left before the reply to %s", self.path)

            do_GET = do_POST = _relay

            def log_message(self, format: str, *args: object) -> None:
                log.debug("proxy: " + format, *args)

        return Handler
