"""The coordinator's worker census must never make a request wait once it has an answer."""

from __future__ import annotations

import time

from celery import Celery

from web.services import QueueInspector


def test_stale_answer_is_served_at_once_and_refreshed_in_background(redis_url: str) -> None:
    # A database of its own: no farm worker of another test listens there.
    url = redis_url.rsplit("/", 1)[0] + "/12"
    app = Celery("inspector-test", broker=url, backend=url)
    inspector = QueueInspector(app, timeout=0.5, ttl=0.1)
    t0 = time.monotonic()
    assert inspector.live() == {}  # no worker listens on this broker: an empty census
    first = time.monotonic() - t0
    assert first >= 0.4  # the first call waits for the broadcast's replies
    first_at = inspector._at
    time.sleep(0.2)  # now stale
    t0 = time.monotonic()
    assert inspector.live() == {}
    assert time.monotonic() - t0 < 0.2  # served from the cache, not from a new broadcast
    deadline = time.monotonic() + 5
    while inspector._at == first_at and time.monotonic() < deadline:
        time.sleep(0.05)
    assert inspector._at != first_at  # the background refresh ran
    assert inspector._refreshing is False
