"""Every Prometheus metric of REV Farm, defined once, with the helpers that record them.

Why one module: the dashboards and alerts in ``deploy/`` name these series, and
``tests/unit/test_deploy.py`` checks every name they use against :data:`METRIC_NAMES`.
A metric defined anywhere else would be invisible to that check.

Who records what
----------------
- Coordinator (Flask under gunicorn): :func:`init_app` instruments every request
  (``rev_http_*``) and serves ``/metrics``; the submit view calls :func:`job_submitted`.
  ``queue_depth`` is read from Redis at scrape time by :class:`QueueDepthCollector`
  (registered by ``init_app(redis_url=..., queues=...)``), so it is right even when no
  worker runs.
- Workers (Celery prefork): tasks call :func:`observe_inference`, :func:`observe_model_load`,
  :func:`set_models_cached`, :func:`validator_running`, :func:`validator_vote`,
  :func:`consensus_round`. The children write into
  ``PROMETHEUS_MULTIPROC_DIR``; the Celery main process serves the merged view with
  :func:`start_worker_metrics_server` (call it from the ``worker_init`` signal), plus the
  process-tree RSS (``worker_memory_bytes``), the age of the newest backup on disk and,
  on CUDA workers, the GPUs' utilisation and memory.
- Finished jobs: :mod:`rev_tasks.jobs` calls :func:`job_finished` when a move into a
  terminal state commits, in whichever process made it (a worker, the watchdog, the
  coordinator for a cancel or a job the broker refused).
- Backups: :mod:`rev_tasks.ops.backup` records duration and failures itself.

Counters with a closed label set start at 0 in each process that records them
(:func:`preinitialise_worker`, :func:`preinitialise_coordinator`), so the first event after
a start shows in ``rate()`` and ``increase()``.

Multiprocess mode is chosen by prometheus_client when it is first imported, from
``PROMETHEUS_MULTIPROC_DIR``: the variable must be in the environment before any import
of this module. Containers set it in their environment and ``deploy/entrypoint.sh`` wipes
it at start (``deploy/gunicorn.conf.py`` again before forking); a hand-started worker
calls :func:`rev_tasks.ops.multiproc.prepare_multiproc_dir` first (``rev worker`` does).
"""

from __future__ import annotations

import contextlib
import functools
import glob
import inspect
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import psutil
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from rev_tasks.ops.backup_files import list_backups
from rev_tasks.ops.gpu import GPU_METRIC_NAMES, GpuCollector
from rev_tasks.queues import BASE_QUEUES, ENDPOINT
from rev_tasks.settings import get_settings

if TYPE_CHECKING:  # pragma: no cover - typing only
    from wsgiref.simple_server import WSGIServer

    from flask import Flask

log = logging.getLogger(__name__)

#: The methods labelled by name on ``rev_http_requests_total``; any other is ``other``.
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
#: Address the worker metrics server binds unless ``REV_METRICS_ADDR`` says otherwise.
DEFAULT_WORKER_METRICS_ADDR = "127.0.0.1"
#: Port the worker metrics server listens on unless told otherwise (``REV_METRICS_PORT``).
DEFAULT_WORKER_METRICS_PORT = 9808

#: Queues every farm declares; ``queue_depth`` reports these by default.
DEFAULT_QUEUES: tuple[str, ...] = (*BASE_QUEUES, ENDPOINT)

# Buckets bracket the latency targets (quoted in bench/common.py, GUIDE): inference 50-200 ms
# (so 0.2 is an edge, which keeps the p99 > 200 ms alert exact), consensus 10-50 ms, API
# 100-500 ms. Backups run from 20 ms (a small SQLite file) to an hour (a large PostgreSQL).
_INFERENCE_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0,
)  # fmt: skip
_LOAD_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_CONSENSUS_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BACKUP_BUCKETS = (
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 1800.0, 3600.0,
)  # fmt: skip

