"""A per-process LRU of loaded models, bounded by ``REV_MAX_MODELS_PER_WORKER``.

A worker child loads a model once and reuses it for every job and validator that needs it;
the bound keeps a long-lived child's memory flat. Entries are keyed by the resolved path,
the dtype, the device and the weight files' size/mtime, so a folder rewritten in place is
loaded again rather than served stale.
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


def get(path: str, dtype: str = "float32", device: str | None = None) -> Any:
    """The loaded model for ``path`` (a ``LoadedModel``), loading it on a miss.

    Raises ``rev_tasks.inference.ModelLoadError`` for folders that cannot be loaded; failures
    are not cached, so a fixed folder loads on the next try.
    """
    from rev_tasks.inference import load_model

    settings = get_settings()
    device = device or settings.worker_device
    resolved = Path(path).resolve()
    key = (str(resolved), dtype, device, _stamp(resolved))
    with _lock:
        if key in _cache:
            _cache.move_to_end(key)
            _stats["hits"] += 1
            return _cache[key]
        _stats["misses"] += 1
        # Drop stale entries of the same folder before loading a new copy.
        for stale in [k for k in _cache if k[:3] == key[:3]]:
            del _cache[stale]
        while len(_cache) >= settings.max_models_per_worker:
            _cache.popitem(last=False)
            _stats["evictions"] += 1
        model = load_model(str(resolved), dtype=dtype, device=device)
        _cache[key] = model
        return model


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
