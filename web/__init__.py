"""The REV Farm coordinator: a Flask app factory with blueprints.

``create_app(config=None)`` builds the app; ``config`` overrides Flask settings and may
carry ``REV_SETTINGS`` (a :class:`rev_tasks.settings.Settings`), ``CELERY_APP`` and
``REV_RATE_LIMITER``. The coordinator validates requests, writes rows, enqueues after
commit and reads status from the database; it never runs a model and never waits on a task.
Authentication, rate limits and security headers: :mod:`web.security` (docs/security.md).
"""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask

from rev_tasks.settings import get_settings

log = logging.getLogger(__name__)


def create_app(config: dict[str, Any] | None = None) -> Flask:
    app = Flask(__name__)
    app.json.sort_keys = False  # type: ignore[attr-defined]  # documents read top-down
    if config:
        app.config.update(config)
    settings = app.config.setdefault("REV_SETTINGS", get_settings())
    # Bodies are small JSON documents: anything bigger is refused (413) before it is read.
    if app.config.get("MAX_CONTENT_LENGTH") is None:  # Flask's default is None: unlimited
        app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes

    celery_app = app.config.get("CELERY_APP")
    if celery_app is None:
        from rev_tasks.celery import app as celery_app
    app.extensions["rev_celery"] = celery_app

    from web.services import QueueInspector

    app.extensions["rev_inspector"] = QueueInspector(
        celery_app, settings.inspect_timeout, settings.inspect_cache_seconds, settings.redis_url
    )

    from web import credentials, errors, health, jobs, openapi, registry

    errors.register_error_handlers(app)
    app.register_blueprint(health.bp)
    app.register_blueprint(jobs.bp)
    app.register_blueprint(registry.bp)
    app.register_blueprint(credentials.bp)
    app.register_blueprint(openapi.bp)

    from web import certificates, reports

    app.register_blueprint(certificates.bp)
    reports.init_app(app)  # /ui pages: session cookie, CSRF (docs/certificates.md)

    if app.config.get("REV_METRICS", True):
        try:
            from rev_tasks import metrics
            from rev_tasks.queues import declared_queues

            queues = declared_queues(settings.gpu_count)
            metrics.init_app(app, redis_url=settings.redis_url, queues=queues)
        except Exception:  # noqa: BLE001 - the API works without /metrics
            log.warning("metrics disabled", exc_info=True)

    # Observability, both opt-in by environment: JSON log lines with the job id
    # (REV_LOG_JSON=1) and OpenTelemetry spans (OTEL_EXPORTER_OTLP_ENDPOINT).
    from rev_tasks import logs, telemetry

    logs.init_app(app)
    telemetry.init_flask(app)

    from web import security

    # Last: authentication, rate limits and security headers (docs/security.md). The
    # hooks registered above still run first, so metrics count 401/403/429 too.
    security.init_app(app)
    return app