# --------------------------------------------------------------------------- coordinator
HTTP_REQUESTS = Counter(
    "rev_http_requests",
    "HTTP requests served by the coordinator, by URL rule (not raw path: bounded labels).",
    ["endpoint", "method", "status"],
)
HTTP_REQUEST_DURATION = Histogram(
    "rev_http_request_duration_seconds",
    "Coordinator request latency, by URL rule.",
    ["endpoint"],
    buckets=_HTTP_BUCKETS,
)
JOBS_SUBMITTED = Counter(
    "rev_jobs_submitted",
    "Jobs accepted by POST /v1/jobs (recorded after the row is committed).",
    ["kind"],
)
JOBS_FINISHED = Counter(
    "rev_jobs_finished",
    "Jobs that reached a final state; verdict is SAME/DIFFERENT/UNDECIDED or none.",
    ["kind", "status", "verdict"],
)

# --------------------------------------------------------------------------- workers
MODEL_INFERENCE_DURATION = Histogram(
    "model_inference_duration_seconds",
    "Forward pass of one batch of challenges (the guide's 50-200 ms target).",
    ["model_family", "device"],
    buckets=_INFERENCE_BUCKETS,
)
MODEL_LOAD_DURATION = Histogram(
    "model_load_duration_seconds",
    "Loading a model into a worker child's cache (a miss; hits are not timed).",
    ["model_family", "device"],
    buckets=_LOAD_BUCKETS,
)
MODELS_CACHED = Gauge(
    "models_cached",
    "Models held in worker children's caches (summed over live children).",
    multiprocess_mode="livesum",
)
CONSENSUS_DURATION = Histogram(
    "consensus_duration_seconds",
    "From the validator chord's start to the tally (one consensus round).",
    buckets=_CONSENSUS_BUCKETS,
)
CONSENSUS_VALIDATORS_ACTIVE = Gauge(
    "consensus_validators_active",
    "Validator tasks running now.",
    multiprocess_mode="livesum",
)
CONSENSUS_VALIDATORS = Counter(
    "consensus_validators",
    "Validator votes cast, by vote (accept/reject/error/other).",
    ["vote"],
)
CONSENSUS_ROUNDS = Counter(
    "consensus_rounds",
    "Consensus rounds by outcome: published (quorum reached), no_quorum, failed.",
    ["outcome"],
)

# --------------------------------------------------------------------------- endpoint jobs
# Requests to tenants' endpoints (rev_tasks/tasks/endpoint.py): one request is 20 ms on a
# loopback llama.cpp, seconds on a loaded service, the client's timeout at worst. No label
# names the endpoint: its URL is the tenant's business and unbounded.
_ENDPOINT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ENDPOINT_REQUEST_DURATION = Histogram(
    "rev_endpoint_request_duration_seconds",
    "Requests endpoint jobs and their validators sent, by route and outcome (ok/error).",
    ["route", "outcome"],
    buckets=_ENDPOINT_BUCKETS,
)
ENDPOINT_ERRORS = Counter(
    "rev_endpoint_errors",
    "Failed endpoint requests and refusals, by class (timeout, connect, http_429, http_5xx, "
    "http_4xx, invalid_reply, no_logprobs, budget, refused).",
    ["error_class"],
)
ENDPOINT_TOKENS = Counter(
    "rev_endpoint_tokens",
    "Tokens endpoints counted for the farm's requests, by type (prompt, completion).",
    ["type"],
)
ENDPOINT_RETRIES = Counter(
    "rev_endpoint_retries",
    "Endpoint requests sent again, by what the previous attempt met.",
    ["reason"],
)

# --------------------------------------------------------------------------- watchdog
WATCHDOG_ACTIONS = Counter(
    "rev_watchdog_actions",
    "Jobs the watchdog found lost, by action (resumed, failed) and the state they were in.",
    ["action", "state"],
)

