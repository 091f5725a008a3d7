"""A gunicorn worker that slow clients cannot stop: ``worker_class = "web.serving.BoundedThreadWorker"``.

gunicorn's threaded worker (``gthread``) hands every accepted connection to a pool thread,
which then blocks reading the request line and headers. A client that sends one byte and
stalls (a "slowloris") holds that thread: a handful of them took every thread of every
worker and ``/healthz`` timed out. A POST that promises more body than it sends held a
thread the same way until the client gave up.

This worker changes two things and keeps the rest of gthread (keep-alive polling, graceful
stop, the thread pool):

* **Requests are read by the main loop, not by a thread.** A new (or kept-alive)
  connection stays on the selector until its whole header block (``\\r\\n\\r\\n``) has
  arrived, in non-blocking reads, and then, for a ``Content-Length`` body of at most
  ``REV_MAX_BUFFERED_BODY`` bytes (default ``REV_MAX_BODY_BYTES``), until the body has
  too; only then does a thread take it, with those bytes handed to gunicorn's parser.
  Headers not complete within ``REV_HEADER_TIMEOUT`` seconds, or a body not complete
  within ``REV_BODY_TIMEOUT`` after them, are answered ``408`` and closed; a header block
  larger than ``REV_MAX_HEADER_BYTES`` gets ``431``. At most ``REV_MAX_HEADER_CONNS``
  connections per worker may be waiting so: past that the oldest one is dropped, so a
  flood of idle connections cannot make the worker stop accepting.
* **Every socket read of a thread has a deadline.** Chunked bodies, ``Expect:
  100-continue`` and bodies too large to buffer are read by the thread: from the moment it
  takes the request, all of its reads must finish within ``REV_BODY_TIMEOUT`` seconds; a
  read past it raises ``TimeoutError``, which the app answers ``408`` (see
  :mod:`web.errors`) and the connection is closed. Each send has the same bound.

TLS and HTTP/2 prior knowledge need the socket before any byte can be read as HTTP, so
those connections take gthread's own path (the deployment terminates TLS at the proxy).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import selectors
import socket
import time
from collections import OrderedDict
from functools import partial
from typing import Any

from gunicorn.http2 import negotiation
from gunicorn.workers.gthread import TConn, ThreadWorker

HEADER_END = b"\r\n\r\n"


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    return float(raw) if raw else default


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    return int(raw) if raw else default


def raw_error(status: int, reason: str, code: str, message: str) -> bytes:
    """A complete HTTP/1.1 error response in the API's JSON shape, with ``Connection: close``."""
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n"
        "Cache-Control: no-store\r\n"
        "X-Content-Type-Options: nosniff\r\n\r\n"
    )
    return head.encode() + body


