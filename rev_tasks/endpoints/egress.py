"""The egress guard: which endpoint URLs the farm may send a request to (SSRF defence).

A farm job lets a tenant name a URL that the farm's workers then call with the tenant's
credentials. Without a guard, that URL could be the cloud metadata service
(``169.254.169.254``), the farm's own Redis or PostgreSQL, or anything else on the private
network. The rules (docs/security.md, "Egress guard"):

- the scheme is ``http`` or ``https``; the URL carries no user info; the host is a name or a
  canonical IP literal (``2130706433``, ``0177.0.0.1`` and ``0x7f.1`` are refused: libc reads
  them as 127.0.0.1 while a human reads something else);
- the host is resolved **once** (:func:`socket.getaddrinfo`) and **every** address it resolves
  to must be allowed; :func:`pinned_client` then connects to the checked address only, so a
  name that resolves elsewhere the second time (DNS rebinding) changes nothing;
- an address is allowed by ``REV_ENDPOINT_ALLOW`` (:func:`parse_allow`): ``public`` allows
  every public unicast address (the default when the variable is unset or empty); a CIDR or
  address (``10.1.2.0/24``, ``127.0.0.1``, ``::1/128``), optionally with a port
  (``127.0.0.1:8080``, ``[::1]:8080``), allows those addresses; a host name (``llm.internal``,
  ``*.corp.example``, with an optional ``:port``) allows that name whatever it resolves to.
  Loopback, link-local (cloud metadata, also ``fd00:ec2::254``), private (RFC 1918, ULA),
  CGNAT, multicast, reserved and unspecified addresses, and IPv6 forms that embed one
  (IPv4-mapped, 6to4, NAT64, IPv4-compatible), are never "public";
- redirects are not followed: a 3xx whose ``Location`` the guard refuses raises
  :class:`EgressRefused` (one it would allow is the caller's error to report).

The ``rev verify --endpoint`` CLI is run by an operator against a URL they chose, so it does
not apply the guard; the farm applies it at submit and again in the worker.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpcore
import httpx

__all__ = [
    "AllowList",
    "EgressRefused",
    "Target",
    "check_redirect",
    "check_url",
    "is_public",
    "parse_allow",
    "pinned_client",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: The environment variable an operator lists allowed destinations in.
ENV_VAR = "REV_ENDPOINT_ALLOW"
PUBLIC = "public"
_DEFAULT_PORTS = {"http": 80, "https": 443}
_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)(?:(?!-)[a-z0-9_-]{1,63}(?<!-)\.)*(?!-)[a-z0-9_-]{1,63}(?<!-)$"
)
# Anything a libc resolver may read as an IPv4 address in a non-canonical way: all-numeric
# labels in decimal, octal (leading 0) or hex (0x), fewer than four parts.
_NUMERIC_LABEL = re.compile(r"^(?:0x[0-9a-f]*|[0-9]+)$")

# IPv6 prefixes that carry an IPv4 address in their bits: judged by that address.
_NAT64 = (ipaddress.IPv6Network("64:ff9b::/96"), ipaddress.IPv6Network("64:ff9b:1::/48"))
_V4_COMPAT = ipaddress.IPv6Network("::/96")


class EgressRefused(ValueError):
    """The guard refuses this destination; ``reason`` is one credential-free line."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class _HostRule:
    pattern: str  # a host name, or "*.suffix"
    port: int | None

    def matches(self, host: str, port: int) -> bool:
        if self.port is not None and self.port != port:
            return False
        if self.pattern.startswith("*."):
            return host.endswith(self.pattern[1:]) and host != self.pattern[2:]
        return host == self.pattern


@dataclass(frozen=True)
class _NetRule:
    network: IPNetwork
    port: int | None

    def matches(self, address: IPAddress, port: int) -> bool:
        if self.port is not None and self.port != port:
            return False
        return address.version == self.network.version and address in self.network


@dataclass(frozen=True)
class AllowList:
    """Parsed ``REV_ENDPOINT_ALLOW``: what may be called besides nothing."""

    public: bool = True
    hosts: tuple[_HostRule, ...] = ()
    networks: tuple[_NetRule, ...] = ()
    spec: str = field(default=PUBLIC, compare=False)

    def allows_host(self, host: str, port: int) -> bool:
        """The name itself is listed: the operator vouches for whatever it resolves to."""
        return any(rule.matches(host, port) for rule in self.hosts)

    def allows_address(self, address: IPAddress, port: int) -> bool:
        if any(rule.matches(address, port) for rule in self.networks):
            return True
        return self.public and is_public(address)


@dataclass(frozen=True)
class Target:
    """A checked destination: connect to ``address`` only, speak to ``host``."""

    url: str
    host: str
    port: int
    address: str
    scheme: str