# --------------------------------------------------------------------------- backups
BACKUP_FAILURES = Counter("rev_backup_failures", "Database backups that failed.")
BACKUP_DURATION = Histogram(
    "rev_backup_duration_seconds",
    "Wall time of successful database backups.",
    buckets=_BACKUP_BUCKETS,
)

#: Values the ``vote`` label may take; anything else is recorded as ``other``.
VOTES = frozenset({"accept", "reject", "error"})
#: Values the labels of ``rev_watchdog_actions_total`` may take.
WATCHDOG_ACTION_NAMES = frozenset({"resumed", "failed"})
WATCHDOG_STATES = frozenset({"queued", "prepared", "inference", "consensus"})
#: Values the ``outcome`` label of ``consensus_rounds_total`` may take.
CONSENSUS_OUTCOMES = frozenset({"published", "no_quorum", "failed"})
#: Verdicts a finished job may carry (``none`` when it failed before deciding).
VERDICTS = frozenset({"SAME", "DIFFERENT", "UNDECIDED", "none"})
#: Routes of an OpenAI-compatible endpoint the farm calls; anything else is ``other``.
ENDPOINT_ROUTES = frozenset({"models", "completions", "tokenize"})
ENDPOINT_OUTCOMES = frozenset({"ok", "error"})
#: Classes of endpoint failures (``rev_endpoint_errors_total``).
ENDPOINT_ERROR_CLASSES = frozenset(
    {
        "timeout",
        "connect",
        "http_429",
        "http_5xx",
        "http_4xx",
        "invalid_reply",
        "no_logprobs",
        "budget",
        "refused",
    }
)
#: What a retried request met (``rev_endpoint_retries_total``).
ENDPOINT_RETRY_REASONS = frozenset({"timeout", "connect", "http_429", "http_5xx"})
ENDPOINT_TOKEN_TYPES = ("prompt", "completion")
#: Job kinds (the ``kind`` of ``POST /v1/jobs``).
KINDS = ("verify", "identify")
#: (status, verdict) of a finished job: a verdict only when it succeeded (an identify job
#: with nothing to compare succeeds without one); failed and cancelled jobs have none.
FINISHED = (
    *(("succeeded", v) for v in ("SAME", "DIFFERENT", "UNDECIDED", "none")),
    ("failed", "none"),
    ("cancelled", "none"),
)

_COUNTERS = (
    HTTP_REQUESTS,
    JOBS_SUBMITTED,
    JOBS_FINISHED,
    CONSENSUS_VALIDATORS,
    CONSENSUS_ROUNDS,
    WATCHDOG_ACTIONS,
    BACKUP_FAILURES,
    ENDPOINT_ERRORS,
    ENDPOINT_TOKENS,
    ENDPOINT_RETRIES,
)
_HISTOGRAMS = (
    HTTP_REQUEST_DURATION,
    MODEL_INFERENCE_DURATION,
    MODEL_LOAD_DURATION,
    CONSENSUS_DURATION,
    BACKUP_DURATION,
    ENDPOINT_REQUEST_DURATION,
)
_GAUGES = (MODELS_CACHED, CONSENSUS_VALIDATORS_ACTIVE)
#: Metrics only workers record. The coordinator defines them too (one module), and
#: prometheus_client writes an unlabelled metric at 0 as soon as it exists: its
#: ``/metrics`` leaves them out rather than export a worker's series as zeros.
WORKER_ONLY = frozenset(
    m._name
    for m in (
        MODEL_INFERENCE_DURATION,
        MODEL_LOAD_DURATION,
        MODELS_CACHED,
        CONSENSUS_DURATION,
        CONSENSUS_VALIDATORS_ACTIVE,
        CONSENSUS_VALIDATORS,
        CONSENSUS_ROUNDS,
        WATCHDOG_ACTIONS,
        BACKUP_FAILURES,
        BACKUP_DURATION,
        ENDPOINT_REQUEST_DURATION,
        ENDPOINT_ERRORS,
        ENDPOINT_TOKENS,
        ENDPOINT_RETRIES,
    )
)
#: Series produced at scrape time by the collectors below (not by a metric object).
_COLLECTED_GAUGES = (
    "queue_depth",
    "worker_memory_bytes",
    "rev_backup_last_success_timestamp_seconds",
)


