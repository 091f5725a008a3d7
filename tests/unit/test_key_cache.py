"""KeyCache: entries live exactly ``ttl`` seconds, refused keys are never stored, size bounded."""

from __future__ import annotations

from rev_tasks.apikeys import KeyCache, Principal

WHO = Principal(key_id="k1", tenant="alpha", scopes=frozenset({"read"}))


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_an_entry_lives_for_ttl_seconds_and_no_longer() -> None:
    clock = Clock()
    cache = KeyCache(ttl=1.0, clock=clock)
    assert cache.get("h1") is None
    cache.put("h1", WHO)
    clock.now += 0.875
    assert cache.get("h1") == WHO
    clock.now += 0.125
    assert cache.get("h1") is None  # the revocation bound: ttl, not a moment more
    assert cache.get("h1") is None


def test_a_hit_does_not_extend_the_entry() -> None:
    clock = Clock()
    cache = KeyCache(ttl=1.0, clock=clock)
    cache.put("h1", WHO)
    for _ in range(7):
        clock.now += 0.125
        assert cache.get("h1") == WHO
    clock.now += 0.125
    assert cache.get("h1") is None


def test_ttl_zero_turns_it_off() -> None:
    cache = KeyCache(ttl=0.0)
    cache.put("h1", WHO)
    assert cache.get("h1") is None


def test_size_is_bounded_oldest_out_first() -> None:
    cache = KeyCache(ttl=60.0, max_entries=3, clock=Clock())
    for i in range(5):
        cache.put(f"h{i}", WHO)
    assert [cache.get(f"h{i}") for i in range(5)] == [None, None, WHO, WHO, WHO]
