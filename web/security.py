"""Authentication, scopes, tenant visibility, rate limits and security headers.

Every request except the public probes (``/healthz``, ``/readyz``, ``/openapi.json``,
``/metrics``) must carry ``Authorization: Bearer <token>``. The order of the checks is
deliberate:

1. **authenticate** (PostgreSQL, then a per-process cache of ``REV_APIKEY_CACHE_SECONDS``:
   the bound on revocation): no or bad key → 401 with ``WWW-Authenticate``;
2. **rate limit** (Redis, per key): over the bucket → 429 with ``Retry-After``. It runs
   before the scope check so that a key hammering a forbidden route is throttled too;
   requests that bring no valid key yet (the public probes but ``/healthz``, the browser
   pages, and every
   token not already in the key cache, *before* its database lookup) draw from a bucket
   per client IP instead (``REV_ANON_RATE_LIMIT_RPS``/``_BURST``), so a flood of made-up
   tokens or probe calls is refused in Redis, not served by PostgreSQL;
3. **scope**: ``GET``/``HEAD`` need ``read``, ``POST``/``PUT``/``DELETE`` need ``submit``;
   ``admin`` implies both → 403 with ``error="insufficient_scope"``.

Tenant isolation is applied by the views through :func:`can_see`: another tenant's job or
model answers 404 exactly like a missing one, so ids cannot be probed. Unknown routes need
a key too (a 401 before the 404), so the route map cannot be probed without one either.

Every response, errors included, gets the security headers; authenticated responses get
the RateLimit headers.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
from typing import Any

from flask import Flask, current_app, g, request
from sqlalchemy import update

from rev_tasks import apikeys
from rev_tasks.apikeys import Principal
from rev_tasks.db.session import read_scope, session_scope
from rev_tasks.db.tables import ApiKey, utcnow
from web.errors import ApiError
from web.ratelimit import RateLimiter

log = logging.getLogger(__name__)

PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/openapi.json", "/metrics"})
REALM = 'Bearer realm="rev-farm"'
# PUT and DELETE: a tenant's own credentials (web/credentials.py), like a submit.
SCOPE_BY_METHOD = {
    "GET": "read",
    "HEAD": "read",
    "OPTIONS": "read",
    "POST": "submit",
    "PUT": "submit",
    "DELETE": "submit",
}
LAST_USED_EVERY = 60.0  # seconds between last_used_at writes per key and process

SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'",
    "Cache-Control": "no-store",
    "Cross-Origin-Resource-Policy": "same-origin",
}
HSTS = "max-age=31536000; includeSubDomains"


class Unauthorized(ApiError):
    status, code = 401, "unauthorized"


class Forbidden(ApiError):
    status, code = 403, "forbidden"


class TooManyRequests(ApiError):
    status, code = 429, "rate_limited"


def principal() -> Principal:
    """The authenticated caller of this request (views behind authentication only)."""
    return g.rev_principal  # type: ignore[no-any-return]


def can_see(tenant: str | None) -> bool:
    """Admin keys see every tenant; other keys only their own."""
    p = principal()
    return p.is_admin or tenant == p.tenant


_touched: dict[str, float] = {}
_touched_lock = threading.Lock()


def _due_for_touch(key_id: str) -> bool:
    now = time.monotonic()
    with _touched_lock:
        if now - _touched.get(key_id, -LAST_USED_EVERY) < LAST_USED_EVERY:
            return False
        _touched[key_id] = now
        return True


def client_ip() -> str:
    """The caller's address: the peer's, or ``X-Real-IP`` when the peer is a trusted proxy."""
    peer = request.remote_addr or "unknown"
    nets = current_app.extensions.get("rev_trusted_proxies") or ()
    if nets:
        try:
            trusted = any(ipaddress.ip_address(peer) in net for net in nets)
        except ValueError:
            trusted = False
        forwarded = request.headers.get("X-Real-IP", "").strip()
        if trusted and forwarded:
            try:
                return str(ipaddress.ip_address(forwarded))
            except ValueError:
                pass
    return peer


def limit_anonymous() -> None:
    """Take one token from the client IP's bucket; a 429 when it is empty (fails open)."""
    limiter: RateLimiter = current_app.extensions["rev_anon_ratelimit"]
    ip = client_ip()
    decision = limiter.hit("ip:" + ip)
    if decision is not None and not decision.allowed:
        raise TooManyRequests(
            f"too many requests without an API key from {ip}; retry after {decision.retry_after}s",
            headers=decision.headers(),
        )


