"""scripts/stack.py: ``up`` on a running stack restarts its dead members, and the embedded
Redis keeps its messages across a crash (AOF). Real processes: a redis-server killed with
SIGKILL, a member process killed with its group, a small HTTP server answering /readyz."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from rev_tasks.queues import INFERENCE_CPU
from rev_tasks.testing.harness import ROOT, free_port, pid_alive, wait_redis


@pytest.fixture
def stack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    monkeypatch.setenv("REV_VAR_DIR", str(tmp_path / "var"))
    spec = importlib.util.spec_from_file_location("stack_under_test", ROOT / "scripts/stack.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    for name in module.ORDER:
        module.stop_service(name, timeout=5)


class _Ready(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        body = json.dumps({"status": "ready"}).encode()
        self.send_response(200 if self.path == "/readyz" else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: Any) -> None:
        pass


def _kill_group(pid: int) -> None:
    os.killpg(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pid_alive(pid)


def _pid(stack: ModuleType, name: str) -> int:
    return int((stack.RUN / f"{name}.pid").read_text())


def test_up_restarts_dead_members_and_redis_comes_back_with_its_queue(
    stack: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    import redis

    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    data = stack.VAR / "redis"
    data.mkdir(parents=True)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Ready)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    state = {"id": "t", "api": f"http://127.0.0.1:{server.server_port}", "env": {"REDIS_URL": url}}
    stack.STATE.write_text(json.dumps(state))
    try:
        stack.start("redis", stack.embedded_redis_argv(port, data), dict(os.environ))
        sleeper = [sys.executable, "-c", "import time; time.sleep(600)"]
        stack.start("worker-cpu", sleeper, {**os.environ, "REV_PROBE": "kept"})
        wait_redis(url)
        redis.Redis.from_url(url).lpush(INFERENCE_CPU, b"a queued message")
        time.sleep(1.5)  # appendfsync everysec: the write is on disk within a second
        first = {name: _pid(stack, name) for name in ("redis", "worker-cpu")}
        for pid in first.values():
            _kill_group(pid)
        assert stack.dead_members() == [
            ("redis", first["redis"]),
            ("worker-cpu", first["worker-cpu"]),
        ]

        assert stack.main(["up", "--timeout", "20"]) == 0
        out = capsys.readouterr().out
        assert f"redis (pid {first['redis']}) is not running; restarting it" in out
        assert "restarted redis, worker-cpu; waiting for /readyz" in out
        assert "already running" not in out
        again = {name: _pid(stack, name) for name in first}
        assert all(pid_alive(p) and p != first[n] for n, p in again.items()), again
        assert stack.dead_members() == []
        # The same port, the same data: the message survived the SIGKILL.
        assert redis.Redis.from_url(url).lrange(INFERENCE_CPU, 0, -1) == [b"a queued message"]
        environ = Path(f"/proc/{again['worker-cpu']}/environ").read_bytes().split(b"\0")
        assert b"REV_PROBE=kept" in environ
        assert oct((stack.RUN / "worker-cpu.json").stat().st_mode & 0o777) == "0o600"

        assert stack.main(["up", "--timeout", "20"]) == 0  # nothing dead: nothing started
        assert "a stack is already running" in capsys.readouterr().out
        assert {name: _pid(stack, name) for name in first} == again
    finally:
        server.shutdown()