def _series_names() -> frozenset[str]:
    """Names as Prometheus exposes them (``_total``, ``_bucket``/``_count``/``_sum``...)."""
    names: set[str] = set(_COLLECTED_GAUGES)
    for c in _COUNTERS:
        names |= {f"{c._name}_total", f"{c._name}_created"}
    for h in _HISTOGRAMS:
        names |= {f"{h._name}_{s}" for s in ("bucket", "count", "sum", "created")}
    names |= {g._name for g in _GAUGES}
    return frozenset(names | GPU_METRIC_NAMES)


#: Every series name this project exports; dashboards and alerts may use only these
#: (``_created`` exists only outside multiprocess mode).
METRIC_NAMES: frozenset[str] = _series_names()


# --------------------------------------------------------------------------- helpers
_Recorder = TypeVar("_Recorder", bound=Callable[..., None])


def _never_fails(record: _Recorder) -> _Recorder:
    """Metrics never fail the task or request that records them, but a wrong call does.

    The arguments are bound first, outside the guard: a caller that passes the wrong ones
    gets the TypeError in its tests. Whatever goes wrong while recording is logged only.
    """
    signature = inspect.signature(record)

    @functools.wraps(record)
    def guarded(*args: Any, **kwargs: Any) -> None:
        signature.bind(*args, **kwargs)
        try:
            record(*args, **kwargs)
        except Exception:  # noqa: BLE001 - observability must not break the pipeline
            log.debug("metric %s not recorded", record.__name__, exc_info=True)

    return guarded  # type: ignore[return-value]


def _label(value: object, allowed: frozenset[str], fallback: str = "other") -> str:
    """Keep label cardinality bounded: unknown values collapse into one bucket."""
    text = "none" if value is None else str(value)
    return text if text in allowed else fallback


def time_inference(model_family: str, device: str) -> contextlib.AbstractContextManager[Any]:
    """Time one batch's forward pass: ``with time_inference("gpt2", "cpu"): ...``."""
    return MODEL_INFERENCE_DURATION.labels(model_family=model_family, device=device).time()


@_never_fails
def observe_inference(model_family: str, device: str, seconds: float) -> None:
    """Record an inference duration measured elsewhere (e.g. per challenge in a batch)."""
    MODEL_INFERENCE_DURATION.labels(model_family=model_family, device=device).observe(seconds)


@_never_fails
def observe_model_load(model_family: str, device: str, seconds: float) -> None:
    """Record how long a cache miss took to load (measured by the model cache's caller)."""
    MODEL_LOAD_DURATION.labels(model_family=model_family, device=device).observe(seconds)


def time_model_load(model_family: str, device: str) -> contextlib.AbstractContextManager[Any]:
    """Time a cache miss: ``with time_model_load(family, device): load_model(...)``."""
    return MODEL_LOAD_DURATION.labels(model_family=model_family, device=device).time()


@_never_fails
def set_models_cached(count: int) -> None:
    """Report this child's model-cache size (summed over live children when scraped)."""
    MODELS_CACHED.set(count)


@_never_fails
def job_submitted(kind: str) -> None:
    """Count an accepted job; call after the commit so rejected requests never count."""
    JOBS_SUBMITTED.labels(kind=kind).inc()


@_never_fails
def job_finished(kind: str, status: str, verdict: str | None) -> None:
    """Count a job reaching a final state (``status``: succeeded/failed/cancelled)."""
    JOBS_FINISHED.labels(kind=kind, status=status, verdict=_label(verdict, VERDICTS)).inc()


