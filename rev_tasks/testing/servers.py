"""Real OpenAI-compatible servers on loopback for tests and benchmarks: llama.cpp's
``python -m llama_cpp.server`` serving a GGUF file, started on a free port and waited for."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx


class ServerUnavailable(RuntimeError):
    """llama-cpp-python[server] is not installed (scripts/llama_wheel.sh installs it)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LlamaServer:
    gguf: Path
    alias: str
    port: int
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log_tail(self, n: int = 2000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""


def have_llama_server() -> str | None:
    """None when the server can run here, else why not."""
    try:
        import llama_cpp.server.app  # noqa: F401
    except Exception as exc:  # ImportError, or a broken build's OSError
        return f"llama-cpp-python[server] is not usable: {exc} (run scripts/llama_wheel.sh)"
    return None


def start_llama_server(
    gguf: str | Path,
    *,
    alias: str = "smollm2",
    n_ctx: int = 256,
    threads: int = 1,
    logprobs: bool = True,
    log_dir: str | Path | None = None,
    timeout_s: float = 120.0,
) -> LlamaServer:
    """Start ``python -m llama_cpp.server`` and return once ``/v1/models`` answers.

    ``logprobs=False`` starts it with ``--logits_all false``: a real server that generates
    text but cannot return log-probabilities (text mode's endpoint).
    """
    why = have_llama_server()
    if why:
        raise ServerUnavailable(why)
    port = free_port()
    log_dir = Path(log_dir or os.environ.get("TMPDIR", "/tmp"))
    log = log_dir / f"llama-server-{alias}-{port}.log"
    cmd = [
        sys.executable, "-m", "llama_cpp.server",
        "--model", str(gguf), "--model_alias", alias,
        "--host", "127.0.0.1", "--port", str(port),
        "--n_ctx", str(n_ctx), "--n_batch", str(n_ctx),
        "--n_threads", str(threads), "--n_threads_batch", str(threads),
        "--logits_all", "true" if logprobs else "false",
        "--cache", "false", "--verbose", "false",
    ]  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    server = LlamaServer(Path(gguf), alias, port, proc, log)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"llama_cpp.server exited with {proc.returncode}: {server.log_tail()}"
            )
        try:
            if httpx.get(f"{server.url}/models", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    server.stop()
    raise RuntimeError(f"llama_cpp.server not ready after {timeout_s:.0f}s: {server.log_tail()}")
