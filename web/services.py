"""Coordinator services: path confinement, device/queue choice, enqueueing, serialisation.

The coordinator never runs a model and never waits on a task: it validates, writes rows,
enqueues after the commit, and reads status back from the database.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rev_tasks import queues
from rev_tasks.db.session import after_commit
from rev_tasks.db.tables import EndpointFingerprint, Fingerprint, Job, ModelRecord, iso
from rev_tasks.inference.guard import within
from rev_tasks.settings import Settings
from web.errors import Conflict, ServiceUnavailable, Unprocessable

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- paths
def _resolve(path: Path) -> Path:
    try:
        return path.resolve(strict=False)
    except (OSError, RuntimeError, ValueError) as exc:  # loops, NUL bytes, names too long
        raise Unprocessable(
            f"path {str(path)!r} cannot be resolved", code="path_not_found"
        ) from exc


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except (OSError, ValueError):
        return False


def confine(raw: str, roots: tuple[Path, ...]) -> Path:
    """Resolve ``raw`` (symlinks included) and insist it lies under one of the model roots.

    Relative paths are taken relative to each root in turn. The resolved path is what is
    stored, so a symlink swapped later cannot redirect a queued job outside the roots (and
    the worker checks the folder again before it loads anything).
    """
    if "\x00" in raw:
        raise Unprocessable("path contains a NUL byte", code="path_not_found")
    try:
        base = Path(raw).expanduser() if raw.startswith("~") else Path(raw)
    except (RuntimeError, KeyError, ValueError, OSError) as exc:
        # ~nosuchuser (RuntimeError: no such home), an unencodable user name (ValueError)
        raise Unprocessable(
            f"path {raw[:200]!r} names no home folder", code="path_not_found"
        ) from exc
    candidates = [base] if base.is_absolute() else [root / raw for root in roots]
    for cand in candidates:
        real = _resolve(cand)
        if within(real, roots):
            if not _exists(real):
                continue
            return real
    for cand in candidates:
        if not within(_resolve(cand), roots):
            raise Unprocessable(
                f"path {raw!r} is outside the model roots", code="path_outside_roots"
            )
    raise Unprocessable(f"path {raw!r} does not exist", code="path_not_found")


def check_model_folder(path: Path, settings: Settings) -> None:
    """The worker's own checks, run early so that a bad folder fails at submit with a 422.

    config/weights/tokenizer and the pickle rule, then confinement of every file (symlinks
    inside the folder included), the size and file count caps, no FIFOs or devices.
    The worker repeats all of it before loading: this check is for the user's benefit.
    """
    from rev_tasks.inference.guard import (
        ModelTooLarge,
        PathOutsideRoots,
        inspect_configured,
    )
    from rev_tasks.inference.loader import ModelLoadError, UnsafeWeightsError
    from rev_tasks.inference.loader import check_model_folder as _check

    try:
        # The cheap stat checks first: a folder that is plainly not a model (a root itself,
        # say) is refused before anything walks it.
        _check(path, allow_pickle=settings.allow_pickle)
        inspect_configured(path, settings)
        read_model_config(path, settings)
    except PathOutsideRoots as exc:
        raise Unprocessable(str(exc), code="path_outside_roots") from exc
    except ModelTooLarge as exc:
        raise Unprocessable(str(exc), code="model_too_large") from exc
    except UnsafeWeightsError as exc:
        raise Unprocessable(str(exc), code="unsafe_weights") from exc
    except ModelLoadError as exc:
        raise Unprocessable(str(exc), code="not_a_model") from exc


def read_model_config(path: Path, settings: Settings) -> dict[str, Any]:
    """The folder's ``config.json``, read through the size and depth caps (a 422 otherwise).

    The only model file the coordinator parses: a sparse 1 GiB file or a 200,000-deep one
    is refused here (``invalid_config``) instead of taking a worker's memory or stack.
    """
    from rev_tasks import boundedjson

    try:
        config = boundedjson.load_file(path / "config.json", max_bytes=settings.max_config_bytes)
    except OSError as exc:
        raise Unprocessable(
            f"cannot read config.json in {path}: {exc.strerror}", code="invalid_config"
        ) from exc
    except ValueError as exc:  # JSONLimitError, malformed JSON, bad UTF-8
        raise Unprocessable(
            f"invalid config.json in {path}: {str(exc)[:200]}", code="invalid_config"
        ) from exc
    if not isinstance(config, dict):
        raise Unprocessable(f"invalid config.json in {path}: not an object", code="invalid_config")
    return config


def check_streamable(paths: list[str]) -> None:
    """A job with ``memory_budget_mb`` runs its models layer-streamed: refuse, with a 422,
    architectures the streamed engine does not execute rather than fail the job later."""
    from rev_tasks.inference.budget import streaming_refusal

    for path in paths:
        reason = streaming_refusal(path)
        if reason is not None:
            raise Unprocessable(
                f"{reason}; submit without memory_budget_mb to load it in memory",
                code="streaming_unsupported",
            )


def model_path(raw: str, settings: Settings) -> str:
    path = confine(raw, settings.model_roots)
    check_model_folder(path, settings)
    return str(path)


# ----------------------------------------------------------------------------- queues
class QueueInspector:
    """Which queues have a live consumer, from ``inspect().active_queues()``, cached.

    A broadcast costs the full inspect timeout (it waits for every worker's reply), so a
    submit never waits for one once an answer exists: a stale answer is returned at once
    and refreshed in a background thread (stale-while-revalidate). Only the first call, or
    ``refresh=True``, blocks. A worker that just died may still be listed for about ``ttl``
    seconds, which a job survives (its message waits until a worker for that queue is back).

    Readiness cannot live with that: ``live(max_age=ttl)`` never answers with a census
    older than ``max_age`` and takes a new one instead. With ``redis_url`` every census is
    also shared through Redis (:data:`CENSUS_KEY`, with the time it was taken), and each
    coordinator process uses the newest one any of them took: a stopped worker reads as
    gone in every process within one census interval, and the processes between them run
    about one broadcast per interval, not one each.
    """

    #: Where the newest census lives in Redis: ``{"at": unix time, "queues": {name: n}}``.
    CENSUS_KEY = "rev:worker-census"

    def __init__(
        self, celery_app: Any, timeout: float, ttl: float, redis_url: str | None = None
    ) -> None:
        self.app = celery_app
        self.timeout = timeout
        self.ttl = ttl
        self._lock = threading.Lock()
        self._at: float | None = None
        self._refreshing = False
        self._queues: dict[str, int] = {}
        self._redis_url = redis_url
        self._redis: Any = None

    def _shared(self) -> Any:
        """The Redis client of the shared census, made on first use: importing redis (8.x)
        imports OpenTelemetry when it is installed, which a coordinator without an OTLP
        endpoint must not do at start."""
        if self._redis is None and self._redis_url:
            import redis

            self._redis = redis.Redis.from_url(
                self._redis_url, socket_timeout=0.5, socket_connect_timeout=0.5
            )
        return self._redis

    def live(self, refresh: bool = False, max_age: float | None = None) -> dict[str, int]:
        """Queue name → number of live workers consuming it.

        ``max_age``: seconds; an older census is not served (a new one is taken).
        """
        with self._lock:
            if not refresh:
                self._adopt_shared()
            age = None if self._at is None else time.time() - self._at
            too_old = max_age is not None and (age is None or age > max_age)
            if refresh or age is None or too_old:
                self._store(self._inspect())
                return dict(self._queues)
            if age > self.ttl and not self._refreshing:
                self._refreshing = True
                threading.Thread(target=self._refresh, name="queue-inspector", daemon=True).start()
            return dict(self._queues)

    def _store(self, queues: dict[str, int], at: float | None = None) -> None:
        self._queues = queues
        self._at = time.time() if at is None else at
        if at is None:
            self._share()

    def _refresh(self) -> None:
        queues = self._inspect()
        with self._lock:
            self._store(queues)
            self._refreshing = False

    def _share(self) -> None:
        if not self._redis_url:
            return
        doc = json.dumps({"at": self._at, "queues": self._queues})
        try:
            self._shared().set(self.CENSUS_KEY, doc, ex=max(60, int(10 * self.ttl)))
        except Exception as exc:  # noqa: BLE001 - the census still serves this process
            log.debug("census not shared: %s", exc)

    def _adopt_shared(self) -> None:
        """Take the census another process stored, when it is newer than this one's."""
        if not self._redis_url:
            return
        try:
            raw = self._shared().get(self.CENSUS_KEY)
            doc = json.loads(raw) if raw else None
            at, queues = float(doc["at"]), {str(k): int(v) for k, v in doc["queues"].items()}
        except Exception:  # noqa: BLE001 - no shared census (or Redis down): keep our own
            return
        if self._at is None or at > self._at:
            self._store(queues, at)

    def _inspect(self) -> dict[str, int]:
        try:
            replies = self.app.control.inspect(timeout=self.timeout).active_queues() or {}
        except Exception as exc:  # noqa: BLE001 - broker down: no live workers
            log.warning("cannot inspect workers: %s", exc)
            return {}
        queues: dict[str, int] = {}
        for worker_queues in replies.values():
            for q in worker_queues or []:
                name = q.get("name") if isinstance(q, dict) else None
                if name:
                    queues[name] = queues.get(name, 0) + 1
        return queues


def choose_queue(device: str, live: dict[str, int], backlog: dict[str, int]) -> tuple[str, str]:
    """(device, queue) for a job: a GPU queue only when a GPU worker is alive.

    ``cuda`` without a live GPU worker is refused (409); ``auto`` falls back to the CPU.
    Among live GPU queues the one with the shortest backlog wins (ties: lowest index).
    """
    gpu = sorted(
        (q for q in live if queues.is_gpu_queue(q)),
        key=lambda q: (backlog.get(q, 0), queues.gpu_index(q)),
    )
    if device == "cpu":
        return "cpu", queues.INFERENCE_CPU
    if device == "cuda":
        if not gpu:
            raise Conflict(
                "device 'cuda' was requested but no GPU worker is alive",
                code="no_gpu_worker",
            )
        return "cuda", gpu[0]
    return ("cuda", gpu[0]) if gpu else ("cpu", queues.INFERENCE_CPU)


def queue_backlog(redis_url: str, queues: list[str]) -> dict[str, int]:
    if not queues:
        return {}
    try:
        import redis

        client = redis.Redis.from_url(redis_url, socket_timeout=1.0, socket_connect_timeout=1.0)
        pipe = client.pipeline(transaction=False)
        for q in queues:
            pipe.llen(q)
        return dict(zip(queues, (int(n) for n in pipe.execute()), strict=True))
    except Exception:  # noqa: BLE001 - backlog only orders GPU queues
        return {}


def enqueue_after_commit(
    session: Any,
    celery_app: Any,
    task: str,
    args: list[Any],
    queue: str,
    on_failure: Callable[[], None],
    task_id: str | None = None,
) -> None:
    """Send one task once ``session`` commits; a broker failure becomes a 503.

    ``on_failure`` runs first, in a session of its own, to record that the row's work will
    never start (the committed row must not wait for a message that was never sent).

    ``ignore_result``: the coordinator never reads task results (status comes from the
    database). Without it Celery subscribes this process to the result channel of every
    task it sends; after a Redis outage that subscription's reconnect gives up for good
    ("The Celery application must be restarted") and every later submit would fail.
    """

    def send() -> None:
        try:
            celery_app.send_task(
                task,
                args=args,
                queue=queue,
                task_id=task_id,
                retry=True,
                retry_policy={"max_retries": 2},
                ignore_result=True,
            )
        except Exception as exc:
            log.error(
                "cannot enqueue %s on %s: %s: %s",
                task,
                queue,
                type(exc).__name__,
                exc,
                exc_info=True,
            )
            on_failure()
            raise ServiceUnavailable(
                "the task broker is unavailable", code="broker_unavailable"
            ) from exc

    after_commit(session, send)


def revoke_job_tasks(celery_app: Any, job_id: str) -> None:
    """Revoke a cancelled job's ``prepare`` and inference tasks, by their derived ids.

    Best effort (a broadcast to the workers up now, which discard the messages when they
    come): every task also finds the job cancelled in the database before it does anything,
    so a broker hiccup here only costs a no-op delivery later.
    """
    ids = [queues.prepare_task_id(job_id), queues.inference_task_id(job_id)]
    try:
        celery_app.control.revoke(ids)
    except Exception as exc:  # noqa: BLE001 - the cancel is committed; the tasks check it
        log.warning("job %s: cannot revoke its tasks: %s: %s", job_id, type(exc).__name__, exc)


# ----------------------------------------------------------------------------- documents
def job_document(job: Job) -> dict[str, Any]:
    return {
        "id": job.id,
        "tenant": job.tenant,
        "kind": job.kind,
        "status": job.status,
        "stage": job.stage,
        "device": job.device,
        "queue": job.queue,
        "request": job.request,
        "progress": {
            "challenges_done": job.challenges_done,
            "challenges_max": job.challenges_max,
            # An identify job waiting (queued) for pending fingerprints: which, until when.
            "waiting": _waiting(job.waiting),
        },
        "result": job.result,
        "error": job.error,
        "created_at": iso(job.created_at),
        "started_at": iso(job.started_at),
        "finished_at": iso(job.finished_at),
        "url": f"/v1/jobs/{job.id}",
        "transcript_url": f"/v1/jobs/{job.id}/transcript" if job.kind == "verify" else None,
    }


def check_credential(session: Any, tenant: str, name: str | None) -> None:
    """A job naming a credential the tenant does not have is a 422 at submit."""
    from rev_tasks.endpoints.access import credential_exists

    if not credential_exists(session, tenant, name):
        raise Unprocessable(f"no credential named {name!r}", code="credential_missing")


def endpoint_target(url: str) -> str:
    """Check an endpoint job's URL at submit (a 422 with the guard's reason); the public
    URL to store (no user info, query or fragment: a secret belongs in a credential)."""
    from urllib.parse import urlsplit

    from rev_tasks.endpoints.access import EndpointRefused, check_endpoint_url
    from rev_tasks.endpoints.client import _public_url, normalise_base_url

    parts = urlsplit(url)
    if parts.username is not None or parts.password is not None or parts.query or parts.fragment:
        raise Unprocessable(
            "endpoint URL must carry no user info, query or fragment (store an API key as a "
            "named credential)",
            code="endpoint_refused",
        )
    try:
        check_endpoint_url(url)
        return _public_url(normalise_base_url(url))
    except EndpointRefused as exc:
        raise Unprocessable(str(exc), code=exc.code) from exc


def endpoint_fingerprint_document(efp: EndpointFingerprint | None) -> dict[str, Any] | None:
    if efp is None:
        return None
    return {
        "status": efp.status,
        "key_id": efp.key_id,
        "challenges": efp.n_challenges,
        "error": efp.error,
    }


def _waiting(waiting: dict[str, Any] | None) -> dict[str, Any] | None:
    if not waiting:
        return None
    keys = ("for", "pending", "since", "until", "waited_s", "done")
    return {k: waiting.get(k) for k in keys}


def model_document(
    rec: ModelRecord, fp: Fingerprint | None, efp: EndpointFingerprint | None = None
) -> dict[str, Any]:
    return {
        "id": rec.id,
        "tenant": rec.tenant,
        "path": rec.path,
        "status": rec.status,
        "dtype": rec.dtype or "float32",
        "descriptor": rec.descriptor,
        "error": rec.error,
        "fingerprint": (
            {
                "key_id": fp.key_id,
                "challenges": fp.n_challenges,
                "bits": fp.bits,
                "sites": list(fp.sites),
                "created_at": iso(fp.created_at),
            }
            if fp is not None
            else None
        ),
        "endpoint_fingerprint": endpoint_fingerprint_document(efp),
        "created_at": iso(rec.created_at),
        "updated_at": iso(rec.updated_at),
        "url": f"/v1/models/{rec.id}",
    }


def settings_of(app: Any) -> Settings:
    return app.config["REV_SETTINGS"]