@_never_fails
def _validators_active(delta: int) -> None:
    CONSENSUS_VALIDATORS_ACTIVE.inc(delta)


@contextlib.contextmanager
def validator_running() -> Iterator[None]:
    """Hold ``consensus_validators_active`` up while one validator task runs."""
    _validators_active(1)
    try:
        yield
    finally:
        _validators_active(-1)


@_never_fails
def validator_vote(vote: str) -> None:
    """Count one validator's vote (``accept``, ``reject`` or ``error``)."""
    CONSENSUS_VALIDATORS.labels(vote=_label(vote, VOTES)).inc()


@_never_fails
def consensus_round(outcome: str, duration_s: float | None = None) -> None:
    """Record a finished round; ``outcome`` feeds the consensus success-rate alert."""
    CONSENSUS_ROUNDS.labels(outcome=_label(outcome, CONSENSUS_OUTCOMES, "failed")).inc()
    if duration_s is not None:
        CONSENSUS_DURATION.observe(duration_s)


@_never_fails
def watchdog_action(action: str, state: str) -> None:
    """Count a lost job the watchdog resumed or failed (``state``: where it was lost)."""
    WATCHDOG_ACTIONS.labels(
        action=_label(action, WATCHDOG_ACTION_NAMES), state=_label(state, WATCHDOG_STATES)
    ).inc()


@_never_fails
def record_backup_success(duration_s: float) -> None:
    """Observe a successful backup's duration (its time shows through the files)."""
    BACKUP_DURATION.observe(duration_s)


@_never_fails
def record_backup_failure() -> None:
    """Count a failed backup; the failure alert reads ``rev_backup_failures_total``."""
    BACKUP_FAILURES.inc()


class EndpointObserver:
    """What an :class:`~rev_tasks.endpoints.client.EndpointClient` on the farm reports:
    request durations, failures by class, tokens and retries (bounded labels only)."""

    @staticmethod
    @_never_fails
    def request(route: str, seconds: float, outcome: str) -> None:
        ENDPOINT_REQUEST_DURATION.labels(
            route=_label(route, ENDPOINT_ROUTES), outcome=_label(outcome, ENDPOINT_OUTCOMES)
        ).observe(seconds)

    @staticmethod
    @_never_fails
    def error(error_class: str) -> None:
        ENDPOINT_ERRORS.labels(error_class=_label(error_class, ENDPOINT_ERROR_CLASSES)).inc()

    @staticmethod
    @_never_fails
    def tokens(prompt: int, completion: int) -> None:
        if prompt > 0:
            ENDPOINT_TOKENS.labels(type="prompt").inc(prompt)
        if completion > 0:
            ENDPOINT_TOKENS.labels(type="completion").inc(completion)

    @staticmethod
    @_never_fails
    def retry(reason: str) -> None:
        ENDPOINT_RETRIES.labels(reason=_label(reason, ENDPOINT_RETRY_REASONS)).inc()


# --------------------------------------------------------------------------- first events
def _at_zero(counter: Counter, label_sets: Iterable[tuple[str, ...]]) -> None:
    for labels in label_sets:
        counter.labels(*labels)


@_never_fails
def preinitialise_worker() -> None:
    """Create each worker counter with a closed label set at 0 (call at worker start).

    A series that first appears with its first increment starts at 1, and ``rate()`` or
    ``increase()`` need two samples of it: the first failed job, ``no_quorum`` round or
    rejected vote after a worker start would never reach an alert. Created here, every
    series is scraped at 0 before its first event. Series with open label sets (model
    family, HTTP status) are left to appear when used.
    """
    _at_zero(JOBS_FINISHED, ((k, s, v) for k in KINDS for s, v in FINISHED))
    _at_zero(CONSENSUS_ROUNDS, ((o,) for o in sorted(CONSENSUS_OUTCOMES)))
    _at_zero(CONSENSUS_VALIDATORS, ((v,) for v in sorted(VOTES)))
    _at_zero(
        WATCHDOG_ACTIONS,
        ((a, s) for a in sorted(WATCHDOG_ACTION_NAMES) for s in sorted(WATCHDOG_STATES)),
    )
    _at_zero(ENDPOINT_ERRORS, ((c,) for c in sorted(ENDPOINT_ERROR_CLASSES)))
    _at_zero(ENDPOINT_RETRIES, ((r,) for r in sorted(ENDPOINT_RETRY_REASONS)))
    _at_zero(ENDPOINT_TOKENS, ((t,) for t in ENDPOINT_TOKEN_TYPES))


