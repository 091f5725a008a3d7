"""The egress guard's own function on addresses and names that must never be reached.

No test here opens a connection: an autouse fixture makes every socket connect fail the test,
and names resolve through a monkeypatched ``getaddrinfo`` (a name resolving to a private or
metadata address is a fault these tests cannot cause for real without a DNS server).
"""

from __future__ import annotations

import socket
from typing import Any

import pytest

from rev_tasks.endpoints import egress
from rev_tasks.endpoints.egress import EgressRefused, check_url, parse_allow

DEFAULT = parse_allow(None)


@pytest.fixture(autouse=True)
def no_connections(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Fail any connect (and any real DNS lookup): these are pure checks."""
    attempts: list[Any] = []

    def refuse(self: socket.socket, address: Any) -> None:
        attempts.append(address)
        raise AssertionError(f"the guard tried to connect to {address}")

    def no_dns(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"unexpected DNS lookup {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    return attempts


def resolves_to(monkeypatch: pytest.MonkeyPatch, table: dict[str, list[str]]) -> list[str]:
    """Names resolve as ``table`` says; returns the names looked up, in order."""
    asked: list[str] = []

    def fake(host: str, port: Any, *args: Any, **kwargs: Any) -> list[Any]:
        asked.append(host)
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        out = []
        for addr in table[host]:
            if ":" in addr:
                out.append((socket.AF_INET6, socket.SOCK_STREAM, 6, "", (addr, port, 0, 0)))
            else:
                out.append((socket.AF_INET, socket.SOCK_STREAM, 6, "", (addr, port)))
        return out

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    return asked


REFUSED_LITERALS = [
    # cloud metadata (AWS, GCP, Azure, OpenStack; AWS's IPv6 one) and other link-local
    ("http://169.254.169.254/latest/meta-data/", "link-local"),
    ("http://169.254.170.2/v2/credentials", "link-local"),
    ("http://[fd00:ec2::254]/", "private"),
    ("http://[fe80::1]/", "link-local"),
    # loopback and unspecified
    ("http://127.0.0.1:8080/v1", "loopback"),
    ("http://127.0.0.2/", "loopback"),
    ("http://[::1]/", "loopback"),
    ("http://0.0.0.0/", "unspecified"),
    ("http://[::]/", "unspecified"),
    # private, CGNAT, benchmarking, multicast, reserved
    ("http://10.0.0.1/", "private"),
    ("http://172.16.5.4/", "private"),
    ("http://192.168.1.1/", "private"),
    ("http://100.64.0.1/", "CGNAT"),
    ("http://198.18.0.1/", "private"),
    ("http://224.0.0.1/", "multicast"),
    ("http://239.255.255.250/", "multicast"),
    ("http://240.0.0.1/", "reserved"),
    ("http://255.255.255.255/", "broadcast"),
    ("http://[fc00::1]/", "ULA"),
    ("http://[fd12:3456::1]/", "ULA"),
    ("http://[ff02::1]/", "multicast"),
    ("http://[fec0::1]/", "site-local"),
    # IPv6 forms of IPv4 addresses
    ("http://[::ffff:127.0.0.1]/", "mapped loopback"),
    ("http://[::ffff:169.254.169.254]/", "mapped metadata"),
    ("http://[::ffff:a9fe:a9fe]/", "mapped metadata, hex"),
    ("http://[::127.0.0.1]/", "IPv4-compatible"),
    ("http://[2002:7f00:1::]/", "6to4 loopback"),
    ("http://[2002:a9fe:a9fe::1]/", "6to4 metadata"),
    ("http://[64:ff9b::a9fe:a9fe]/", "NAT64 metadata"),
    ("http://[64:ff9b::10.0.0.1]/", "NAT64 private"),
]


@pytest.mark.parametrize(("url", "what"), REFUSED_LITERALS)
def test_non_public_literals_are_refused_by_default(url: str, what: str) -> None:
    with pytest.raises(EgressRefused) as err:
        check_url(url, DEFAULT)
    assert "is not allowed" in err.value.reason, what
    assert err.value.reason == str(err.value)


@pytest.mark.parametrize(
    "host",
    [
        "2130706433",  # 127.0.0.1 in decimal
        "0177.0.0.1",  # octal
        "0x7f.0.0.1",  # hex
        "0x7f000001",
        "017700000001",
        "127.1",  # short form
        "127.0.1",
        "2852039166",  # 169.254.169.254
        "0251.0376.0251.0376",
        "0xa9.0xfe.0xa9.0xfe",
        "010.0.0.1",
    ],
)
def test_non_canonical_ip_literals_are_refused_before_any_lookup(host: str) -> None:
    with pytest.raises(EgressRefused, match="non-canonical IP literal"):
        check_url(f"http://{host}/v1", parse_allow("public, 127.0.0.0/8, 169.254.0.0/16"))


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "gopher://127.0.0.1:6379/_FLUSHALL",
        "ftp://example.com/",
        "dict://127.0.0.1:11211/",
        "redis://127.0.0.1:6379/0",
        "//example.com/v1",
        "example.com/v1",
        "",
    ],
)
def test_only_http_and_https(url: str) -> None:
    with pytest.raises(EgressRefused) as err:
        check_url(url, parse_allow("public, 127.0.0.0/8"))
    assert "scheme" in err.value.reason or "empty" in err.value.reason


def test_user_info_and_zone_ids_are_refused() -> None:
    with pytest.raises(EgressRefused, match="user info"):
        check_url("http://user:pass@93.184.215.14/v1", DEFAULT)
    with pytest.raises(EgressRefused, match="user info"):
        check_url("http://127.0.0.1@93.184.215.14/", DEFAULT)
    with pytest.raises(EgressRefused, match="zone"):
        check_url("http://[fe80::1%25eth0]/", parse_allow("fe80::/10"))


def test_public_literals_pass_and_target_is_the_literal() -> None:
    t = check_url("https://93.184.215.14/v1", DEFAULT)
    assert (t.host, t.port, t.address, t.scheme) == ("93.184.215.14", 443, "93.184.215.14", "https")
    t6 = check_url("http://[2606:4700:4700::1111]:8080/v1", DEFAULT)
    assert (t6.address, t6.port) == ("2606:4700:4700::1111", 8080)
    # 6to4 of a public address is public
    assert check_url("http://[2002:5db8:d70e::1]/", DEFAULT).address == "2002:5db8:d70e::1"


def test_names_resolving_to_non_public_addresses_are_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    asked = resolves_to(
        monkeypatch,
        {
            "metadata.google.internal": ["169.254.169.254"],
            "evil.example": ["93.184.215.14", "10.0.0.7"],  # one bad answer is enough
            "mapped.example": ["::ffff:127.0.0.1"],
            "ula.example": ["fd00::5"],
            "cgnat.example": ["100.100.100.200"],
            "good.example": ["93.184.215.14", "2606:2800:21f:cb07:6820:80da:af6b:8b2c"],
        },
    )
    for name in ("metadata.google.internal", "evil.example", "mapped.example", "ula.example"):
        with pytest.raises(EgressRefused, match=f"{name} resolves to it"):
            check_url(f"http://{name}/v1", DEFAULT)
    with pytest.raises(EgressRefused, match="CGNAT"):
        check_url("http://cgnat.example/v1", DEFAULT)
    t = check_url("https://Good.Example./v1", DEFAULT)
    assert (t.host, t.address, t.port) == ("good.example", "93.184.215.14", 443)
    with pytest.raises(EgressRefused, match="does not resolve"):
        check_url("http://nowhere.example/", DEFAULT)
    # resolved once per check, never twice
    assert asked.count("good.example") == 1


def test_allow_list_entries(monkeypatch: pytest.MonkeyPatch) -> None:
    resolves_to(monkeypatch, {"llm.internal": ["10.1.2.3"], "a.corp.example": ["10.9.9.9"]})
    allow = parse_allow(
        "127.0.0.1:8080, [::1]:9000, 10.20.0.0/16, llm.internal, *.corp.example:443"
    )
    assert not allow.public  # listing anything means: only what is listed
    assert check_url("http://127.0.0.1:8080/v1", allow).address == "127.0.0.1"
    assert check_url("http://[::1]:9000/v1", allow).address == "::1"
    assert check_url("http://10.20.3.4:1234/", allow).address == "10.20.3.4"
    assert check_url("http://llm.internal:5000/", allow).address == "10.1.2.3"
    assert check_url("https://a.corp.example/", allow).address == "10.9.9.9"
    for url in (
        "http://127.0.0.1:8081/v1",  # another port
        "http://127.0.0.2:8080/v1",  # another address
        "http://[::1]:9001/",
        "http://10.21.0.1/",
        "http://a.corp.example:8443/",  # the port is part of the entry
        "http://93.184.215.14/",  # public, but 'public' is not listed
    ):
        with pytest.raises(EgressRefused):
            check_url(url, allow)
    with_public = parse_allow("public,127.0.0.1:8080")
    assert with_public.public
    assert check_url("http://93.184.215.14/", with_public).address == "93.184.215.14"
    with pytest.raises(EgressRefused):
        check_url("http://169.254.169.254/", with_public)


def test_a_listed_cidr_does_not_admit_the_mapped_form() -> None:
    allow = parse_allow("127.0.0.1/32")
    assert check_url("http://127.0.0.1/", allow).address == "127.0.0.1"
    with pytest.raises(EgressRefused):
        check_url("http://[::ffff:127.0.0.1]/", allow)


@pytest.mark.parametrize(
    "spec", ["127.0.0.1:99999", "not a host", "[::1", "10.0.0.0/33", "2130706433", "a..b"]
)
def test_a_malformed_allow_list_is_an_error(spec: str) -> None:
    with pytest.raises(ValueError, match="REV_ENDPOINT_ALLOW"):
        parse_allow(spec)


def test_allow_list_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REV_ENDPOINT_ALLOW", raising=False)
    with pytest.raises(EgressRefused):
        check_url("http://127.0.0.1:8080/")
    monkeypatch.setenv("REV_ENDPOINT_ALLOW", "127.0.0.1:8080")
    assert check_url("http://127.0.0.1:8080/").port == 8080
    assert egress.allow_from_env().spec == "127.0.0.1:8080"
