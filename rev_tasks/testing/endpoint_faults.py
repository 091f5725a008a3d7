"""A faulty front for a real endpoint: the only stand-in server the endpoint tests use.

It forwards every request to a real upstream (a llama.cpp server) except where told to
misbehave: answer 429 with ``Retry-After`` to the first ``rate_limited`` requests, close
the connection without a reply from request ``die_after`` on (a server that dies mid-run),
or send a 200 whose body is not JSON (``malformed``).
"""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx


class FaultProxy:
    def __init__(
        self,
        upstream: str,
        *,
        rate_limited: int = 0,
        retry_after: str = "1",
        die_after: int | None = None,
        malformed: bool = False,
    ) -> None:
        self.upstream = upstream.rstrip("/")
        self.rate_limited = rate_limited
        self.retry_after = retry_after
        self.die_after = die_after
        self.malformed = malformed
        self.requests = 0
        self.headers_seen: list[dict[str, str]] = []
        #: (time.monotonic(), status) of each request as it arrived (0: connection dropped).
        self.seen: list[tuple[float, int]] = []
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _handle(self, method: str) -> None:
                with proxy._lock:
                    proxy.requests += 1
                    n = proxy.requests
                    proxy.headers_seen.append({k.lower(): v for k, v in self.headers.items()})
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                if proxy.die_after is not None and n > proxy.die_after:
                    proxy.seen.append((time.monotonic(), 0))
                    self.close_connection = True
                    self.connection.close()
                    return
                if n <= proxy.rate_limited:
                    proxy.seen.append((time.monotonic(), 429))
                    self._send(429, b'{"error": {"message": "slow down"}}', proxy.retry_after)
                    return
                proxy.seen.append((time.monotonic(), 200))
                if proxy.malformed and method == "POST":
                    self._send(200, b"{this is not json")
                    return
                resp = httpx.request(
                    method,
                    proxy.upstream + self.path,
                    content=body,
                    headers={"content-type": "application/json"},
                    timeout=60,
                )
                self._send(resp.status_code, resp.content)

            def _send(self, status: int, body: bytes, retry_after: str | None = None) -> None:
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                if retry_after is not None:
                    self.send_header("retry-after", retry_after)
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:  # noqa: N802
                self._handle("GET")

            def do_POST(self) -> None:  # noqa: N802
                self._handle("POST")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FaultProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
