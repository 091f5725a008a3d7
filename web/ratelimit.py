"""Per-key rate limits: a token bucket in Redis, updated atomically by one Lua script.

The bucket lives in Redis rather than in the process so that the limit holds across
gunicorn workers and coordinator replicas. The script reads Redis's own clock (``TIME``),
so coordinators with skewed clocks share one notion of time, and refill + take happen in
one atomic step (no read-modify-write race between two coordinators).

**Redis down → fail open.** Redis is also the broker: while it is down no job can be
enqueued anyway (``POST /v1/jobs`` answers 503), and reads are served from PostgreSQL.
Failing closed would turn a broker outage into a total API outage, status polling
included, to protect against a flood that the broker outage already stops from doing
work. Authentication still applies (it is PostgreSQL's), so only holders of valid keys
get the unlimited window. Each coordinator process logs one warning per 30 s while it
fails open, and skips Redis for one second after a failure so that an outage does not
add a connect timeout to every request.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

KEY_PREFIX = "rev:ratelimit:"

# KEYS[1]: the bucket (hash tokens, ts); ARGV: rate per second, burst, cost.
# Returns {allowed, tokens left, seconds until one more request, seconds until full}.
TOKEN_BUCKET_LUA = """
if redis.replicate_commands then pcall(redis.replicate_commands) end
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1])
local ts = tonumber(state[2])
if tokens == nil or ts == nil then
  tokens = burst
  ts = now
end
if now > ts then
  tokens = math.min(burst, tokens + (now - ts) * rate)
  ts = now
end
local allowed = 0
local retry = 0
if tokens >= cost then
  tokens = tokens - cost
  allowed = 1
else
  retry = (cost - tokens) / rate
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(ts))
redis.call('EXPIRE', KEYS[1], math.ceil(burst / rate) + 1)
return {allowed, tostring(tokens), tostring(retry), tostring((burst - tokens) / rate)}
"""


@dataclass(frozen=True)
class Decision:
    """One bucket check: whether the request may go on and the headers that say why."""

    allowed: bool
    limit: int
    remaining: int
    reset: int
    retry_after: int
    window: int

    def headers(self) -> dict[str, str]:
        """IETF draft RateLimit header fields (+ Retry-After on a refusal)."""
        out = {
            "RateLimit-Limit": str(self.limit),
            "RateLimit-Remaining": str(self.remaining),
            "RateLimit-Reset": str(self.reset),
            "RateLimit-Policy": f"{self.limit};w={self.window}",
        }
        if not self.allowed:
            out["Retry-After"] = str(self.retry_after)
        return out


class RateLimiter:
    """Token buckets keyed by API key id; ``rps <= 0`` disables limiting."""

    def __init__(self, redis_url: str, rps: float, burst: int) -> None:
        self.rps = float(rps)
        self.burst = int(burst)
        self.redis_url = redis_url
        self._lock = threading.Lock()
        self._client: Any = None
        self._script: Any = None
        self._skip_until = 0.0
        self._warned_at = 0.0

    @property
    def enabled(self) -> bool:
        return self.rps > 0

    def _get_script(self) -> Any:
        with self._lock:
            if self._script is None:
                import redis

                self._client = redis.Redis.from_url(
                    self.redis_url, socket_timeout=0.5, socket_connect_timeout=0.5
                )
                self._script = self._client.register_script(TOKEN_BUCKET_LUA)
            return self._script

    def hit(self, key_id: str, cost: int = 1) -> Decision | None:
        """Take ``cost`` tokens from the key's bucket; ``None`` when failing open."""
        if not self.enabled:
            return None
        now = time.monotonic()
        if now < self._skip_until:
            return None
        try:
            allowed, tokens, retry, reset = self._get_script()(
                keys=[KEY_PREFIX + key_id], args=[self.rps, self.burst, cost]
            )
        except Exception as exc:  # noqa: BLE001 - any Redis failure: fail open (see module doc)
            self._skip_until = now + 1.0
            if now - self._warned_at > 30.0:
                self._warned_at = now
                log.warning(
                    "rate limiter failing open: Redis unavailable (%s: %s)",
                    type(exc).__name__,
                    str(exc)[:200],
                )
            return None
        return Decision(
            allowed=bool(int(allowed)),
            limit=self.burst,
            remaining=max(0, math.floor(float(tokens))),
            reset=max(0, math.ceil(float(reset))),
            retry_after=max(1, math.ceil(float(retry))),
            window=max(1, math.ceil(self.burst / self.rps)),
        )
