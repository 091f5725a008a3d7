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


def test_the_dtype_is_part_of_the_cache_key(tiny_gpt2: dict[str, Path]) -> None:
    """A folder in float32 and in bfloat16 are two entries: a bf16 job never gets the fp32
    model of an earlier job (or the other way round), and neither evicts the other."""
    import torch

    path = str(tiny_gpt2["a"])
    fp32 = modelcache.get(path)
    bf16 = modelcache.get(path, dtype="bfloat16")
    fp16 = modelcache.get(path, dtype="float16")
    assert len({id(fp32), id(bf16), id(fp16)}) == 3
    assert [m.descriptor["dtype"] for m in (fp32, bf16, fp16)] == [
        "float32",
        "bfloat16",
        "float16",
    ]
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    assert modelcache.get(path, dtype="bfloat16") is bf16  # a hit, same dtype
    assert modelcache.get(path, dtype="float32") is fp32  # the default is float32
    # The streamed engine keys the same way: a budget and a dtype make one entry.
    streamed = modelcache.get(path, dtype="bfloat16", memory_budget_mb=64)
    assert streamed is not bf16 and streamed.descriptor["dtype"] == "bfloat16"
    assert modelcache.get(path, dtype="bfloat16", memory_budget_mb=64) is streamed
    assert modelcache.stats() == {"hits": 3, "misses": 4, "evictions": 0, "size": 4}
    # bf16 compute gives other signatures than fp32 (what the key keeps apart).
    prompts = ["The capital of France is"]
    a = fp32.pooled_states(prompts, fp32.sites)
    b = bf16.pooled_states(prompts, bf16.sites)
    assert any((a[s] != b[s]).any() for s in fp32.sites)


def test_load_cached_passes_the_jobs_dtype(
    monkeypatch: pytest.MonkeyPatch, tiny_gpt2: dict[str, Path]
) -> None:
    from rev_tasks.tasks.common import job_dtype, load_cached

    monkeypatch.setenv("REV_MODEL_ROOTS", str(tiny_gpt2["a"].parent))
    reset_settings()
    path = str(tiny_gpt2["a"])
    assert job_dtype({}) == job_dtype(None) == job_dtype({"dtype": None}) == "float32"
    assert job_dtype({"dtype": "float16"}) == "float16"
    model = load_cached(path, None, job_dtype({"dtype": "float16"}))
    assert model.descriptor["dtype"] == "float16"
    assert load_cached(path) is not model  # float32: another entry
    assert modelcache.stats()["size"] == 2