class DeadlineSocket:
    """The socket as gunicorn's parser sees it: each ``recv`` waits at most until ``deadline``.

    The parser sets its own timeouts (body drains); the shorter of that and the deadline
    wins. Everything else is the real socket's.
    """

    def __init__(self, sock: socket.socket, io_timeout: float) -> None:
        self._sock = sock
        self._io_timeout = io_timeout
        self._timeout: float | None = None
        self.deadline = time.monotonic() + io_timeout

    def recv(self, size: int) -> bytes:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("request read deadline passed")
        wait = remaining if self._timeout is None else min(remaining, self._timeout)
        self._sock.settimeout(wait)
        try:
            return self._sock.recv(size)
        finally:
            self._sock.settimeout(self._io_timeout)  # sends keep the plain I/O bound

    def settimeout(self, value: float | None) -> None:
        self._timeout = value

    def gettimeout(self) -> float | None:
        return self._timeout

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class BoundedThreadWorker(ThreadWorker):
    """gthread with header reading on the selector and a deadline on every thread's read."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout = _env_float("REV_HEADER_TIMEOUT", 10.0)
        self.body_timeout = _env_float("REV_BODY_TIMEOUT", 20.0)
        self.max_header_bytes = _env_int("REV_MAX_HEADER_BYTES", 64 * 1024)
        self.max_buffered_body = _env_int(
            "REV_MAX_BUFFERED_BODY", _env_int("REV_MAX_BODY_BYTES", 1 << 20)
        )
        self.max_header_conns = _env_int(
            "REV_MAX_HEADER_CONNS", max(1, self.cfg.worker_connections // 2)
        )
        # conn -> deadline of its header block (or body), in the order they arrived
        self.reading: OrderedDict[TConn, float] = OrderedDict()

    # -------------------------------------------------------------- header phase (main loop)
    def _plain(self, conn: TConn) -> bool:
        """Whether the main loop may read this connection's bytes as HTTP/1."""
        return not self.cfg.is_ssl and not negotiation.prior_knowledge_allowed(
            self.cfg, conn.client
        )

    def accept(self, listener: socket.socket) -> None:
        try:
            client_sock, client_addr = listener.accept()
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return
        self.nr_conns += 1
        conn = TConn(self.cfg, client_sock, client_addr, listener.getsockname())
        if not self._plain(conn):
            client_sock.setblocking(True)
            self.enqueue_req(conn)
            return
        self._start_reading(conn)

    def _start_reading(self, conn: TConn) -> None:
        while len(self.reading) >= self.max_header_conns:  # bounded: drop the slowest
            oldest = next(iter(self.reading))
            self._drop(oldest, None)
        conn.rev_head = bytearray()
        conn.rev_need = None
        conn.sock.setblocking(False)
        self.reading[conn] = time.monotonic() + self.header_timeout
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_readable, conn))

    def _on_readable(self, conn: TConn, _client: Any) -> None:
        try:
            data = conn.sock.recv(16384)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # the client went away
            self._drop(conn, None)
            return
        head: bytearray = conn.rev_head
        seen = max(0, len(head) - len(HEADER_END) + 1)  # already searched: a drip stays linear
        head += data
        need = getattr(conn, "rev_need", None)
        if need is None:
            end = head.find(HEADER_END, seen)
            if end >= 0:
                body = self._body_to_buffer(bytes(head[:end]))
                need = conn.rev_need = end + len(HEADER_END) + body
                if body:  # the body is read here too, within its own deadline
                    self.reading[conn] = time.monotonic() + self.body_timeout
                    self.reading.move_to_end(conn)
            elif head.startswith(b"PRI * HTTP/2"):
                need = conn.rev_need = 0
            elif len(head) > self.max_header_bytes:
                self._drop(
                    conn,
                    raw_error(
                        431,
                        "Request Header Fields Too Large",
                        "headers_too_large",
                        f"request headers are larger than {self.max_header_bytes} bytes",
                    ),
                )
                return
        if need is not None and len(head) >= need:
            self.poller.unregister(conn.sock)
            del self.reading[conn]
            conn.rev_head = None
            conn.rev_need = None
            conn.rev_pending = bytes(head)
            conn.data_ready = True
            self.enqueue_req(conn)

    def _body_to_buffer(self, head: bytes) -> int:
        """How many body bytes to wait for on the selector: a plain ``Content-Length`` body
        up to ``REV_MAX_BUFFERED_BODY``; 0 (hand over at once) for chunked bodies, ``Expect:
        100-continue`` (the client waits for the server), larger or ambiguous lengths, which
        the parser and the app refuse or read under the thread's deadline."""
        length = None
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name in (b"transfer-encoding", b"expect"):
                return 0
            if name == b"content-length":
                value = value.strip()
                if length is not None or not value.isdigit():
                    return 0
                length = int(value)
        if length is None or length > self.max_buffered_body:
            return 0
        return length

    def _drop(self, conn: TConn, answer: bytes | None) -> None:
        """Stop reading ``conn``: best-effort ``answer`` (never blocking), then close."""
        self.reading.pop(conn, None)
        with contextlib.suppress(KeyError, ValueError, OSError):
            self.poller.unregister(conn.sock)
        if answer and getattr(conn, "rev_head", None):  # a client that sent nothing gets no 408
            with contextlib.suppress(OSError):
                conn.sock.send(answer)
        self.nr_conns -= 1
        conn.close()

    def murder_keepalived(self, force: bool = False) -> None:
        super().murder_keepalived(force)
        now = time.monotonic()
        # Not sorted by deadline (a body's deadline is set later): at most a few hundred.
        # A stopping worker drops them at once: none has reached the app yet.
        for conn, deadline in list(self.reading.items()):
            if not self.alive or force:
                self._drop(conn, None)
                continue
            if deadline > now:
                continue
            self._drop(
                conn,
                raw_error(
                    408,
                    "Request Timeout",
                    "request_timeout",
                    "request not complete within "
                    f"{self.body_timeout if conn.rev_need else self.header_timeout:g}s",
                ),
            )

    def on_client_socket_readable(self, conn: TConn, client: Any) -> None:
        """A kept-alive connection has bytes: read its next header block on the selector too."""
        self.poller.unregister(client)
        self.keepalived_conns.remove(conn)
        self._start_reading(conn)
        self._on_readable(conn, client)

    # -------------------------------------------------------------- thread phase
    def enqueue_req(self, conn: TConn) -> None:
        deadline_sock = getattr(conn, "rev_deadline_sock", None)
        if deadline_sock is not None:  # a later request on the connection: a fresh deadline
            deadline_sock.deadline = time.monotonic() + self.body_timeout
        super().enqueue_req(conn)

    def handle(self, conn: TConn) -> Any:
        pending = getattr(conn, "rev_pending", None)
        if pending is not None:
            conn.rev_pending = None
            conn.sock.setblocking(True)
            conn.init()
            if not conn.is_http2:
                if getattr(conn, "rev_deadline_sock", None) is None:
                    conn.rev_deadline_sock = DeadlineSocket(conn.sock, self.body_timeout)
                    conn.parser.unreader.sock = conn.rev_deadline_sock
                conn.rev_deadline_sock.deadline = time.monotonic() + self.body_timeout
                conn.sock.settimeout(self.body_timeout)
            conn.parser.unreader.unread(pending)
        return super().handle(conn)
