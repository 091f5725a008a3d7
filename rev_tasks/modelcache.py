"""A per-process LRU of loaded models, bounded by ``REV_MAX_MODELS_PER_WORKER``.

A worker child loads a model once and reuses it for every job and validator that needs it;
the bound keeps a long-lived child's memory flat. Entries are keyed by the resolved path,
the dtype, the device, the memory budget and the weight files' size/mtime, so a folder
rewritten in place is loaded again rather than served stale.

With a memory budget the entry is a layer-streamed model (``load_streamed``): it holds only
file handles, headers and the tokenizer, and reads each block from disk as a batch needs it.
A streamed entry and an in-memory entry of the same folder are different entries.
"""

from __future__ import annotations

import gc
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

from rev_tasks.settings import get_settings

_lock = threading.Lock()
_cache: OrderedDict[tuple[Any, ...], Any] = OrderedDict()
_stats = {"hits": 0, "misses": 0, "evictions": 0}


def _stamp(path: Path) -> tuple[tuple[str, int, int], ...]:
    out = []
    for p in sorted(path.iterdir()) if path.is_dir() else []:
        if p.is_file() and (p.suffix in {".safetensors", ".bin", ".json"}):
            st = p.stat()
            out.append((p.name, st.st_size, st.st_mtime_ns))
    return tuple(out)


def get(
    path: str,
    dtype: str = "float32",
    device: str | None = None,
    memory_budget_mb: int | None = None,
) -> Any:
    """The model for ``path``, loading it on a miss.

    A ``LoadedModel`` (whole model in memory) without a budget, a ``StreamedModel`` (blocks
    read one at a time, within ``memory_budget_mb`` MiB) with one. Raises
    ``rev_tasks.inference.ModelLoadError`` for folders that cannot be loaded, including
    ``MemoryBudgetError`` for budgets too small for one block; failures are not cached, so a
    fixed folder loads on the next try.
    """
    settings = get_settings()
    device = device or settings.worker_device
    resolved = Path(path).resolve()
    key = (str(resolved), dtype, device, memory_budget_mb, _stamp(resolved))
    with _lock:
        if key in _cache:
            _cache.move_to_end(key)
            _stats["hits"] += 1
            return _cache[key]
        _stats["misses"] += 1
        # Drop stale entries of the same folder before loading a new copy.
        for stale in [k for k in _cache if k[:4] == key[:4]]:
            del _cache[stale]
        while len(_cache) >= settings.max_models_per_worker:
            _cache.popitem(last=False)
            _stats["evictions"] += 1
        model = _load(str(resolved), dtype, device, memory_budget_mb)
        _cache[key] = model
        return model


def _load(path: str, dtype: str, device: str, memory_budget_mb: int | None) -> Any:
    if memory_budget_mb is None:
        from rev_tasks.inference import load_model

        return load_model(path, dtype=dtype, device=device)
    from rev_tasks.inference.streaming import load_streamed

    return load_streamed(path, memory_budget_mb=memory_budget_mb, dtype=dtype, device=device)


def reset() -> None:
    """Empty the cache (a fresh worker child, or tests)."""
    with _lock:
        _cache.clear()
        for k in _stats:
            _stats[k] = 0
    gc.collect()


def stats() -> dict[str, int]:
    with _lock:
        return {**_stats, "size": len(_cache)}
