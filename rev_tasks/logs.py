"""Structured JSON logs (opt-in, ``REV_LOG_JSON=1``) carrying the job and task ids.

Why: a job crosses five kinds of task on several workers; grepping one job's story out of
interleaved text logs is guesswork. With ``REV_LOG_JSON=1`` every record is one JSON
object with ``job_id``, ``task_id`` and ``task_name`` (null outside a job or a task), so a
log pipeline can filter ``job_id == X`` across the coordinator and every worker.

Where the ids come from:

- ``task_id`` / ``task_name``: the current Celery task request (``celery._state``), read
  by :class:`ContextFilter` at the moment the record is made. Celery's own lines about a
  task ("Task … received/succeeded") carry the id in the record's arguments; the filter
  reads it from there when no task is current (the worker's main process).
- ``job_id``: a :data:`job_id_var` context variable. Celery's ``task_prerun`` sets it from
  a task argument named ``job_id`` (or ``model_id`` for fingerprinting), ``task_postrun``
  clears it; the coordinator sets it from the URL (``/v1/jobs/<job_id>``).

Plain text stays the default: nothing here changes logging unless the variable is set.
"""

from __future__ import annotations

import contextvars
import inspect
import logging
import os
import sys
from datetime import UTC, datetime
from typing import IO, TYPE_CHECKING, Any

from pythonjsonlogger.json import JsonFormatter as _BaseJsonFormatter

if TYPE_CHECKING:  # pragma: no cover - typing only
    from flask import Flask

JSON_ENV = "REV_LOG_JSON"

#: The job the current unit of work belongs to (a Celery task or an HTTP request).
job_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("rev_job_id", default=None)
#: The registered model a fingerprint task works on (its "job" is a model registration).
model_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "rev_model_id", default=None
)

_CONTEXT_ARGS = {"job_id": job_id_var, "model_id": model_id_var}
_TOKENS_ATTR = "_rev_log_tokens"


def json_enabled(environ: dict[str, str] | None = None) -> bool:
    """True when ``REV_LOG_JSON`` asks for JSON lines (1/true/yes/on)."""
    env = os.environ if environ is None else environ
    return env.get(JSON_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def _current_task_request() -> Any:
    """The executing Celery task's request, or None (never imports Celery itself)."""
    state = sys.modules.get("celery._state")
    if state is None:
        return None
    task = state.get_current_task()
    if task is None:
        return None
    request = getattr(task, "request", None)
    return request if getattr(request, "id", None) else None


class ContextFilter(logging.Filter):
    """Stamp ``job_id``, ``model_id``, ``task_id`` and ``task_name`` on every record.

    A filter, not formatter logic, so that any formatter (JSON or a text format using
    ``%(job_id)s``) can print them. It never drops a record.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        request = _current_task_request()
        task_id = getattr(request, "id", None) if request is not None else None
        task_name = getattr(request, "task", None) if request is not None else None
        if task_id is None and isinstance(record.args, dict):
            # Celery's worker lines ("Task %(name)s[%(id)s] received") pass a dict.
            task_id = record.args.get("id")
            task_name = task_name or record.args.get("name")
        record.task_id = task_id
        record.task_name = task_name
        record.job_id = job_id_var.get()
        record.model_id = model_id_var.get()
        return True


class JsonFormatter(_BaseJsonFormatter):
    """One JSON object per record: time, level, logger, message, process, ids, exception."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("json_ensure_ascii", False)
        super().__init__(*args, **kwargs)

    def add_fields(
        self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]
    ) -> None:
        super().add_fields(log_data, record, message_dict)
        log_data["time"] = (
            datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
        ).replace("+00:00", "Z")
        log_data["level"] = record.levelname
        log_data["logger"] = record.name
        log_data["process"] = record.process
        for key in ("job_id", "model_id", "task_id", "task_name"):
            log_data[key] = getattr(record, key, None)
        log_data.pop("color_message", None)