@_never_fails
def preinitialise_coordinator() -> None:
    """The coordinator's counters at 0: submissions, and the jobs it finishes itself (a
    cancel, a job the broker refused)."""
    _at_zero(JOBS_SUBMITTED, ((k,) for k in KINDS))
    _at_zero(JOBS_FINISHED, ((k, s, v) for k in KINDS for s, v in FINISHED))


# --------------------------------------------------------------------------- collectors
class QueueDepthCollector(Collector):
    """``queue_depth{queue}``: messages waiting in each Celery queue, read at scrape time.

    Kombu's Redis transport keeps a queue as a list named after it, plus one list per
    priority step (``name\\x06\\x16{3,6,9}``) when priorities are used; all are summed.
    A Redis error yields no samples (the scrape still succeeds, so the coordinator's
    other series survive a broker outage; ``absent(queue_depth)`` reveals it).
    """

    PRIORITY_SEP = "\x06\x16"
    PRIORITY_STEPS = (3, 6, 9)

    def __init__(self, redis_url: str, queues: Sequence[str] = DEFAULT_QUEUES) -> None:
        import redis  # local: only processes that scrape queues need the client

        self.queues = tuple(queues)
        self._client = redis.Redis.from_url(
            redis_url, socket_timeout=1.0, socket_connect_timeout=1.0
        )

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "queue_depth", "Messages waiting in a Celery queue (Redis LLEN).", labels=["queue"]
        )
        try:
            pipe = self._client.pipeline(transaction=False)
            for q in self.queues:
                pipe.llen(q)
                for step in self.PRIORITY_STEPS:
                    pipe.llen(f"{q}{self.PRIORITY_SEP}{step}")
            lengths = pipe.execute()
        except Exception as exc:  # any broker failure: report nothing, never fail a scrape
            log.warning("queue_depth: cannot read Redis: %s", exc)
            return
        per_queue = 1 + len(self.PRIORITY_STEPS)
        for i, q in enumerate(self.queues):
            family.add_metric([q], float(sum(lengths[i * per_queue : (i + 1) * per_queue])))
        yield family


class WorkerMemoryCollector(Collector):
    """``worker_memory_bytes{pid,role}``: RSS of a worker's main process and its children.

    Read from the main process at scrape time, so a child stuck in a long forward pass
    (or growing towards the OOM killer) is still measured. RSS counts pages shared after
    fork in every child: the sum over-states, the per-child maximum does not.
    """

    def __init__(self, pid: int | None = None) -> None:
        self.pid = os.getpid() if pid is None else pid

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "worker_memory_bytes",
            "Resident set size of a worker process (main or pool child).",
            labels=["pid", "role"],
        )
        try:
            main = psutil.Process(self.pid)
            procs = [(main, "main")] + [(c, "child") for c in main.children(recursive=True)]
        except psutil.Error:
            return
        for proc, role in procs:
            with contextlib.suppress(psutil.Error):  # a child may exit mid-scrape
                family.add_metric([str(proc.pid), role], float(proc.memory_info().rss))
        yield family


