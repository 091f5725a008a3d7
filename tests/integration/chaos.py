"""Real faults for the chaos and watchdog tests: a restartable redis-server, a TCP proxy, and
the checks both run on the jobs that lived through them.

Nothing here is a mock. :class:`RedisServer` is a real ``redis-server`` process with
``appendonly yes`` + ``appendfsync always`` in a temporary folder (or, ``appendonly=False``,
no persistence at all: it comes back empty), killed with SIGKILL and started again on the
same port and data. :class:`TcpProxy` forwards a local port to
PostgreSQL; ``stop()`` closes the listening socket and every open connection (clients see
"connection refused" and reset connections, exactly as during a database outage), and
``start()`` listens again on the same port.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import socket
import threading
import time
from pathlib import Path
from typing import Any

from rev_tasks.testing.harness import GroupProcess, free_port, redis_server_binary, wait_redis


class RedisServer:
    """A private redis-server with an append-only file fsynced on every write (or none)."""

    def __init__(self, data_dir: Path, port: int, appendonly: bool = True) -> None:
        self.data_dir = data_dir
        self.port = port
        self.appendonly = appendonly
        self.proc: GroupProcess | None = None
        self.url = f"redis://127.0.0.1:{port}/0"
        self.restarts = 0

    def start(self, timeout: float = 20.0) -> RedisServer:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        argv = [
            redis_server_binary(system_first=True), "--port", str(self.port),
            "--bind", "127.0.0.1", "--dir", str(self.data_dir),
            "--appendonly", "yes" if self.appendonly else "no", "--appendfsync", "always", "--save", "", "--daemonize", "no", "--protected-mode", "no",
        ]  # fmt: skip
        log = self.data_dir / "redis.log"
        self.proc = GroupProcess("redis", argv, os.environ, log, cwd=self.data_dir, append=True)
        wait_redis(self.url, timeout, self.proc)
        return self

    def kill(self) -> None:
        """A crash: SIGKILL, no shutdown save (the AOF, if any, already holds every write)."""
        if self.proc is not None:
            self.proc.kill()
            self.proc = None

    def restart(self, down_for: float = 2.0) -> None:
        self.kill()
        time.sleep(down_for)
        self.start()
        self.restarts += 1

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop(10)
            self.proc = None


class TcpProxy:
    """Forward ``127.0.0.1:port`` to ``target``; ``stop()``/``start()`` cut and restore it."""

    def __init__(self, target_host: str, target_port: int, port: int | None = None) -> None:
        self.target = (target_host, target_port)
        self.port = port or free_port()
        self._listener: socket.socket | None = None
        self._stop = threading.Event()
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self.connections = 0

    def start(self) -> TcpProxy:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        self._stop = threading.Event()
        thread = threading.Thread(target=self._accept, args=(listener, self._stop), daemon=True)
        thread.start()
        self._threads.append(thread)
        return self

    def stop(self) -> None:
        """Refuse new connections and reset every open one (the database "goes away")."""
        self._stop.set()
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.close()
            self._listener = None
        with self._lock:
            conns, self._conns = list(self._conns), set()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                conn.close()
        for thread in self._threads:
            thread.join(timeout=2)
        self._threads = []

    def _accept(self, listener: socket.socket, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                ready, _, _ = select.select([listener], [], [], 0.1)
            except (OSError, ValueError):
                return
            if not ready:
                continue
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                if stop.is_set():
                    client.close()
                    upstream.close()
                    return
                self._conns.update((client, upstream))
                self.connections += 1
            for a, b in ((client, upstream), (upstream, client)):
                t = threading.Thread(target=self._pump, args=(a, b), daemon=True)
                t.start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            with self._lock:
                self._conns.discard(src)
                self._conns.discard(dst)
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.close()


# ----------------------------------------------------------------------------- the jobs
def bodies(model_dirs: dict[str, Path], n: int) -> list[tuple[dict[str, Any], str]]:
    """Alternating SAME (a vs its byte copy) and DIFFERENT (a vs b) jobs, 2 challenges/batch."""
    out = []
    for i in range(n):
        candidate, expected = (("gpt2-a-copy", "SAME"), ("gpt2-b", "DIFFERENT"))[i % 2]
        body = {
            "kind": "verify",
            "reference": {"path": str(model_dirs["gpt2-a"])},
            "candidate": {"path": str(model_dirs[candidate])},
            "device": "cpu",
            "batch_size": 2,
        }
        out.append((body, expected))
    return out


def rows(job_ids: list[str]) -> dict[str, tuple[str, str, int]]:
    """(status, stage, challenges done) of each job, straight from the database."""
    from sqlalchemy import select

    from rev_tasks.db.session import session_scope
    from rev_tasks.db.tables import Job

    with session_scope() as s:
        found = s.execute(
            select(Job.id, Job.status, Job.stage, Job.challenges_done).where(Job.id.in_(job_ids))
        )
        return {r[0]: (r[1], r[2], r[3]) for r in found}


def votes(job_id: str) -> list[int]:
    """The validators that voted on the job (one row each)."""
    from sqlalchemy import select

    from rev_tasks.db.session import session_scope
    from rev_tasks.db.tables import Vote

    with session_scope() as s:
        return list(s.scalars(select(Vote.validator).where(Vote.job_id == job_id)))


def check_outcomes(
    client: Any, expected: dict[str, str], stable: Any, timeout: float = 240.0
) -> dict[str, dict[str, Any]]:
    """Every job succeeded once, with the right verdict and exactly five distinct votes."""
    from tests.integration.farm import wait_job

    docs = {job_id: wait_job(client, job_id, timeout=timeout) for job_id in expected}
    for job_id, doc in docs.items():
        assert doc["status"] == "succeeded", doc
        assert doc["result"]["verdict"] == expected[job_id], doc["result"]
        consensus = doc["result"]["consensus"]
        assert consensus["agreed"] and consensus["agreeing"] == 5, consensus
        cast = votes(job_id)
        assert sorted(cast) == [0, 1, 2, 3, 4], cast  # no duplicate, none missing
    # Finished exactly once: one tally per job changed it, any other delivery was skipped.
    log = stable.log_tail(10_000_000)
    for job_id in expected:
        published = re.findall(rf"\{{'job_id': '{job_id}', 'status': '(\w+)'", log)
        assert published == ["succeeded"], (job_id, published)
    return docs


def wait_mid_inference(job_ids: list[str], timeout: float = 120.0) -> str:
    """The first job seen between batches of its inference (at least 2 challenges done)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for job_id, (status, stage, progress) in rows(job_ids).items():
            if status == "running" and stage == "inference" and progress >= 2:
                return job_id
        time.sleep(0.05)
    raise AssertionError("no job reached the middle of its inference")


class Submitted:
    """The jobs one fault module submitted, so that its teardown can fail what it left.

    A failed fault test can leave jobs queued or running; the modules that follow share the
    database and the broker, and must not find them.
    """

    def __init__(self, who: str) -> None:
        self.who = who
        self.ids: list[str] = []

    def submit(self, client: Any, body: dict[str, Any]) -> str:
        from tests.integration.farm import submit

        job_id = submit(client, body)
        self.ids.append(job_id)
        return job_id

    def fail_unfinished(self) -> None:
        from rev_tasks import jobs
        from rev_tasks.db.session import session_scope

        with session_scope() as s:
            for job_id in self.ids:
                jobs.fail(s, job_id, "test_cleanup", f"left unfinished by a failed {self.who} test")
