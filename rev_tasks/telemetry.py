"""OpenTelemetry traces of the coordinator (Flask) and the workers (Celery), opt-in.

Why opt-in: most deployments have no collector, and an exporter without one retries,
logs connection errors and costs a thread per process. So nothing here even imports
OpenTelemetry unless ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or the traces-only
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) is set, and ``OTEL_SDK_DISABLED=true`` turns it off
again. With an endpoint, spans go out as OTLP/HTTP protobuf (``<endpoint>/v1/traces``) via
a batch processor; the standard ``OTEL_*`` variables (service name, resource attributes,
headers, batch delays) apply as the SDK documents them.

Where it is wired:

- coordinator: :func:`init_flask` from ``create_app`` (each gunicorn worker builds its own
  app after the fork, so each has its own export thread). It also instruments the Celery
  producer side, so the task messages carry the request's trace context.
- workers: :func:`init_worker_process` from ``worker_process_init``, i.e. in each prefork
  child after the fork: an export thread started in the parent would not survive it.
  :func:`shutdown` from ``worker_process_shutdown`` flushes what is left.

The packages come from the ``otel`` extra (``make setup`` installs it). An endpoint set
without them is reported once as a warning, and the farm runs untraced.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover - typing only
    from flask import Flask

log = logging.getLogger(__name__)

ENDPOINT_VARS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
COORDINATOR_SERVICE = "rev-coordinator"
WORKER_SERVICE = "rev-worker"

_lock = threading.Lock()
_provider: Any = None
_pid: int | None = None
_celery_instrumented = False


def enabled(environ: dict[str, str] | None = None) -> bool:
    """True when an OTLP endpoint is configured and the SDK is not disabled."""
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    return any(env.get(name, "").strip() for name in ENDPOINT_VARS)


def setup_tracing(service_name: str) -> Any:
    """The process's tracer provider exporting OTLP/HTTP, created once per process.

    Returns None when tracing is not enabled or the packages are missing. A provider
    inherited through ``fork`` is not reused: its export thread did not come along.
    """
    global _provider, _pid
    if not enabled():
        return None
    with _lock:
        if _provider is not None and _pid == os.getpid():
            return _provider
        try:
            from opentelemetry import trace
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
        except ImportError as exc:
            log.warning(
                "OTEL_EXPORTER_OTLP_ENDPOINT is set but OpenTelemetry is not installed "
                "(install the 'otel' extra): %s",
                exc,
            )
            return None
        attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {"service.name": service_name}
        provider = TracerProvider(resource=Resource.create(attributes))
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        # The global provider can be set once per process; a forked child keeps the
        # parent's (dead-threaded) one as global, so instrumentations get ours explicitly.
        if _pid is None:
            trace.set_tracer_provider(provider)
        _provider, _pid = provider, os.getpid()
        log.info("OpenTelemetry: exporting spans of %s over OTLP/HTTP", service_name)
        return provider


def _instrument_celery(provider: Any) -> None:
    """Celery signal instrumentation (producer and consumer spans, context propagation)."""
    global _celery_instrumented
    from opentelemetry.instrumentation.celery import CeleryInstrumentor

    instrumentor = CeleryInstrumentor()
    if _celery_instrumented or instrumentor.is_instrumented_by_opentelemetry:
        instrumentor.uninstrument()
    instrumentor.instrument(tracer_provider=provider)
    _celery_instrumented = True


def init_flask(app: Flask) -> bool:
    """Trace the coordinator's requests and the task messages it sends; True if on."""
    provider = setup_tracing(COORDINATOR_SERVICE)
    if provider is None:
        return False
    try:
        from opentelemetry.instrumentation.flask import FlaskInstrumentor

        FlaskInstrumentor().instrument_app(app, tracer_provider=provider)
        _instrument_celery(provider)
    except Exception:  # noqa: BLE001 - tracing must never stop the API
        log.warning("OpenTelemetry instrumentation of the coordinator failed", exc_info=True)
        return False
    return True


def init_worker_process() -> bool:
    """Trace the tasks this (forked) worker child runs; True if on."""
    provider = setup_tracing(os.environ.get("OTEL_SERVICE_NAME") or WORKER_SERVICE)
    if provider is None:
        return False
    try:
        _instrument_celery(provider)
    except Exception:  # noqa: BLE001 - tracing must never stop a worker
        log.warning("OpenTelemetry instrumentation of the worker failed", exc_info=True)
        return False
    return True


def shutdown(timeout_ms: int = 5000) -> None:
    """Flush and stop this process's exporter (a no-op when tracing is off)."""
    global _provider, _pid
    with _lock:
        provider, pid = _provider, _pid
        if provider is None or pid != os.getpid():
            return
        _provider = None
    try:
        provider.force_flush(timeout_ms)
        provider.shutdown()
    except Exception:  # noqa: BLE001 - shutting down must not raise
        log.debug("OpenTelemetry shutdown failed", exc_info=True)
