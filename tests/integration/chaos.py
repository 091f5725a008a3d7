"""Real faults for the chaos tests: a restartable redis-server with AOF, and a TCP proxy.

Nothing here is a mock. :class:`RedisServer` is a real ``redis-server`` process with
``appendonly yes`` + ``appendfsync always`` in a temporary folder, killed with SIGKILL and
started again on the same port and data. :class:`TcpProxy` forwards a local port to
PostgreSQL; ``stop()`` closes the listening socket and every open connection (clients see
"connection refused" and reset connections, exactly as during a database outage), and
``start()`` listens again on the same port.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import threading
import time
from pathlib import Path

from rev_tasks.testing.harness import GroupProcess, free_port, redis_server_binary, wait_redis


class RedisServer:
    """A private redis-server with an append-only file fsynced on every write."""

    def __init__(self, data_dir: Path, port: int) -> None:
        self.data_dir = data_dir
        self.port = port
        self.proc: GroupProcess | None = None
        self.url = f"redis://127.0.0.1:{port}/0"
        self.restarts = 0

    def start(self, timeout: float = 20.0) -> RedisServer:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        argv = [
            redis_server_binary(system_first=True), "--port", str(self.port),
            "--bind", "127.0.0.1", "--dir", str(self.data_dir), "--appendonly", "yes",
            "--appendfsync", "always", "--save", "", "--daemonize", "no", "--protected-mode", "no",
        ]  # fmt: skip
        log = self.data_dir / "redis.log"
        self.proc = GroupProcess("redis", argv, os.environ, log, cwd=self.data_dir, append=True)
        wait_redis(self.url, timeout, self.proc)
        return self

    def kill(self) -> None:
        """A crash: SIGKILL, no shutdown save (the AOF already holds every write)."""
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
