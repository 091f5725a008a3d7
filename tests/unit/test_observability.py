"""JSON logs, the OpenTelemetry switch, and the Celery settings that restarts rely on.

No broker, no database: the integration tests (tests/integration/test_ops.py,
test_restarts.py) run the same code in real worker processes.
"""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from rev_tasks import logs, queues, telemetry
from rev_tasks.queues import Task

ROOT = Path(__file__).resolve().parents[2]


def _config(code: str, **env: str) -> Any:
    """Evaluate ``code`` after importing celeryconfig in a fresh process with ``env``."""
    proc = subprocess.run(
        [sys.executable, "-c", f"import json, celeryconfig as c; print(json.dumps({code}))"],
        cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_beat_schedules_the_backup_on_maintenance_with_expiry() -> None:
    entry = _config(
        "{k: str(v) for k, v in c.beat_schedule['rev-backup-database'].items()}",
        REV_BACKUP_SCHEDULE="",
    )
    assert entry["task"] == Task.BACKUP
    assert "0 3 * * *" in entry["schedule"]  # daily 03:00 UTC by default
    assert entry["options"] == str({"queue": queues.MAINTENANCE, "expires": 3600.0})
    seconds = _config(
        "c.beat_schedule['rev-backup-database']['schedule']", REV_BACKUP_SCHEDULE="90"
    )
    assert seconds == 90.0
    every = _config("[e['options'].get('expires') for e in c.beat_schedule.values()]")
    assert all(every)  # no beat entry without expires


def test_a_bad_backup_schedule_fails_at_start() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", "import celeryconfig"],
        cwd=ROOT, env={**os.environ, "REV_BACKUP_SCHEDULE": "daily"},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode != 0 and "REV_BACKUP_SCHEDULE" in proc.stderr


def test_restart_safety_settings() -> None:
    got = _config(
        "[c.task_acks_late, c.task_reject_on_worker_lost, c.task_acks_on_failure,"
        " c.task_acks_on_timeout, c.worker_cancel_long_running_tasks_on_connection_loss,"
        " c.worker_prefetch_multiplier, c.broker_transport_options['visibility_timeout'],"
        " c.task_time_limit]"
    )
    acks_late, reject_lost, on_failure, on_timeout, cancel_on_loss, prefetch, vis, limit = got
    assert acks_late and reject_lost and on_failure and on_timeout
    # Not cancelled on connection loss: with Redis that loses the message (see celeryconfig).
    assert cancel_on_loss is False
    assert prefetch == 1
    assert vis > limit  # Redis must not redeliver a task that is still running


# ----------------------------------------------------------------------------- logs
@pytest.fixture
def json_logger() -> Any:
    """A logger writing JSON lines into a buffer, with no job bound to this context."""
    tokens = [logs.job_id_var.set(None), logs.model_id_var.set(None)]
    stream = io.StringIO()
    logger = logging.getLogger("rev.test.json")
    logger.handlers = [logs.json_handler(stream)]
    logger.setLevel(logging.INFO)
    logger.propagate = False
    yield logger, stream
    logger.handlers = []
    logs.model_id_var.reset(tokens[1])
    logs.job_id_var.reset(tokens[0])


def _lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_lines_carry_the_bound_job_id(json_logger: Any) -> None:
    logger, stream = json_logger
    logger.info("outside")
    token = logs.job_id_var.set("job-1")
    try:
        logger.warning("inside %s", "a job")
    finally:
        logs.job_id_var.reset(token)
    outside, inside = _lines(stream)
    assert outside["job_id"] is None and outside["task_id"] is None
    assert inside["job_id"] == "job-1" and inside["message"] == "inside a job"
    assert inside["level"] == "WARNING" and inside["logger"] == "rev.test.json"
    assert inside["time"].endswith("Z")


def test_json_lines_inside_a_celery_task(json_logger: Any) -> None:
    """task_prerun binds ``job_id`` from the task's argument; the request gives the task id."""
    from rev_tasks.celery import app

    logger, stream = json_logger

    @app.task(name="rev_tasks.tests.log_something", shared=False)
    def log_something(job_id: str, n: int) -> int:
        logger.info("working on %d", n)
        return n

    try:
        log_something.apply(args=("job-42", 7), task_id="task-7")
        log_something.apply(kwargs={"job_id": "job-43", "n": 8}, task_id="task-8")
    finally:
        app.tasks.pop("rev_tasks.tests.log_something", None)
    first, second = _lines(stream)
    assert (first["job_id"], first["task_id"]) == ("job-42", "task-7")
    assert first["task_name"] == "rev_tasks.tests.log_something"
    assert (second["job_id"], second["task_id"]) == ("job-43", "task-8")
    assert logs.job_id_var.get() is None  # task_postrun cleared it


def test_celery_worker_lines_name_the_task(json_logger: Any) -> None:
    logger, stream = json_logger
    logger.info("Task %(name)s[%(id)s] received", {"name": "rev_tasks.x", "id": "abc"})
    (line,) = _lines(stream)
    assert line["task_id"] == "abc" and line["task_name"] == "rev_tasks.x"


def test_coordinator_binds_the_job_id_for_one_request(json_logger: Any) -> None:
    from flask import Flask

    logger, stream = json_logger
    app = Flask("t")
    logs.init_app(app)

    @app.get("/v1/jobs/<job_id>")
    def job(job_id: str) -> dict[str, str]:
        logger.info("reading")
        return {"id": job_id}

    assert app.test_client().get("/v1/jobs/j-9").status_code == 200
    (line,) = _lines(stream)
    assert line["job_id"] == "j-9"
    assert logs.job_id_var.get() is None  # not left behind for the next request's lines


def test_json_logging_is_opt_in() -> None:
    assert not logs.json_enabled({})
    assert not logs.json_enabled({"REV_LOG_JSON": "0"})
    assert logs.json_enabled({"REV_LOG_JSON": "1"}) and logs.json_enabled({"REV_LOG_JSON": "true"})


# ----------------------------------------------------------------------------- traces
def test_tracing_needs_an_endpoint() -> None:
    assert not telemetry.enabled({})
    assert telemetry.enabled({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"})
    assert telemetry.enabled({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"})
    assert not telemetry.enabled(
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": "true"}
    )


def test_without_an_endpoint_nothing_is_set_up(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in telemetry.ENDPOINT_VARS:
        monkeypatch.delenv(name, raising=False)
    assert telemetry.setup_tracing("x") is None
    assert telemetry.init_worker_process() is False
    telemetry.shutdown()  # a no-op, never raises
