"""The farm-wide politeness gate of rev_tasks/endpoints/politeness.py, on a real Redis.

Two :class:`EndpointGate` objects stand for two workers: the limits hold across them
because they live in Redis, not in either process.
"""

from __future__ import annotations

import os
import threading
import time
import uuid

import pytest

from rev_tasks.endpoints.client import EndpointError
from rev_tasks.endpoints.politeness import EndpointGate, endpoint_id

REDIS_URL = os.environ.get("REV_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


@pytest.fixture
def redis_client():
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1)
    try:
        client.ping()
    except redis.RedisError as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"Redis not reachable at {REDIS_URL}: {exc}")
        pytest.skip(f"Redis not reachable at {REDIS_URL}: {exc}")
    yield client
    client.close()


@pytest.fixture
def url() -> str:
    """A fresh endpoint per test (its keys start empty)."""
    return f"http://{uuid.uuid4().hex[:12]}.test:8000/v1"


def test_endpoint_id_is_per_origin_and_hides_the_url() -> None:
    a = endpoint_id("http://llm.example:8000/v1")
    assert a == endpoint_id("http://LLM.example:8000/other/path?x=1")
    assert a == endpoint_id("http://user:pw@llm.example:8000/v1")
    assert a != endpoint_id("http://llm.example:8001/v1")
    assert a != endpoint_id("https://llm.example:8000/v1")
    assert "llm" not in a and len(a) == 24


def test_concurrency_is_shared_by_two_workers(redis_client, url: str) -> None:
    gates = [EndpointGate(redis_client, url, concurrency=2, rate=0) for _ in range(2)]
    lock = threading.Lock()
    inside = [0]
    peak = [0]

    def one(gate: EndpointGate) -> None:
        with gate.slot():
            with lock:
                inside[0] += 1
                peak[0] = max(peak[0], inside[0])
            time.sleep(0.15)
            with lock:
                inside[0] -= 1

    threads = [threading.Thread(target=one, args=(gates[i % 2],)) for i in range(6)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peak[0] == 2
    assert time.monotonic() - start >= 0.4  # 6 requests, 2 at a time, 0.15 s each


def test_rate_limit_spaces_requests_across_workers(redis_client, url: str) -> None:
    gates = [EndpointGate(redis_client, url, concurrency=1, rate=10) for _ in range(2)]
    start = time.monotonic()
    for i in range(5):
        with gates[i % 2].slot():
            pass
    # 10 per second without burst (concurrency 1): the 5th passes >= 0.4 s after the 1st.
    assert time.monotonic() - start >= 0.35


def test_a_retry_after_pause_holds_every_worker(redis_client, url: str) -> None:
    first, second = (EndpointGate(redis_client, url, concurrency=4, rate=0) for _ in range(2))
    first.pause(0.6)
    start = time.monotonic()
    with second.slot():
        waited = time.monotonic() - start
    assert 0.45 <= waited < 3.0
    assert second.waited_s >= 0.45
    first.pause(0.0)  # no pause: passes at once
    start = time.monotonic()
    with first.slot():
        pass
    assert time.monotonic() - start < 0.3


def test_a_saturated_endpoint_fails_within_the_bound(redis_client, url: str) -> None:
    holder = EndpointGate(redis_client, url, concurrency=1, rate=0)
    waiter = EndpointGate(redis_client, url, concurrency=1, rate=0, max_wait_s=0.3)
    with holder.slot():
        start = time.monotonic()
        with pytest.raises(EndpointError, match="stayed busy"), waiter.slot():
            pass
        assert time.monotonic() - start < 2.0
    with waiter.slot():  # released: the next request passes
        pass


def test_a_dead_workers_slot_expires(redis_client, url: str) -> None:
    """A worker killed inside a request never releases its slot: the lease frees it."""
    dead = EndpointGate(redis_client, url, concurrency=1, rate=0, lease_s=1.0)
    ctx = dead.slot()
    ctx.__enter__()  # never exited, as if the process died here
    alive = EndpointGate(redis_client, url, concurrency=1, rate=0, max_wait_s=5.0)
    start = time.monotonic()
    with alive.slot():
        assert 0.8 <= time.monotonic() - start < 4.0
