"""The worker's model cache: in-memory and layer-streamed entries, and the budget they run under."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from rev_tasks import modelcache
from rev_tasks.inference.loader import LoadedModel
from rev_tasks.inference.streaming import MemoryBudgetError, StreamedModel
from rev_tasks.settings import reset_settings
from rev_tasks.tasks.common import memory_budget


@pytest.fixture(autouse=True)
def _fresh(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("REV_MEMORY_BUDGET_MB", raising=False)
    monkeypatch.setenv("REV_MAX_MODELS_PER_WORKER", "4")
    reset_settings()
    modelcache.reset()
    yield
    modelcache.reset()
    reset_settings()


def test_a_budget_gives_a_streamed_entry_of_its_own(tiny_gpt2: dict[str, Path]) -> None:
    path = str(tiny_gpt2["a"])
    full = modelcache.get(path)
    streamed = modelcache.get(path, memory_budget_mb=64)
    assert isinstance(full, LoadedModel)
    assert isinstance(streamed, StreamedModel) and streamed.memory_budget_mb == 64
    assert modelcache.get(path, memory_budget_mb=64) is streamed  # a hit
    assert modelcache.get(path) is full  # the in-memory entry was not replaced
    other = modelcache.get(path, memory_budget_mb=128)  # another budget: another entry
    assert other is not streamed and other.memory_budget_mb == 128
    assert modelcache.stats() == {"hits": 2, "misses": 3, "evictions": 0, "size": 3}
    # Same signatures either way: the cached streamed entry is a drop-in for the full model.
    prompts = ["The capital of France is", "def add(a, b):"]
    a = full.pooled_states(prompts, full.sites)
    b = streamed.pooled_states(prompts, streamed.sites)
    assert all((a[s] == b[s]).all() for s in full.sites)


def test_a_budget_too_small_is_not_cached(minilm: Path) -> None:
    with pytest.raises(MemoryBudgetError):
        modelcache.get(str(minilm), memory_budget_mb=4)
    assert modelcache.stats()["size"] == 0


def test_job_budget_wins_over_the_worker_default(
    monkeypatch: pytest.MonkeyPatch, tiny_gpt2: dict[str, Path], tmp_path: Path
) -> None:
    gpt2 = str(tiny_gpt2["a"])
    assert memory_budget({}, gpt2) is None  # no default: load in memory
    assert memory_budget({"memory_budget_mb": 300}, gpt2) == 300
    monkeypatch.setenv("REV_MEMORY_BUDGET_MB", "2GB")
    reset_settings()
    assert memory_budget({}, gpt2) == 2048
    assert memory_budget({"memory_budget_mb": None}, gpt2) == 2048
    assert memory_budget({"memory_budget_mb": 300}, gpt2) == 300
    # The worker default does not apply to what the streamed engine cannot run.
    t5 = tmp_path / "t5"
    t5.mkdir()
    (t5 / "config.json").write_text(json.dumps({"model_type": "t5", "is_encoder_decoder": True}))
    assert memory_budget({}, str(t5)) is None


def test_a_bad_worker_default_stops_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    from rev_tasks.settings import Settings

    monkeypatch.setenv("REV_MEMORY_BUDGET_MB", "lots")
    with pytest.raises(ValueError, match="REV_MEMORY_BUDGET_MB='lots'"):
        Settings.from_env()
