"""Where the farm lets an endpoint job reach the outside world: the one place that calls the
egress guard (rev_tasks/endpoints/egress.py) and reveals a tenant's credential
(rev_tasks/credentials.py).

- :func:`check_endpoint_url`: the coordinator's submit-time check (a 422 on refusal) and
  the worker's re-check before it sends anything (an operator may have narrowed
  ``REV_ENDPOINT_ALLOW`` since, or DNS may now answer otherwise);
- :func:`open_client`: the worker's :class:`EndpointClient` for a job, its connections
  pinned to the address the guard checked (no second DNS lookup, no redirect outside the
  allow-list), the credential revealed here and handed only to the client's
  Authorization header: it is never in the job's request, result, transcript or a log line;
- :func:`gate_for`: the farm-wide politeness of that endpoint (Redis).
"""

from __future__ import annotations

from typing import Any

from rev_tasks.endpoints.client import EndpointClient, EndpointError, normalise_base_url

__all__ = ["EndpointRefused", "check_endpoint_url", "gate_for", "open_client"]


class EndpointRefused(EndpointError):
    """The egress guard refused the URL, or the credential is missing (one line, no secret)."""

    def __init__(self, message: str, code: str = "endpoint_refused") -> None:
        super().__init__(message)
        self.code = code


def check_endpoint_url(url: str) -> Any:
    """The guard's target for ``url`` (host resolved once); :class:`EndpointRefused` if not."""
    from rev_tasks.endpoints import egress

    try:
        base = normalise_base_url(url)
    except EndpointError as exc:
        raise EndpointRefused(str(exc)) from exc
    try:
        return egress.check_url(base)
    except egress.EgressRefused as exc:
        reason = getattr(exc, "reason", None) or str(exc)
        raise EndpointRefused(f"endpoint URL refused by the egress guard: {reason}") from exc


def reveal_credential(tenant: str, name: str | None) -> str | None:
    """The tenant's credential ``name`` in clear (worker only), None without a name."""
    if not name:
        return None
    from rev_tasks import credentials
    from rev_tasks.db.session import session_scope

    try:
        with session_scope() as s:
            return credentials.reveal(s, tenant, name)
    except credentials.CredentialMissing as exc:
        raise EndpointRefused(
            f"the tenant has no credential named {name!r}", code="credential_missing"
        ) from exc
    except credentials.CredentialError as exc:  # the master key is absent or wrong
        raise EndpointRefused(
            f"the credential {name!r} cannot be decrypted here: {exc}",
            code="credential_unavailable",
        ) from exc


def gate_for(url: str, settings: Any) -> Any:
    """The endpoint's shared concurrency slot, rate limit and Retry-After pause."""
    import redis

    from rev_tasks.endpoints.politeness import EndpointGate

    client = redis.Redis.from_url(settings.redis_url, socket_timeout=5, socket_connect_timeout=5)
    return EndpointGate(
        client,
        url,
        concurrency=settings.endpoint_concurrency,
        rate=settings.endpoint_rate,
        lease_s=settings.endpoint_timeout + 10,
        max_wait_s=max(60.0, 4 * settings.endpoint_timeout),
    )


def open_client(
    endpoint: dict[str, Any],
    tenant: str,
    settings: Any,
    *,
    max_requests: int | None = None,
    max_tokens: int | None = None,
    observer: Any = None,
    in_flight: int = 4,
) -> EndpointClient:
    """An :class:`EndpointClient` for a job's ``candidate.endpoint``: re-checked, pinned,
    polite, budgeted, with the credential (when the job names one) revealed just now."""
    from rev_tasks.endpoints import egress

    allow = egress.allow_from_env()
    url = str(endpoint["url"])
    target = check_endpoint_url(url)
    api_key = reveal_credential(tenant, endpoint.get("credential"))
    base = normalise_base_url(url)
    return EndpointClient(
        base,
        str(endpoint["model"]),
        api_key=api_key,
        timeout_s=settings.endpoint_timeout,
        max_retries=settings.endpoint_max_retries,
        max_in_flight=in_flight,
        allow=allow,
        target=target,
        gate=gate_for(base, settings),
        max_requests=max_requests,
        max_tokens=max_tokens,
        observer=observer,
    )


def credential_exists(session: Any, tenant: str, name: str | None) -> bool:
    """Whether the tenant has the credential a job names (the coordinator's 422 check)."""
    if not name:
        return True
    from rev_tasks import credentials

    return bool(credentials.exists(session, tenant, name))
