"""Politeness towards an endpoint, shared by every worker of the farm through Redis.

A farm of endpoint workers (``-P threads -c 32`` each) could otherwise open hundreds of
requests at one tenant's server. :class:`EndpointGate` holds, per endpoint (scheme, host
and port, hashed into the key: no URL in Redis):

- a **concurrency** limit: a lease per request in flight (a sorted set scored by expiry, so
  a worker killed mid-request frees its slot when the lease runs out);
- a **rate** limit: GCRA (a token bucket without a refill task), ``rate`` requests per
  second with a burst of ``concurrency``;
- a shared **pause**: an endpoint that answered 429 with ``Retry-After`` is left alone by
  every worker until then, not only by the one request that saw it.

Every wait is bounded (``max_wait_s``): a gate that cannot be passed in time raises
:class:`EndpointError` with the reason, so nothing hangs on a saturated endpoint. Times
come from Redis's own clock (``TIME``), so workers on hosts with skewed clocks agree.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

from rev_tasks.endpoints.client import EndpointError

__all__ = ["EndpointGate", "endpoint_id"]

_PREFIX = "rev:endpoint:"

# KEYS: pause, tat. ARGV: interval_ms, burst_ms. Returns ms to wait (0: passed and counted).
_RATE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local pause = tonumber(redis.call('GET', KEYS[1]) or '0')
if now < pause then return pause - now end
local interval = tonumber(ARGV[1])
if interval <= 0 then return 0 end
local tat = tonumber(redis.call('GET', KEYS[2]) or now)
if tat < now then tat = now end
local allow_at = tat - tonumber(ARGV[2])
if now < allow_at then return allow_at - now end
redis.call('SET', KEYS[2], tat + interval, 'PX', math.ceil(tat + interval - now + 1000))
return 0
"""

# KEYS: slots. ARGV: lease_ms, token, limit. Returns 1 when a slot was taken.
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[3]) then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), ARGV[2])
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[1]) + 1000)
  return 1
end
return 0
"""

# KEYS: pause. ARGV: ms from now. Moves the pause later, never earlier.
_PAUSE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local want = now + tonumber(ARGV[1])
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
if want > cur then redis.call('SET', KEYS[1], want, 'PX', tonumber(ARGV[1]) + 1000) end
return want
"""


def endpoint_id(url: str) -> str:
    """What the limits are per: scheme, host and port (not the path, never user info)."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    raw = f"{parts.scheme}://{(parts.hostname or '').lower()}:{port}"
    return hashlib.sha256(raw.encode()).hexdigest()[:24]


class EndpointGate:
    """The farm-wide concurrency slot, rate token and pause of one endpoint."""

    def __init__(
        self,
        redis_client: Any,
        url: str,
        *,
        concurrency: int = 4,
        rate: float = 20.0,
        lease_s: float = 60.0,
        max_wait_s: float = 120.0,
    ) -> None:
        self.redis = redis_client
        self.id = endpoint_id(url)
        self.concurrency = max(1, int(concurrency))
        self.rate = max(0.0, float(rate))
        self.lease_ms = int(max(1.0, lease_s) * 1000)
        self.max_wait_s = max_wait_s
        self._slots_key = f"{_PREFIX}{self.id}:slots"
        self._tat_key = f"{_PREFIX}{self.id}:tat"
        self._pause_key = f"{_PREFIX}{self.id}:pause"
        self._rate = redis_client.register_script(_RATE)
        self._acquire = redis_client.register_script(_ACQUIRE)
        self._pause = redis_client.register_script(_PAUSE)
        #: Seconds this gate made its callers wait (pauses, rate, slots): tests read it.
        self.waited_s = 0.0

    @contextmanager
    def slot(self) -> Iterator[None]:
        """Wait (bounded) for the endpoint's pause, a rate token and a concurrency slot."""
        deadline = time.monotonic() + self.max_wait_s
        start = time.monotonic()
        token = uuid.uuid4().hex
        interval_ms = int(1000 / self.rate) if self.rate > 0 else 0
        burst_ms = interval_ms * max(0, self.concurrency - 1)
        while True:
            wait_ms = int(
                self._rate(keys=[self._pause_key, self._tat_key], args=[interval_ms, burst_ms])
            )
            if wait_ms <= 0:
                break
            self._sleep(wait_ms / 1000, deadline, "its rate limit or Retry-After pause")
        while not int(
            self._acquire(keys=[self._slots_key], args=[self.lease_ms, token, self.concurrency])
        ):
            self._sleep(0.05, deadline, f"one of its {self.concurrency} request slots")
        self.waited_s += time.monotonic() - start
        try:
            yield
        finally:
            with contextlib.suppress(Exception):  # the lease expires on its own
                self.redis.zrem(self._slots_key, token)

    def _sleep(self, seconds: float, deadline: float, what: str) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise EndpointError(
                f"the endpoint stayed busy: no request passed {what} within {self.max_wait_s:.0f} s"
            )
        time.sleep(min(seconds, left, 1.0))

    def pause(self, seconds: float) -> None:
        """Every worker leaves the endpoint alone for ``seconds`` (a 429's ``Retry-After``)."""
        if seconds > 0:
            self._pause(keys=[self._pause_key], args=[int(seconds * 1000)])