def _embedded_v4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    for net in _NAT64:
        if address in net:
            return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if address in _V4_COMPAT and int(address) > 1:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def is_public(address: IPAddress) -> bool:
    """A globally routable unicast address, judged by the IPv4 one an IPv6 form embeds."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.scope_id:
            return False
        inner = _embedded_v4(address)
        if inner is not None:
            return is_public(inner)
        if address.is_site_local:
            return False
    return not (
        not address.is_global
        or address.is_multicast
        or address.is_reserved
        or address.is_unspecified
        or address.is_loopback
        or address.is_link_local
        or address.is_private
    )


def _split_host_port(entry: str) -> tuple[str, int | None]:
    """``host``, ``host:port``, ``[v6]``, ``[v6]:port``, ``v6`` or a CIDR (no port)."""
    if entry.startswith("["):
        host, bracket, rest = entry[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(f"{ENV_VAR}: cannot read {entry!r}")
        return host, _port(rest[1:], entry) if rest else None
    if entry.count(":") == 1:
        host, _, port = entry.partition(":")
        return host, _port(port, entry)
    return entry, None


def _port(text: str, entry: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"{ENV_VAR}: bad port in {entry!r}")
    return int(text)


def parse_allow(spec: str | None) -> AllowList:
    """Read ``REV_ENDPOINT_ALLOW``: comma-separated ``public``, hosts, addresses and CIDRs.

    Unset or empty means ``public``. When set, only what it lists is allowed: add
    ``public`` to keep public addresses. A malformed entry is a ValueError (a farm that
    cannot read its allow-list must not start guessing).
    """
    if spec is None or not spec.strip():
        return AllowList(public=True, spec=PUBLIC)
    public = False
    hosts: list[_HostRule] = []
    nets: list[_NetRule] = []
    for raw in spec.split(","):
        entry = raw.strip().lower()
        if not entry:
            continue
        if entry == PUBLIC:
            public = True
            continue
        host, port = _split_host_port(entry)
        try:
            nets.append(_NetRule(ipaddress.ip_network(host, strict=False), port))
            continue
        except ValueError:
            pass
        name = host.rstrip(".")
        bare = name[2:] if name.startswith("*.") else name
        if not _HOSTNAME.match(bare) or _looks_numeric(bare):
            raise ValueError(f"{ENV_VAR}: {raw.strip()!r} is not a host, address or CIDR")
        hosts.append(_HostRule(name, port))
    return AllowList(public=public, hosts=tuple(hosts), networks=tuple(nets), spec=spec.strip())


def allow_from_env() -> AllowList:
    """The allow-list of this process (``REV_ENDPOINT_ALLOW``, read on each call)."""
    return parse_allow(os.environ.get(ENV_VAR))


def _looks_numeric(host: str) -> bool:
    labels = host.split(".")
    return all(_NUMERIC_LABEL.match(label) for label in labels if label) and bool(host)


def _literal(host: str) -> IPAddress | None:
    """A canonical IP literal, None for a name; a non-canonical numeric host is refused."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if _looks_numeric(host):
        raise EgressRefused(
            f"endpoint host {host!r} is a non-canonical IP literal (decimal, octal or hex): "
            "write the address in dotted-quad form"
        )
    return None


def _resolve(host: str, port: int) -> list[IPAddress]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, OSError) as exc:
        raise EgressRefused(f"endpoint host {host!r} does not resolve ({exc})") from None
    out: list[IPAddress] = []
    for _family, _type, _proto, _canon, sockaddr in infos:
        text = str(sockaddr[0]).split("%", 1)[0]
        try:
            addr = ipaddress.ip_address(text)
        except ValueError:
            continue
        if isinstance(sockaddr, tuple) and len(sockaddr) == 4 and sockaddr[3]:
            addr = ipaddress.IPv6Address(f"{text}%{sockaddr[3]}")
        if addr not in out:
            out.append(addr)
    if not out:
        raise EgressRefused(f"endpoint host {host!r} resolves to no IP address")
    return out


def check_url(url: str, allow: AllowList | None = None) -> Target:
    """Check ``url`` against ``allow`` (None: this process's ``REV_ENDPOINT_ALLOW``).

    Resolves the host once; returns the :class:`Target` to pin the connection to, or raises
    :class:`EgressRefused` saying why.
    """
    if allow is None:
        allow = allow_from_env()
    if not isinstance(url, str) or not url.strip():
        raise EgressRefused("endpoint URL is empty")
    try:
        parts = urlsplit(url.strip())
        port_given = parts.port
        host = (parts.hostname or "").rstrip(".")
    except ValueError:
        raise EgressRefused("endpoint URL cannot be parsed") from None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise EgressRefused(
            f"endpoint URL scheme {scheme or 'none'!r} is refused (only http and https)"
        )
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise EgressRefused("endpoint URL must not carry user info; store the key as a credential")
    if not host:
        raise EgressRefused("endpoint URL has no host")
    if "%" in host:
        raise EgressRefused("endpoint URL names a scoped (zone) IPv6 address")
    port = port_given if port_given is not None else _DEFAULT_PORTS[scheme]
    literal = _literal(host)
    if literal is None:
        if not _HOSTNAME.match(host):
            raise EgressRefused(f"endpoint host {host[:80]!r} is not a valid host name")
        addresses = _resolve(host, port)
        host_listed = allow.allows_host(host, port)
    else:
        addresses = [literal]
        host_listed = False
    if not host_listed:
        for address in addresses:
            if not allow.allows_address(address, port):
                via = "" if literal is not None else f" ({host} resolves to it)"
                raise EgressRefused(
                    f"endpoint address {address} port {port}{via} is not allowed: "
                    f"{_kind(address)}; the farm's {ENV_VAR} does not list it"
                )
    return Target(url=url.strip(), host=host, port=port, address=str(addresses[0]), scheme=scheme)