def authenticate() -> Principal:
    """The caller's key from ``Authorization: Bearer``, or a 401 (DB errors become 503)."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    bearer = bool(header) and scheme.lower() == "bearer" and bool(token)
    cache: apikeys.KeyCache = current_app.extensions["rev_keycache"]
    token_hash = apikeys.hash_token(token) if bearer else ""
    who = cache.get(token_hash) if bearer else None
    if who is None:  # not known yet: the 401 or the database lookup is paid from the IP's bucket
        limit_anonymous()
    if not header:
        raise Unauthorized(
            "send an API key: Authorization: Bearer <token>",
            headers={"WWW-Authenticate": REALM},
        )
    if not bearer:
        raise Unauthorized(
            "the Authorization header must be 'Bearer <token>'",
            headers={"WWW-Authenticate": f'{REALM}, error="invalid_request"'},
        )
    if who is None:
        with read_scope() as s:
            row = apikeys.lookup(s, token)
            if row is None:
                raise Unauthorized(
                    "invalid or revoked API key",
                    headers={"WWW-Authenticate": f'{REALM}, error="invalid_token"'},
                )
            who = Principal(key_id=row.id, tenant=row.tenant, scopes=row.scope_set)
        cache.put(token_hash, who)
    if _due_for_touch(who.key_id):  # forensics for a stolen key, without a write per request
        with session_scope() as s:
            s.execute(update(ApiKey).where(ApiKey.id == who.key_id).values(last_used_at=utcnow()))
    return who


def _before() -> Any:
    from web import certificates, reports  # imported here: both import web.jobs, which imports us

    if request.path in PUBLIC_PATHS or request.path in certificates.PUBLIC_PATHS:
        # /healthz answers from memory: a bucket check (a Redis round trip) would cost
        # more than the answer, and the liveness probe must not depend on Redis.
        if request.path != "/healthz":
            limit_anonymous()
        return None
    if reports.is_browser_path(request.path):  # the pages: a session cookie, not a bearer key
        limit_anonymous()
        return reports.gate()
    who = authenticate()
    g.rev_principal = who
    limiter: RateLimiter = current_app.extensions["rev_ratelimit"]
    decision = limiter.hit(who.key_id)
    if decision is not None:
        g.rev_ratelimit_headers = decision.headers()
        if not decision.allowed:
            raise TooManyRequests(
                f"rate limit exceeded for key {who.key_id}; retry after {decision.retry_after}s",
                headers=g.rev_ratelimit_headers,
            )
    needed = SCOPE_BY_METHOD.get(request.method, "admin")
    if not who.allows(needed):
        raise Forbidden(
            f"this key lacks the {needed!r} scope",
            headers={"WWW-Authenticate": f'{REALM}, error="insufficient_scope", scope="{needed}"'},
        )


def _after(response: Any) -> Any:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    if current_app.config["REV_SETTINGS"].hsts:
        response.headers.setdefault("Strict-Transport-Security", HSTS)
    for name, value in (g.get("rev_ratelimit_headers") or {}).items():
        response.headers.setdefault(name, value)
    return response


def init_app(app: Flask) -> None:
    """Register the hooks; call after every other ``before_request`` (metrics count 401s)."""
    from rev_tasks import redact

    settings = app.config["REV_SETTINGS"]
    app.extensions["rev_keycache"] = apikeys.KeyCache(settings.apikey_cache_seconds)
    app.extensions["rev_ratelimit"] = app.config.get("REV_RATE_LIMITER") or RateLimiter(
        settings.redis_url, settings.rate_limit_rps, settings.rate_limit_burst
    )
    app.extensions["rev_anon_ratelimit"] = app.config.get("REV_ANON_RATE_LIMITER") or RateLimiter(
        settings.redis_url, settings.anon_rate_limit_rps, settings.anon_rate_limit_burst
    )
    app.extensions["rev_trusted_proxies"] = tuple(
        ipaddress.ip_network(net, strict=False) for net in settings.trusted_proxies
    )
    app.before_request(_before)
    app.after_request(_after)
    redact.install()
