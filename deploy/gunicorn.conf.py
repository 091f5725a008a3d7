"""gunicorn settings for the coordinator: ``gunicorn -c deploy/gunicorn.conf.py 'web:create_app()'``.

Why these: sync workers because the coordinator only does short database work and never
waits on a task; ``forwarded_allow_ips`` because TLS ends at the reverse proxy on the
internal network (Flask must see ``https`` in ``X-Forwarded-Proto``); the two hooks keep
prometheus_client's multiprocess files honest across worker restarts.
"""

import os

bind = os.environ.get("GUNICORN_BIND", "0.0.0.0:8000")
workers = int(os.environ.get("WEB_CONCURRENCY", "4"))
worker_class = "sync"
timeout = int(os.environ.get("GUNICORN_TIMEOUT", "30"))
graceful_timeout = 30
keepalive = 5
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
