"""The egress guard on live loopback sockets: refused destinations see no connection at all.

Every "forbidden" destination is a real listening socket on 127.0.0.2 (loopback, outside the
test's allow-list); after each test it is polled without blocking, and a queued connection
would fail the test. The allowed server is a real HTTP (and HTTPS) server on 127.0.0.1. Only
DNS is faked, for the rebinding and SNI cases (there is no DNS server to rebind).
"""

from __future__ import annotations

import datetime
import io
import json
import logging
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from rev_tasks.endpoints.client import EndpointClient, EndpointError
from rev_tasks.endpoints.egress import (
    EgressRefused,
    _PinnedTransport,
    check_url,
    parse_allow,
    pinned_client,
)
from rev_tasks.redact import RedactSecrets
from tests.endpoints.egress_traps import Trap


@pytest.fixture
def trap() -> Iterator[Trap]:
    t = Trap()
    # the trap is real: a plain connect to it is seen
    probe = socket.create_connection((t.host, t.port), timeout=2)
    probe.close()
    assert t.connections() == 1
    yield t
    t.sock.close()


class Recorder(BaseHTTPRequestHandler):
    """Answers /v1/models; /redirect/... answers 302 to the rest of the path."""

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.server.seen.append((self.path, self.headers.get("Host")))  # type: ignore[attr-defined]
        if self.server.echo:  # type: ignore[attr-defined]  # a hostile or buggy endpoint
            body = json.dumps({"data": [{"id": self.headers.get("Authorization", "")}]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        location = self.server.redirect_to  # type: ignore[attr-defined]
        if location:
            self.send_response(302)
            self.send_header("Location", location)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = json.dumps({"object": "list", "data": [{"id": "m"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def server() -> Iterator[Callable[..., ThreadingHTTPServer]]:
    started: list[ThreadingHTTPServer] = []

    def start(redirect_to: str = "", tls: ssl.SSLContext | None = None) -> ThreadingHTTPServer:
        srv = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
        srv.daemon_threads = True
        srv.seen = []  # type: ignore[attr-defined]
        srv.redirect_to = redirect_to  # type: ignore[attr-defined]
        srv.echo = False  # type: ignore[attr-defined]
        if tls is not None:
            srv.socket = tls.wrap_socket(srv.socket, server_side=True)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.shutdown()
        srv.server_close()


def test_a_loopback_address_outside_the_list_is_refused_unseen(trap: Trap, server: Any) -> None:
    allowed = server()
    allow = parse_allow(f"127.0.0.1:{allowed.server_port}")
    with pytest.raises(EgressRefused, match="127.0.0.2 .* is not allowed: a loopback address"):
        EndpointClient(trap.url, "m", allow=allow)
    with pytest.raises(EgressRefused):  # the default list: public addresses only
        EndpointClient(trap.url, "m", allow=parse_allow(None))
    assert trap.connections() == 0
    # the listed one works through the same code
    with EndpointClient(f"http://127.0.0.1:{allowed.server_port}", "m", allow=allow) as c:
        assert c.models() == ["m"]
        assert c.target is not None and c.target.address == "127.0.0.1"


def test_file_urls_and_other_schemes_are_refused(trap: Trap) -> None:
    allow = parse_allow("127.0.0.0/8")
    for url in ("file:///etc/passwd", f"gopher://{trap.host}:{trap.port}/", "file://127.0.0.2/"):
        with pytest.raises(EgressRefused, match="scheme"):
            EndpointClient(url, "m", allow=allow)
    assert trap.connections() == 0


def test_a_redirect_to_a_disallowed_address_is_refused_unseen(trap: Trap, server: Any) -> None:
    srv = server(redirect_to=f"{trap.url}/v1/models")
    allow = parse_allow(f"127.0.0.1:{srv.server_port}")
    with EndpointClient(
        f"http://127.0.0.1:{srv.server_port}/v1", "m", allow=allow, max_retries=0
    ) as c:
        with pytest.raises(EgressRefused, match="redirected to a refused destination"):
            c.models()
        with pytest.raises(EgressRefused, match="redirected to a refused destination"):
            c._http.get("models", follow_redirects=True)  # asked to follow: the hook refuses
        with pytest.raises(EgressRefused, match="outside the checked endpoint"):
            c._http.get(f"{trap.url}/v1/models")  # another origin: the transport refuses
    # the transport alone, without the redirect hook, still never leaves the checked origin
    bare = httpx.Client(transport=_PinnedTransport(c.target), follow_redirects=True)
    with bare, pytest.raises(EgressRefused, match="outside the checked endpoint"):
        bare.get(f"http://127.0.0.1:{srv.server_port}/v1/models")
    assert [p for p, _ in srv.seen] == ["/v1/models"] * 3
    assert trap.connections() == 0


def test_a_redirect_inside_the_list_is_reported_not_followed(server: Any) -> None:
    srv = server()
    srv.redirect_to = f"http://127.0.0.1:{srv.server_port}/elsewhere"
    allow = parse_allow(f"127.0.0.1:{srv.server_port}")
    with (
        EndpointClient(f"http://127.0.0.1:{srv.server_port}", "m", allow=allow, max_retries=0) as c,
        pytest.raises(EndpointError, match="redirected .HTTP 302.; redirects are not followed"),
    ):
        c.models()
    assert [p for p, _ in srv.seen] == ["/v1/models"]


def test_dns_rebinding_changes_nothing(
    trap: Trap, server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The name is checked on its first answer (allowed), then answers the trap's address: the
    connection still goes to the checked address."""
    srv = server()
    real = socket.getaddrinfo
    lookups: list[str] = []

    def rebinding(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host == "rebind.test":
            lookups.append(host)
            addr = "127.0.0.1" if len(lookups) == 1 else trap.host
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (addr, port))]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    allow = parse_allow(f"127.0.0.1:{srv.server_port}")
    url = f"http://rebind.test:{srv.server_port}"
    with EndpointClient(url, "m", allow=allow) as c:
        for _ in range(3):
            assert c.models() == ["m"]
    assert lookups == ["rebind.test"]  # resolved once
    assert {host for _, host in srv.seen} == {f"rebind.test:{srv.server_port}"}
    assert len(srv.seen) == 3
    assert trap.connections() == 0
    # a fresh check sees the second answer and refuses it
    with pytest.raises(EgressRefused, match="rebind.test resolves to it"):
        check_url(url, allow)
    assert trap.connections() == 0


def _self_signed(tmp_path: Path, name: str) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_https_pinned_keeps_sni_and_certificate_name(
    tmp_path: Path, server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pinning to an address must not weaken TLS: the certificate is checked for the name."""
    cert, key = _self_signed(tmp_path, "llm.test")
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    sni: list[str | None] = []
    tls.sni_callback = lambda _sock, name, _ctx: sni.append(name)
    srv = server(tls=tls)
    real = socket.getaddrinfo

    def fake(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host in ("llm.test", "other.test"):
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    allow = parse_allow(f"127.0.0.1:{srv.server_port}")
    trust = ssl.create_default_context(cafile=str(cert))
    target = check_url(f"https://llm.test:{srv.server_port}/v1", allow)
    with pinned_client(target, allow=allow, verify=trust) as http:
        assert http.get(f"https://llm.test:{srv.server_port}/v1/models").json()["data"]
    assert sni == ["llm.test"]
    assert srv.seen[-1][1] == f"llm.test:{srv.server_port}"
    # the same address under a name the certificate does not carry: TLS refuses it
    other = check_url(f"https://other.test:{srv.server_port}/v1", allow)
    with (
        pinned_client(other, allow=allow, verify=trust) as http,
        pytest.raises(httpx.ConnectError, match="(?i)certificate|hostname"),
    ):
        http.get(f"https://other.test:{srv.server_port}/v1/models")


def test_a_reply_that_echoes_the_key_is_discarded(server: Any) -> None:
    """Replies are recorded byte for byte in the transcript: one carrying the key is refused,
    the error does not show it, and a log line that names it (through the farm's filter on a
    real handler) shows [REDACTED]."""
    srv = server()
    srv.echo = True
    secret = "sk-echo-" + "x1/y2" * 4
    allow = parse_allow(f"127.0.0.1:{srv.server_port}")
    with (
        EndpointClient(
            f"http://127.0.0.1:{srv.server_port}", "m", api_key=secret, allow=allow, max_retries=0
        ) as c,
        pytest.raises(EndpointError, match="echoed the API key") as err,
    ):
        c.models()
    assert secret not in str(err.value)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RedactSecrets())
    logger = logging.getLogger("test.egress.echo")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.warning("failed: %s (key %s)", err.value, secret)
    assert secret not in stream.getvalue() and "[REDACTED]" in stream.getvalue()
    srv.echo = False
    with EndpointClient(
        f"http://127.0.0.1:{srv.server_port}", "m", api_key=secret, allow=allow
    ) as c:
        assert c.models() == ["m"]


def test_the_operator_cli_path_is_unguarded_but_follows_no_redirect(
    trap: Trap, server: Any
) -> None:
    """Without allow or target (``rev verify --endpoint``) a loopback URL works as before, and
    a redirect is still an error, not a request to its target."""
    srv = server()
    with EndpointClient(f"http://127.0.0.1:{srv.server_port}", "m") as c:
        assert c.target is None and c.models() == ["m"]
    srv.redirect_to = f"{trap.url}/v1/models"
    with (
        EndpointClient(f"http://127.0.0.1:{srv.server_port}", "m", max_retries=0) as c,
        pytest.raises(EndpointError, match="redirects are not followed"),
    ):
        c.models()
    assert trap.connections() == 0
