"""Helpers shared by the task modules: the farm key, model loading, DB retries, heartbeats."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

from celery import signals
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from rev_tasks import metrics
from rev_tasks.settings import get_settings

log = logging.getLogger(__name__)

# The database is unreachable (restart, failover, network): not the job's fault. Tasks
# re-raise these instead of failing the job, and Celery retries the task with exponential
# backoff (1, 2, 4 … 15 s, jittered) for about half an hour; every step is idempotent, so
# re-running it from the start is safe. ``DB_RETRY`` is passed to ``@app.task``.
DB_ERRORS: tuple[type[BaseException], ...] = (OperationalError, InterfaceError, PoolTimeout)
DB_RETRY: dict[str, Any] = {
    "autoretry_for": DB_ERRORS,
    "retry_backoff": 1,
    "retry_backoff_max": 15,
    "retry_jitter": True,
    "max_retries": 120,
}


class FarmError(Exception):
    """A failure that ends a job with a stable error code (not retried)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class JobFailed(Exception):
    """Raised by a task after it stored its job's failure, so that the task ends FAILURE.

    Flower, ``AsyncResult`` and the result backend then show the failed job as a failed
    task (a task that returned normally would read SUCCESS). It is an expected outcome,
    listed in each task's ``throws``: Celery logs it without a traceback, and with
    ``task_acks_on_failure`` the message is acked, not redelivered; it is not in
    ``autoretry_for``, so nothing retries it. One string argument, so the result backend
    can rebuild it: ``"<code>: <message>"``, the job's own error.
    """

    @classmethod
    def of(cls, code: str, message: str) -> JobFailed:
        return cls(f"{code}: {message}")


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


@signals.worker_init.connect
def _preload_inference_stack(**_: Any) -> None:
    """Import torch and transformers in the worker's main process, before the pool forks.

    A fresh pool child otherwise spends seconds importing transformers on its first model
    load, and a child replaces a killed one (OOM killer, ``worker_max_memory_per_child``)
    exactly when the farm is already in trouble. Imported here, the modules are inherited
    through fork (copy-on-write) and then frozen out of the garbage collector's reach so
    that the children keep sharing them, and what transformers imports but a worker never
    runs (torch._dynamo, DTensor, sympy) is deferred (:mod:`rev_tasks.ops.memory`). Importing touches no
    device: CUDA is still initialised only inside a child. ``REV_WORKER_PRELOAD=0`` turns
    it off.
    """
    if os.environ.get("REV_WORKER_PRELOAD", "1").strip() == "0":
        return
    start = time.perf_counter()
    from rev_tasks.ops.memory import lean_imports

    try:
        import torch  # noqa: F401

        with lean_imports():  # without torch._dynamo, sympy, DTensor: ~70 MB
            import transformers.modeling_utils  # noqa: F401
            from transformers import AutoConfig, AutoModel, AutoTokenizer  # noqa: F401

            import rev_tasks.engine  # noqa: F401
            import rev_tasks.inference.loader  # noqa: F401
    except Exception:  # noqa: BLE001 - the children will import lazily instead
        log.warning("preloading the inference stack failed", exc_info=True)
        return
    from rev_tasks.ops.memory import freeze_preloaded

    freeze_preloaded()
    log.info("preloaded torch + transformers in %.1fs", time.perf_counter() - start)


def check_folder(path: str) -> None:
    """The worker's own guard before loading: confinement (symlinks included), size caps.

    The coordinator checked the folder at submit time, but it may have changed since (a
    symlink swapped in, weights replaced by a 500 GB file): this check is the one that
    protects the worker. Raises ``ModelLoadError`` subclasses with a one-line reason.
    """
    from rev_tasks.inference.guard import inspect_configured

    inspect_configured(path, get_settings())


def memory_budget(request: dict[str, Any] | None, path: str) -> int | None:
    """The budget ``path``'s model is run under: the job's ``memory_budget_mb``, else the worker's.

    ``REV_MEMORY_BUDGET_MB`` (read into the settings at start) is the worker default, so an
    operator can give a small-memory worker a budget that every job honours; a job's own
    field wins so that one job can ask for a tighter (or looser) bound. The default applies
    to the architectures the streamed engine runs; any other model loads in memory, as it
    would without the default (a job that names a budget for one is refused at submit).
    ``None``: in memory.
    """
    value = (request or {}).get("memory_budget_mb")
    if value is not None:
        return int(value)
    default = get_settings().memory_budget_mb
    if default is None:
        return None
    from rev_tasks.inference.budget import streaming_refusal

    reason = streaming_refusal(path)
    if reason is not None:
        log.info("%s: %s; loading it in memory despite REV_MEMORY_BUDGET_MB", path, reason)
        return None
    return default


def job_dtype(request: dict[str, Any] | None) -> str:
    """The compute dtype a job's models run in: its ``dtype`` field (jobs stored before the
    field existed, and requests that leave it out, are float32)."""
    return str((request or {}).get("dtype") or "float32")


def load_cached(path: str, memory_budget_mb: int | None = None, dtype: str = "float32") -> Any:
    """A model from this child's LRU cache (checked first), timing real loads for /metrics.

    With ``memory_budget_mb`` the model is layer-streamed (``memory_budget`` picks it);
    ``dtype`` is the compute dtype (part of the cache key: one folder in two dtypes is two
    entries).
    """
    from rev_tasks import modelcache

    check_folder(path)
    before = modelcache.stats()["misses"]
    start = time.perf_counter()
    model = modelcache.get(path, dtype=dtype, memory_budget_mb=memory_budget_mb)
    elapsed = time.perf_counter() - start
    stats = modelcache.stats()
    metrics.set_models_cached(stats["size"])
    if stats["misses"] > before:
        how = f"streamed within {memory_budget_mb} MB" if memory_budget_mb else "in memory"
        log.info("loaded %s (%s, %s) into the worker cache in %.2fs", path, how, dtype, elapsed)
        family = str(model.descriptor.get("family", "unknown"))
        metrics.observe_model_load(family, str(model.device), elapsed)
    return model


@contextmanager
def heartbeat(job_id: str, attempt: int | None = None) -> Iterator[None]:
    """Write the job's heartbeat every ``REV_HEARTBEAT_SECONDS`` while the block runs.

    A thread of the task's own process, so it stops when the worker dies (the point: the
    watchdog resumes a job whose heartbeat goes silent) but not while a long batch or a
    model load holds the task. A failed write (a database outage) is retried at the next
    beat; it never fails the task.
    """
    from rev_tasks import jobs
    from rev_tasks.db.session import session_scope

    interval = get_settings().heartbeat_seconds
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(interval):
            try:
                with session_scope() as s:
                    jobs.heartbeat(s, job_id, attempt)
            except Exception:  # noqa: BLE001 - a missed beat is not the job's failure
                log.debug("job %s: heartbeat not written", job_id, exc_info=True)

    thread = threading.Thread(target=beat, name=f"heartbeat-{job_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)
