"""The farm's Celery app (``celery -A rev_tasks worker`` finds it here as ``rev_tasks.celery``).

Configuration lives in the top-level ``celeryconfig`` module, installed with the package
(``py-modules`` in pyproject.toml) so that a worker finds it from any directory. The signal
handlers below make ``-c N`` scale: each prefork child gets ``cores // N`` torch threads,
drops the database connections it inherited from the parent and starts with an empty model
cache. CUDA is never touched here: a child initialises it lazily when it first loads a
model on ``cuda``.

Observability is wired here too: the main process serves the merged Prometheus metrics
(``worker_init``), each child starts OpenTelemetry after the fork when an OTLP endpoint
is set (:mod:`rev_tasks.telemetry`), and every task binds its job id to the log context
(:mod:`rev_tasks.logs`; JSON lines with ``REV_LOG_JSON=1``).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from celery import Celery, signals

from rev_tasks import logs

log = logging.getLogger(__name__)

app = Celery("rev_tasks")
app.config_from_object("celeryconfig")

_CONCURRENCY_ENV = "REV_WORKER_CONCURRENCY"


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def threads_per_child(concurrency: int, cores: int | None = None) -> int:
    """Torch threads for one child so that ``-c`` children share the cores, not oversubscribe."""
    return max(1, (cores or _cores()) // max(1, concurrency))


@signals.celeryd_init.connect
def _remember_concurrency(sender: Any = None, instance: Any = None, **kwargs: Any) -> None:
    """The parent knows ``-c``; children inherit it through the environment."""
    concurrency = getattr(instance, "concurrency", None) or (kwargs.get("options") or {}).get(
        "concurrency"
    )
    if concurrency:
        os.environ[_CONCURRENCY_ENV] = str(int(concurrency))


@signals.worker_process_init.connect
def _init_child(**_: Any) -> None:
    """Per-child setup after fork: fresh DB pool, empty model cache, bounded torch threads."""
    from rev_tasks import modelcache
    from rev_tasks.db.session import dispose_engine

    dispose_engine(close=False)
    modelcache.reset()
    concurrency = int(os.environ.get(_CONCURRENCY_ENV, "1") or 1)
    threads = threads_per_child(concurrency)
    try:
        import torch

        torch.set_num_threads(threads)
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    from rev_tasks.ops.memory import active_allocator

    log.info(
        "worker child %s: %d torch thread(s) for -c %d, allocator %s",
        os.getpid(), threads, concurrency, active_allocator(),
    )  # fmt: skip
    from rev_tasks import telemetry

    telemetry.init_worker_process()


@signals.worker_init.connect
def _start_metrics(**_: Any) -> None:
    """Serve the worker's merged Prometheus metrics from the main process (REV_METRICS_PORT)."""
    try:
        from rev_tasks import metrics

        metrics.start_worker_metrics_server()
    except Exception:  # noqa: BLE001 - a worker without /metrics still works
        log.warning("worker metrics server not started", exc_info=True)


@signals.worker_process_shutdown.connect
def _child_exit(pid: int | None = None, **_: Any) -> None:
    """Forget an exiting child's live gauges (models cached, validators running); flush spans."""
    try:
        from rev_tasks import metrics

        metrics.mark_process_dead(pid or os.getpid())
    except Exception:  # noqa: BLE001
        pass
    from rev_tasks import telemetry

    telemetry.shutdown()


def _redact_logs(**_: Any) -> None:
    """Credentials never reach a worker's log (rev_tasks/redact.py): the filter goes on every
    handler once logging is set up, in the main process and in each child."""
    from rev_tasks import redact

    redact.install("celery.task", "celery.worker", "celery.redirected")


for _signal in (
    signals.after_setup_logger,
    signals.after_setup_task_logger,
    signals.worker_ready,
    signals.worker_process_init,
):
    _signal.connect(_redact_logs, weak=False)

# Job and task ids on every log record of a task (JSON logs print them).
signals.task_prerun.connect(logs.on_task_prerun, weak=False)
signals.task_postrun.connect(logs.on_task_postrun, weak=False)
if logs.json_enabled():
    # Connected only when asked: any receiver of setup_logging replaces Celery's own setup.
    signals.setup_logging.connect(logs.on_setup_logging, weak=False)