class BackupAgeCollector(Collector):
    """``rev_backup_last_success_timestamp_seconds`` from the newest backup file on disk.

    Read from the directory, not kept in memory, so a worker restart does not reset it and
    fire the backup-age alert: a file exists only after its atomic rename, i.e. success.
    """

    def __init__(self, backup_dir: str | os.PathLike[str]) -> None:
        self.backup_dir = Path(backup_dir)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            backups = list_backups(self.backup_dir)
        except OSError:
            return
        if not backups:
            return
        yield GaugeMetricFamily(
            "rev_backup_last_success_timestamp_seconds",
            "Unix time of the newest successful database backup.",
            value=backups[-1].created.timestamp(),
        )


class _DefaultRegistry(Collector):
    """Expose the process-local default registry inside another registry."""

    def collect(self) -> Iterable[Any]:
        return REGISTRY.collect()


class _Without(Collector):
    """Another collector's families, less those named in ``names``."""

    def __init__(self, inner: Collector, names: frozenset[str]) -> None:
        self.inner = inner
        self.names = names

    def collect(self) -> Iterator[Any]:
        for family in self.inner.collect():
            if family.name not in self.names:
                yield family


def multiprocess_enabled() -> bool:
    """True when prometheus_client writes values to ``PROMETHEUS_MULTIPROC_DIR`` files."""
    from prometheus_client import values

    return values.ValueClass is not values.MutexValue


def _reap_dead_processes(path: str) -> None:
    """Drop live-gauge files of pids that no longer exist.

    ``mark_process_dead`` is the polite path; a child killed by the OOM killer never runs
    it, and its ``models_cached`` would otherwise be summed in forever.
    """
    for f in glob.glob(os.path.join(path, "gauge_live*_*.db")):
        pid_text = Path(f).stem.rsplit("_", 1)[-1]
        if pid_text.isdigit() and not psutil.pid_exists(int(pid_text)):
            mark_process_dead(int(pid_text), path)


class _ReapingMultiProcessCollector(multiprocess.MultiProcessCollector):
    def collect(self) -> Iterable[Any]:
        _reap_dead_processes(self._path)
        return super().collect()


def build_registry(
    collectors: Iterable[Collector] = (), exclude: frozenset[str] = frozenset()
) -> CollectorRegistry:
    """A registry for one exposition: every process's values plus scrape-time collectors.

    In multiprocess mode the values come from the files of all processes; otherwise from
    this process's default registry. Families named in ``exclude`` are left out.
    """
    registry = CollectorRegistry(auto_describe=False)
    multi = multiprocess_enabled()
    values: Collector = _ReapingMultiProcessCollector(None) if multi else _DefaultRegistry()
    registry.register(_Without(values, exclude) if exclude else values)
    for collector in collectors:
        registry.register(collector)
    return registry


def mark_process_dead(pid: int | None = None, path: str | None = None) -> None:
    """Forget a dead process's live gauges (gunicorn ``child_exit``, Celery child exit).

    A no-op outside multiprocess mode, so the hooks can be wired unconditionally.
    """
    path = path or os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not path or not os.path.isdir(path):
        return
    multiprocess.mark_process_dead(os.getpid() if pid is None else pid, path)