def json_handler(stream: IO[str] | None = None) -> logging.Handler:
    """A stream handler writing JSON lines with the context ids.

    The default stream is the process's stderr *object* as it is now: Celery later swaps
    ``sys.stderr`` for a proxy that logs, and writing through that would loop.
    """
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(ContextFilter())
    return handler


def configure_logging(
    level: int | str = logging.INFO,
    logfile: str | IO[str] | None = None,
) -> logging.Handler:
    """Send every log record through one JSON handler on the root logger.

    Replaces the root logger's handlers (so no record is printed twice, once as text) and
    lets Celery's own loggers propagate to it. ``logfile`` is a path or a stream (stderr
    by default). Returns the handler.
    """
    if isinstance(logfile, str):
        handler: logging.Handler = logging.FileHandler(logfile, encoding="utf-8")
        handler.setFormatter(JsonFormatter())
        handler.addFilter(ContextFilter())
    else:
        handler = json_handler(logfile)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    for name in ("celery", "celery.task", "celery.redirected", "celery.worker"):
        logger = logging.getLogger(name)
        logger.handlers = []
        logger.propagate = True
    return handler


# --------------------------------------------------------------------------- Celery
def _context_arguments(task: Any, args: Any, kwargs: Any) -> dict[str, str]:
    """``job_id``/``model_id`` argument values of a task call, found by parameter name."""
    found: dict[str, str] = {}
    kwargs = kwargs or {}
    try:
        params = list(inspect.signature(task.run).parameters)
    except (TypeError, ValueError):
        params = []
    for name in _CONTEXT_ARGS:
        value = kwargs.get(name)
        if value is None and name in params:
            index = params.index(name)
            if args is not None and index < len(args):
                value = args[index]
        if isinstance(value, str):
            found[name] = value
    return found


def on_task_prerun(task: Any = None, args: Any = None, kwargs: Any = None, **_: Any) -> None:
    """Celery ``task_prerun``: bind the task's job (or model) id to this context."""
    if task is None:
        return
    tokens = [
        (_CONTEXT_ARGS[name], _CONTEXT_ARGS[name].set(value))
        for name, value in _context_arguments(task, args, kwargs).items()
    ]
    setattr(task.request, _TOKENS_ATTR, tokens)


def on_task_postrun(task: Any = None, **_: Any) -> None:
    """Celery ``task_postrun``: forget the ids bound by :func:`on_task_prerun`."""
    if task is None:
        return
    for var, token in reversed(getattr(task.request, _TOKENS_ATTR, None) or []):
        try:
            var.reset(token)
        except ValueError:  # set in another context (should not happen): just clear it
            var.set(None)
    setattr(task.request, _TOKENS_ATTR, None)


def on_setup_logging(loglevel: int | None = None, logfile: Any = None, **_: Any) -> None:
    """Celery ``setup_logging`` (connected only with ``REV_LOG_JSON``): JSON instead of text."""
    configure_logging(loglevel or logging.INFO, logfile or None)


# --------------------------------------------------------------------------- Flask
def init_app(app: Flask) -> None:
    """Coordinator: JSON logs when asked, and the URL's job id in every request's records.

    The ids are bound for the request only (reset at teardown), so a line logged between
    requests is never stamped with the previous request's job.
    """
    from flask import g, request

    if json_enabled():
        configure_logging(logging.INFO)

    def _bind_job() -> None:
        view_args = request.view_args or {}
        tokens = []
        for name, var in _CONTEXT_ARGS.items():
            value = view_args.get(name)
            tokens.append((var, var.set(value if isinstance(value, str) else None)))
        g._rev_log_tokens = tokens

    def _unbind_job(_exc: BaseException | None) -> None:
        for var, token in reversed(g.pop("_rev_log_tokens", None) or []):
            try:
                var.reset(token)
            except ValueError:  # bound in another context: just clear it
                var.set(None)

    app.before_request(_bind_job)
    app.teardown_request(_unbind_job)
