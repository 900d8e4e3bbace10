"""Real OpenAI-compatible servers for the litellm tests: llama.cpp's server
(`llama-cpp-python[server]`) serving the embedded SmolLM2 GGUF on 127.0.0.1;
and `SilentServer`, a socket that accepts connections and never answers (a
hung server, for timeouts).

`LlamaServer` starts one on a free port (or a given one, to restart it in
place), waits until `/v1/models` answers (bounded), and always stops it: the
context manager and the `llama_server` fixture terminate the process group,
killing it if it does not exit. Tests that need it are marked `server` and
skip when the package is not installed.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

log = logging.getLogger(__name__)

MODEL_ALIAS = "smollm2"
LITELLM_MODEL = f"openai/{MODEL_ALIAS}"  # litellm's OpenAI-compatible route
READY_TIMEOUT = 90.0

needs_server = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None,
    reason="llama-cpp-python[server] is not installed (pip install -e '.[server]')",
)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServer:
    """One llama.cpp server process on loopback."""

    def __init__(self, log_dir: Path, port: int | None = None, threads: int = 1) -> None:
        self.port = port or free_port()
        self.threads = threads
        self.log_path = log_dir / f"llama-server-{self.port}.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def api_base(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> "LlamaServer":
        from dlngraph.runtime.models import embedded_gguf_path

        command = [
            sys.executable, "-m", "llama_cpp.server",
            "--model", str(embedded_gguf_path()),
            "--model_alias", MODEL_ALIAS,
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--n_threads", str(self.threads),
            "--n_ctx", "2048",
        ]  # fmt: skip
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"llama.cpp server exited with {self.process.returncode}; see {self.log_path}")
            try:
                with urllib.request.urlopen(f"{self.api_base}/models", timeout=2) as reply:
                    if reply.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"llama.cpp server on port {self.port} not ready after {READY_TIMEOUT:.0f} s")

    def kill(self) -> None:
        """Stop at once (SIGKILL), as a crash would."""
        self._signal(signal.SIGKILL)

    def stop(self) -> None:
        self._signal(signal.SIGTERM)

    def _signal(self, sig: int) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, sig)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def __enter__(self) -> "LlamaServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def llama_servers(log_dir: Path, count: int = 1, threads: int = 1) -> Iterator[list[LlamaServer]]:
    """`count` servers, all stopped on exit however the block ends."""
    servers: list[LlamaServer] = []
    try:
        for _ in range(count):
            servers.append(LlamaServer(log_dir, threads=threads).start())
        yield servers
    finally:
        for server in servers:
            server.stop()


class SilentServer:
    """Accepts TCP connections on 127.0.0.1 and never sends a byte; `connections`
    holds every one it accepted (closed on exit)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=256)
        self.connections: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)

    @property
    def api_base(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:  # closed: the caller is done
                return
            self.connections.append(conn)

    def __enter__(self) -> "SilentServer":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()
        for conn in self.connections:
            conn.close()
