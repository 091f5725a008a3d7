"""bench/wrk/constant_rate.lua: wrk holds the rate and charges a stall to the requests behind it.

A real wrk (Debian package, scripts/install_tools.sh) on two connections against a local
server that stalls one request for 300 ms: the other connection is not held up, so timed
from the send (closed loop) one answer reads slow; timed from the slots, the ~7 requests
due on the stalled connection during the stall read slow too.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from bench.bench_api import run_wrk
from tests.conftest import service_unavailable

STALL_S = 0.3


class _Handler(BaseHTTPRequestHandler):
    lock = threading.Lock()
    served = 0

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        with _Handler.lock:
            _Handler.served += 1
            stall = _Handler.served == 40
        if stall:
            time.sleep(STALL_S)
        body = b"ok"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[str]:
    if shutil.which("wrk") is None:
        service_unavailable("wrk is not installed (Debian package wrk: scripts/install_tools.sh)")
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/healthz"
    httpd.shutdown()
    httpd.server_close()


def test_constant_rate_and_coordinated_omission(server: str, tmp_path: Path) -> None:
    rate, seconds = 50, 3
    out = run_wrk(server, rate, seconds, mode="path", workdir=tmp_path, threads=2, keep=True)
    h = out["healthz"]
    assert out["errors"] == 0 and h["status"] == {"200": h["n"]}
    # the schedule holds: about rate x duration answers, not as many as the server allows
    assert 0.8 * rate * seconds <= h["n"] <= 1.05 * rate * seconds, h["n"]
    assert out["achieved_rps"] == pytest.approx(rate, rel=0.2)
    # the stall is charged to the slots behind it (40 ms apart on one connection)
    assert h["max_ms"] >= 0.8 * STALL_S * 1e3, h
    slow = [x for x in out["latencies_ms"]["healthz"] if x > 100]
    assert len(slow) >= 4, sorted(out["latencies_ms"]["healthz"])[-10:]
    # wrk's own send-to-answer figure sees the stall once, not the queue behind it
    assert out["wrk_uncorrected_ms"]["max"] >= 0.8 * STALL_S * 1e3