def start_worker_metrics_server(
    port: int | None = None,
    addr: str | None = None,
    *,
    backup_dir: str | os.PathLike[str] | None = None,
    extra_collectors: Iterable[Collector] = (),
) -> tuple[WSGIServer, Any] | None:
    """Serve the worker's merged metrics on ``port``; call in Celery's ``worker_init``.

    Runs in the main process (a daemon thread), so it lives as long as the worker and does
    not fork with the pool. ``port`` None reads ``REV_METRICS_PORT`` (default 9808; ``0``
    or ``off`` there disables); an explicit ``port=0`` binds an ephemeral port (tests).
    ``addr`` None reads ``REV_METRICS_ADDR``, default loopback: the image sets ``0.0.0.0``
    (Prometheus scrapes from another container), a bare host exposes nothing unasked.
    ``backup_dir`` defaults to ``REV_BACKUP_DIR`` when that is set: the worker that runs
    backups then exports their age. A CUDA worker (``REV_WORKER_DEVICE=cuda``, as
    ``rev worker --gpu N`` sets it) also exports its GPUs' utilisation and memory
    (:class:`~rev_tasks.ops.gpu.GpuCollector`). A port already taken (two workers on one
    host) is logged and skipped rather than killing the worker. Returns the server and its
    thread, or None when disabled or not started.
    """
    if port is None:
        raw = os.environ.get("REV_METRICS_PORT", str(DEFAULT_WORKER_METRICS_PORT)).strip()
        if raw.lower() in {"", "0", "off", "false", "no"}:
            return None
        port = int(raw)
    if addr is None:
        addr = os.environ.get("REV_METRICS_ADDR", "").strip() or DEFAULT_WORKER_METRICS_ADDR
    if not multiprocess_enabled():
        log.warning(
            "PROMETHEUS_MULTIPROC_DIR was not set before prometheus_client was imported: "
            "task metrics recorded in pool children will not be exported"
        )
    preinitialise_worker()
    collectors: list[Collector] = [WorkerMemoryCollector()]
    if get_settings().worker_device == "cuda":
        collectors.append(GpuCollector())
    if backup_dir is None and os.environ.get("REV_BACKUP_DIR"):
        backup_dir = os.environ["REV_BACKUP_DIR"]
    if backup_dir is not None:
        collectors.append(BackupAgeCollector(backup_dir))
    collectors.extend(extra_collectors)
    try:
        server, thread = start_http_server(port, addr=addr, registry=build_registry(collectors))
    except OSError as exc:
        log.warning("worker metrics server not started on %s:%s: %s", addr, port, exc)
        return None
    log.info("worker metrics on http://%s:%s/metrics", addr, server.server_port)
    return server, thread


def init_app(
    app: Flask,
    *,
    redis_url: str | None = None,
    queues: Sequence[str] = DEFAULT_QUEUES,
    path: str = "/metrics",
) -> None:
    """Instrument a Flask app and add ``GET /metrics``; call once in ``create_app``.

    Requests are labelled by URL rule (``/v1/jobs/<job_id>``), never by raw path, so
    cardinality stays bounded; unmatched paths share ``<unmatched>``, and methods outside
    :data:`HTTP_METHODS` (any token is a valid method) share ``other``. Scrapes of ``path``
    are not counted (they would dominate the request rate). With ``redis_url`` the route
    also reports ``queue_depth`` for ``queues`` (``create_app`` passes the declared ones,
    so ``REV_GPU_COUNT`` decides how many ``inference.cudaN`` there are). The exposition
    leaves out the series only workers record (:data:`WORKER_ONLY`).
    """
    from flask import Response, g, request

    extra: list[Collector] = []
    if redis_url:
        extra.append(QueueDepthCollector(redis_url, queues))
    preinitialise_coordinator()

    def _start() -> None:
        g._rev_metrics_start = time.perf_counter()

    def _finish(response: Any) -> Any:
        start = g.pop("_rev_metrics_start", None)
        if start is None or request.path == path:
            return response
        endpoint = request.url_rule.rule if request.url_rule is not None else "<unmatched>"
        method = request.method if request.method in HTTP_METHODS else "other"
        HTTP_REQUESTS.labels(
            endpoint=endpoint, method=method, status=str(response.status_code)
        ).inc()
        HTTP_REQUEST_DURATION.labels(endpoint=endpoint).observe(time.perf_counter() - start)
        return response

    def _metrics() -> Response:
        body = generate_latest(build_registry(extra, exclude=WORKER_ONLY))
        return Response(body, content_type=CONTENT_TYPE_LATEST)

    app.before_request(_start)
    app.after_request(_finish)
    app.add_url_rule(path, endpoint="rev_metrics", view_func=_metrics, methods=["GET"])
