"""gunicorn settings for the coordinator: ``gunicorn -c deploy/gunicorn.conf.py 'web:create_app()'``.

Why these: ``web.serving.BoundedThreadWorker`` (gunicorn's threaded worker with header
reading on the selector and a deadline on every read, see that module) because sync
workers, and plain gthread threads, are held by any client that sends slowly: three
unfinished header blocks made ``/healthz`` time out. Threads per worker stay within the
database pool (5 + 5 overflow per process). ``REV_HEADER_TIMEOUT`` (10 s) and
``REV_BODY_TIMEOUT`` (20 s) bound how long a request may take to arrive; the ``limit_*``
settings bound its request line and headers. ``forwarded_allow_ips`` because TLS ends at the reverse proxy on the
internal network (Flask must see ``https`` in ``X-Forwarded-Proto``); the two hooks keep
prometheus_client's multiprocess files honest across worker restarts.
"""

import os

bind = os.environ.get("GUNICORN_BIND", "0.0.0.0:8000")
workers = int(os.environ.get("WEB_CONCURRENCY", "4"))
worker_class = "web.serving.BoundedThreadWorker"
threads = int(os.environ.get("GUNICORN_THREADS", "4"))
worker_connections = 1000  # per worker: kept-alive plus header-reading connections
timeout = int(os.environ.get("GUNICORN_TIMEOUT", "30"))
graceful_timeout = 30
keepalive = 5
limit_request_line = 8190
limit_request_fields = 100
limit_request_field_size = 8190
max_requests = 10000  # recycle slowly growing workers; jitter avoids a thundering restart
max_requests_jitter = 1000
forwarded_allow_ips = os.environ.get("FORWARDED_ALLOW_IPS", "*")
accesslog = "-"
errorlog = "-"

# REV_LOG_JSON=1: gunicorn's own error and access lines become JSON too, in the same shape
# as the app's (rev_tasks/logs.py), so a log pipeline parses every line of the container.
if os.environ.get("REV_LOG_JSON", "").strip().lower() in {"1", "true", "yes", "on"}:
    logconfig_dict = {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": "rev_tasks.logs.JsonFormatter"}},
        "filters": {"context": {"()": "rev_tasks.logs.ContextFilter"}},
        "handlers": {
            "json": {
                "class": "logging.StreamHandler",
                "formatter": "json",
                "filters": ["context"],
                "stream": "ext://sys.stderr",
            }
        },
        "root": {"level": "INFO", "handlers": ["json"]},
        "loggers": {
            name: {"level": "INFO", "handlers": ["json"], "propagate": False, "qualname": name}
            for name in ("gunicorn.error", "gunicorn.access")
        },
    }


def on_starting(server):  # noqa: ARG001 - gunicorn hook signature
    """Wipe stale multiprocess files before any worker forks (prometheus_client docs)."""
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if path:
        os.makedirs(path, exist_ok=True)
        for name in os.listdir(path):
            if name.endswith(".db"):
                os.remove(os.path.join(path, name))


def child_exit(server, worker):  # noqa: ARG001 - gunicorn hook signature
    """Drop the dead worker's live gauges so they stop being summed in."""
    from rev_tasks.metrics import mark_process_dead

    mark_process_dead(worker.pid)