def _kind(address: IPAddress) -> str:
    if isinstance(address, ipaddress.IPv6Address) and _embedded_v4(address) is not None:
        return f"an IPv6 form of {_kind(_embedded_v4(address))}"  # type: ignore[arg-type]
    for name, flag in (
        ("an unspecified", address.is_unspecified),
        ("a loopback", address.is_loopback),
        ("a link-local (cloud metadata lives here)", address.is_link_local),
        ("a multicast", address.is_multicast),
        ("a private", address.is_private),
        ("a reserved", address.is_reserved),
    ):
        if flag:
            return f"{name} address"
    if isinstance(address, ipaddress.IPv4Address) and address in ipaddress.ip_network(
        "100.64.0.0/10"
    ):
        return "a shared (CGNAT) address"
    if not is_public(address):
        return "not a public unicast address"
    return "a public address"


def check_redirect(response: httpx.Response, allow: AllowList | None = None) -> None:
    """Raise :class:`EgressRefused` when ``response`` redirects outside ``allow``."""
    if not response.is_redirect:
        return
    location = response.headers.get("location", "")
    target = urljoin(str(response.request.url), location)
    try:
        check_url(target, allow)
    except EgressRefused as exc:
        raise EgressRefused(
            f"the endpoint redirected to a refused destination: {exc.reason}"
        ) from None


# -- a client pinned to the checked address ------------------------------------------------


class _PinnedBackend(httpcore.NetworkBackend):
    """Opens TCP connections to the checked address only, whatever host httpcore asks for."""

    def __init__(self, target: Target) -> None:
        self._target = target
        self._inner = httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        t = self._target
        if host.lower().rstrip(".").strip("[]") != t.host.strip("[]") or port != t.port:
            raise EgressRefused(f"connection to {host}:{port} is outside the checked endpoint")
        return self._inner.connect_tcp(t.address, t.port, timeout, local_address, socket_options)

    def connect_unix_socket(self, *args: Any, **kwargs: Any) -> httpcore.NetworkStream:
        raise EgressRefused("unix sockets are refused")

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


class _PinnedTransport(httpx.HTTPTransport):
    """An HTTP transport for one checked :class:`Target`; other origins are refused."""

    def __init__(self, target: Target, *, verify: Any = True, limits: httpx.Limits | None = None):
        limits = limits or httpx.Limits(max_connections=100, max_keepalive_connections=20)
        super().__init__(verify=verify, trust_env=False, limits=limits)
        self._target = target
        self._pool = httpcore.ConnectionPool(
            ssl_context=httpx.create_ssl_context(verify=verify, trust_env=False),
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=_PinnedBackend(target),
        )

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        t = self._target
        url = request.url
        port = url.port if url.port is not None else _DEFAULT_PORTS.get(url.scheme, -1)
        if url.scheme != t.scheme or url.host.rstrip(".") != t.host.strip("[]") or port != t.port:
            raise EgressRefused(
                f"request to {url.scheme}://{url.host}:{port} is outside the checked endpoint"
            )
        return super().handle_request(request)


def pinned_client(
    target: Target, *, allow: AllowList | None = None, **httpx_kwargs: Any
) -> httpx.Client:
    """An ``httpx.Client`` that reaches only ``target.address`` (no second DNS lookup).

    TLS SNI, certificate checks and the Host header still use ``target.host``. Redirects are
    never followed; a response that redirects outside ``allow`` raises
    :class:`EgressRefused` (an event hook). Environment proxies are ignored (a proxy would
    make the pinned address meaningless). ``httpx_kwargs`` go to ``httpx.Client``
    (``base_url``, ``headers``, ``timeout``; ``verify`` and ``limits`` to the transport).
    """
    verify = httpx_kwargs.pop("verify", True)
    limits = httpx_kwargs.pop("limits", None)
    for refused in ("transport", "follow_redirects", "trust_env", "proxy", "mounts"):
        if refused in httpx_kwargs:
            raise TypeError(f"pinned_client sets {refused} itself")
    hooks = dict(httpx_kwargs.pop("event_hooks", None) or {})
    hooks["response"] = [*hooks.get("response", ()), lambda r: check_redirect(r, allow)]
    return httpx.Client(
        transport=_PinnedTransport(target, verify=verify, limits=limits),
        follow_redirects=False,
        trust_env=False,
        event_hooks=hooks,
        **httpx_kwargs,
    )
