"""Helpers shared by the task modules: the farm key, job failure, metrics hooks."""

from __future__ import annotations

import contextlib
import logging
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

from rev_tasks.settings import get_settings

log = logging.getLogger(__name__)


class FarmError(Exception):
    """A failure that ends a job with a stable error code (not retried)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@lru_cache(maxsize=4)
def _read_key(path: str) -> bytes:
    from rev_tasks.core.keys import load_key

    return load_key(path)


def farm_key() -> bytes:
    """The farm's secret key; it is read by workers only and never leaves the server."""
    path = Path(get_settings().secret_key_file)
    if not path.is_file():
        raise FarmError(
            "server_misconfigured",
            "the farm secret key file is missing (set REV_SECRET_KEY_FILE or run `make up`)",
        )
    return _read_key(str(path))


def load_cached(path: str) -> Any:
    """A model from this child's LRU cache, timing real loads for /metrics."""
    from rev_tasks import modelcache

    before = modelcache.stats()["misses"]
    start = time.perf_counter()
    model = modelcache.get(path)
    elapsed = time.perf_counter() - start
    stats = modelcache.stats()
    with contextlib.suppress(Exception):
        from rev_tasks import metrics

        metrics.set_models_cached(stats["size"])
        if stats["misses"] > before:
            log.info("loaded %s into the worker cache in %.2fs", path, elapsed)
            metrics.MODEL_LOAD_DURATION.labels(
                model_family=model.descriptor.get("family", "unknown"), device=model.device
            ).observe(elapsed)
    return model


def metric(name: str, *args: Any, **kwargs: Any) -> None:
    """Call a ``rev_tasks.metrics`` helper; metrics never fail a task."""
    try:
        from rev_tasks import metrics

        getattr(metrics, name)(*args, **kwargs)
    except Exception:  # noqa: BLE001 - observability must not break the pipeline
        log.debug("metric %s not recorded", name, exc_info=True)
