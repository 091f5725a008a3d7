"""The farm's one explicit Celery configuration (``app.config_from_object("celeryconfig")``).

Why each setting is what it is:

* JSON only: messages carry ids and small JSON, never pickles or tensors.
* ``task_acks_late`` + ``task_reject_on_worker_lost``: a worker killed mid-job (OOM, node
  loss) gets its message redelivered instead of silently acked; the tasks are idempotent.
* prefetch 1: a long inference job must not reserve the next one behind it.
* Redis ``visibility_timeout`` above the longest job, or Redis redelivers a running job.
* Redis result backend: chords complete by counter, without ``chord_unlock`` polling.
* Declared queues with explicit routes; an unknown queue is an error, not a new queue.
* Restarts lose nothing: SIGTERM is Celery's warm shutdown (stop consuming, finish the
  running task, ack it). A second signal (SIGQUIT, or a grace period running out) cancels
  what still runs; with ``acks_late`` that message was never acked, so the worker hands it
  back to Redis as it closes and another worker runs it again (the tasks are idempotent).
"""

from __future__ import annotations

from kombu import Queue

from rev_tasks import queues
from rev_tasks.ops.backup import BACKUP_BEAT_NAME, beat_schedule_entry
from rev_tasks.queues import Task
from rev_tasks.settings import get_settings

_settings = get_settings()

broker_url = _settings.redis_url
result_backend = _settings.redis_url
broker_connection_retry_on_startup = True
broker_transport_options = {"visibility_timeout": _settings.visibility_timeout}
result_backend_transport_options = {"visibility_timeout": _settings.visibility_timeout}
result_expires = 24 * 3600

task_serializer = "json"
result_serializer = "json"
accept_content = ["json"]
result_accept_content = ["json"]

task_acks_late = True
task_reject_on_worker_lost = True
# A task that raised or hit its time limit is acked (Celery's default, stated here): a
# poison message must not be redelivered forever; the job row carries the failure.
# (Celery 5.7 splits the old task_acks_on_failure_or_timeout into these two.)
task_acks_on_failure = True
task_acks_on_timeout = True
# A task still running when the broker connection drops is NOT cancelled: measured in the
# Redis-restart fault test (tests/integration/test_chaos.py), cancelling it failed to restore
# the message while Redis was down and then acked (deleted) it after the reconnect, so the
# job was lost. Left running, it finishes, the message comes back once, and the repeat is a
# no-op because every step is idempotent ("already decided").
worker_cancel_long_running_tasks_on_connection_loss = False
worker_prefetch_multiplier = 1
task_track_started = True
task_time_limit = _settings.job_time_limit + 300
task_soft_time_limit = _settings.job_time_limit
worker_max_memory_per_child = _settings.worker_max_memory_kb or None
worker_send_task_events = True
task_send_sent_event = True
worker_hijack_root_logger = False

timezone = "UTC"
enable_utc = True

task_default_queue = queues.DEFAULT
task_create_missing_queues = False
task_queues = [Queue(q, routing_key=q) for q in queues.declared_queues(_settings.gpu_count)]
ALL_QUEUES = [q.name for q in task_queues]

# Inference tasks default to the CPU queue; the coordinator sends each job to the queue of
# the device it resolved (inference.cpu or inference.cudaN) with an explicit ``queue=``.
task_routes = {
    Task.PREPARE: {"queue": queues.DEFAULT},
    Task.RUN_INFERENCE: {"queue": queues.INFERENCE_CPU},
    Task.FINGERPRINT: {"queue": queues.INFERENCE_CPU},
    # Endpoint jobs are I/O: a threads-pool worker on their own queue runs their queries.
    Task.RUN_ENDPOINT: {"queue": queues.ENDPOINT},
    Task.VALIDATE: {"queue": queues.CONSENSUS},
    Task.TALLY: {"queue": queues.CONSENSUS},
    Task.CONSENSUS_FAILED: {"queue": queues.CONSENSUS},
    # Consensus workers hold the certificate signing key; nothing else needs it.
    Task.CERTIFY: {"queue": queues.CONSENSUS},
    "rev_tasks.tasks.maintenance.*": {"queue": queues.MAINTENANCE},
    "rev_tasks.ops.*": {"queue": queues.MAINTENANCE},
}

include = [
    "rev_tasks.tasks.verify",
    "rev_tasks.tasks.consensus",
    "rev_tasks.tasks.registration",
    "rev_tasks.tasks.endpoint",
    "rev_tasks.tasks.maintenance",
]

# Beat entries expire so that a backlog after an outage does not run them all at once.
# The database backup runs on REV_BACKUP_SCHEDULE (crontab "0 3 * * *" UTC by default, or
# seconds); a malformed value fails here, at start, not silently at 03:00.
beat_schedule = {
    # Lost jobs are resumed within REV_WATCHDOG_STALE_SECONDS + one interval (docs/operations.md).
    "watchdog": {
        "task": Task.WATCHDOG,
        "schedule": _settings.watchdog_interval,
        "options": {"expires": 0.8 * _settings.watchdog_interval, "queue": queues.MAINTENANCE},
    },
    BACKUP_BEAT_NAME: beat_schedule_entry(),
}
