"""Farm configuration from the environment, read once per process.

Every process of the farm (web, workers, beat, the stack script) builds the same
:class:`Settings` from the same variables, so a deployment is described by its environment
alone. Nothing here imports Celery, Flask, SQLAlchemy or torch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from rev_tasks import queues

DEFAULT_API_URL = "http://127.0.0.1:8000"
VALIDATORS = 5
QUORUM = 4
REEXEC_SAMPLE = 2


def _int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise ValueError(f"{name} must be an integer, not {raw!r}") from exc


def _float(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError as exc:
        raise ValueError(f"{name} must be a number, not {raw!r}") from exc


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _list(raw: str, sep: str = ",") -> list[str]:
    return [part.strip() for part in raw.split(sep) if part.strip()]


def _path_or_none(name: str) -> Path | None:
    raw = os.environ.get(name, "").strip()
    return Path(raw).expanduser() if raw else None


@dataclass(frozen=True)
class Settings:
    """Everything a farm process needs to know about its deployment."""

    var_dir: Path
    database_url: str
    redis_url: str
    model_roots: tuple[Path, ...]
    secret_key_file: Path
    max_models_per_worker: int = 2
    # REV_GPU_COUNT: the inference.cudaN queues this farm declares (every process of a farm
    # must agree: the queues are declared, not created on use). 0: a CPU-only farm.
    gpu_count: int = 0
    fingerprint_challenges: int = 256
    default_batch_size: int = 8
    job_time_limit: int = 3600
    worker_device: str = "cpu"
    worker_max_memory_kb: int = 6_000_000
    # REV_MEMORY_BUDGET_MB: stream layers within this many MiB unless a job names its own
    # budget (docs/streaming.md); None loads models in memory.
    memory_budget_mb: int | None = None
    required_queues: tuple[str, ...] = queues.CPU_WORKER_QUEUES
    inspect_timeout: float = 1.0
    inspect_cache_seconds: float = 5.0
    max_attempts: int = 5
    # REV_IDENTIFY_WAIT_SECONDS: how long an identify job waits, queued, for the pending
    # fingerprints of models registered before it; past it they are listed unavailable.
    identify_wait_seconds: float = 600.0
    # REV_IDENTIFY_POLL_SECONDS: how often the waiting job looks again (a prepare sent with
    # this countdown; no worker process sleeps meanwhile).
    identify_poll_seconds: float = 2.0
    visibility_timeout_override: int | None = None
    # --- the watchdog (rev_tasks/ops/watchdog.py, docs/operations.md)
    # a running job's worker writes jobs.heartbeat_at this often
    heartbeat_seconds: float = 30.0
    # the beat task runs this often
    watchdog_interval: float = 60.0
    # a running job whose heartbeat is older than this has lost its worker
    watchdog_stale_seconds: float = 180.0
    # a queued job with no message in the broker for this long has lost its message
    watchdog_grace_seconds: float = 120.0
    # resumes before a job that keeps losing its work fails with ``lost``
    watchdog_max_resumes: int = 3
    # a pooled database connection idle this long is pinged before use (rev_tasks/db/session.py)
    db_ping_idle_seconds: float = 5.0
    # --- security (docs/security.md)
    rate_limit_rps: float = 100.0
    rate_limit_burst: int = 200
    # requests without a valid key (probes, 401s, pages before login): one bucket per client IP
    anon_rate_limit_rps: float = 20.0
    anon_rate_limit_burst: int = 100
    # peers whose X-Real-IP names the client (the reverse proxy): addresses or CIDR blocks
    trusted_proxies: tuple[str, ...] = ()
    # an authenticated key is cached this long per process: the bound on revocation
    apikey_cache_seconds: float = 1.0
    max_body_bytes: int = 1 << 20
    max_model_bytes: int = 20_000_000_000
    max_model_files: int = 10_000
    # config.json / generation_config.json of a model: read by the coordinator, so capped
    max_config_bytes: int = 4 << 20
    allow_pickle: bool = False
    hsts: bool = False
    # --- endpoint jobs (docs/endpoints.md "On the farm"): politeness shared in Redis
    # requests in flight at one endpoint (host:port) across all workers
    endpoint_concurrency: int = 4
    # requests per second to one endpoint across all workers (0: no rate limit)
    endpoint_rate: float = 20.0
    # seconds per request (read); connecting gets at most 5 s
    endpoint_timeout: float = 30.0
    # retries of one request (connection errors, 429, 5xx) before the job fails
    endpoint_max_retries: int = 4
    # a job's token budget (prompt + completion) unless the job names a smaller one
    endpoint_max_tokens: int = 200_000
    # --- certificates and browser sessions (docs/certificates.md); None: under var_dir
    cert_key_file: Path | None = None
    session_key_file: Path | None = None

    @property
    def visibility_timeout(self) -> int:
        """Redis redelivers unacked messages after this: it must exceed the longest job.

        ``REV_VISIBILITY_TIMEOUT`` overrides it for the fault-injection tests, which kill
        workers with SIGKILL and need the lost delivery back in seconds, not hours.
        """
        if self.visibility_timeout_override:
            return self.visibility_timeout_override
        return max(2 * self.job_time_limit, self.job_time_limit + 3600)

    @property
    def gpu_queues(self) -> list[str]:
        return queues.gpu_queues(self.gpu_count)

    @classmethod
    def from_env(cls) -> Settings:
        var_dir = Path(os.environ.get("REV_VAR_DIR") or Path.cwd() / "var").resolve()
        roots_raw = os.environ.get("REV_MODEL_ROOTS", "")
        roots = tuple(Path(r).expanduser().resolve() for r in _list(roots_raw, os.pathsep)) or (
            var_dir / "models",
        )
        key_file = os.environ.get("REV_SECRET_KEY_FILE") or str(var_dir / "secret.key")
        from rev_tasks.inference.budget import budget_from_env

        device = os.environ.get("REV_WORKER_DEVICE", "cpu").strip() or "cpu"
        if device not in {"cpu", "cuda"}:
            raise ValueError(f"REV_WORKER_DEVICE must be cpu or cuda, not {device!r}")
        required = (
            tuple(_list(os.environ.get("REV_REQUIRED_QUEUES", ""))) or queues.CPU_WORKER_QUEUES
        )
        return cls(
            var_dir=var_dir,
            database_url=os.environ.get("DATABASE_URL") or f"sqlite:///{var_dir / 'rev.db'}",
            redis_url=os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0",
            model_roots=roots,
            secret_key_file=Path(key_file).expanduser(),
            max_models_per_worker=max(1, _int("REV_MAX_MODELS_PER_WORKER", 2)),
            gpu_count=max(0, _int("REV_GPU_COUNT", 0)),
            fingerprint_challenges=min(4096, max(1, _int("REV_FINGERPRINT_CHALLENGES", 256))),
            default_batch_size=min(256, max(1, _int("REV_BATCH_SIZE", 8))),
            job_time_limit=max(1, _int("REV_JOB_TIME_LIMIT", 3600)),
            worker_device=device,
            worker_max_memory_kb=max(0, _int("REV_WORKER_MAX_MEMORY_KB", 6_000_000)),
            memory_budget_mb=budget_from_env(None),
            required_queues=required,
            inspect_timeout=_float("REV_INSPECT_TIMEOUT", 1.0),
            inspect_cache_seconds=_float("REV_INSPECT_CACHE_SECONDS", 5.0),
            max_attempts=max(1, _int("REV_MAX_ATTEMPTS", 5)),
            identify_wait_seconds=max(0.0, _float("REV_IDENTIFY_WAIT_SECONDS", 600.0)),
            identify_poll_seconds=max(0.1, _float("REV_IDENTIFY_POLL_SECONDS", 2.0)),
            visibility_timeout_override=_int("REV_VISIBILITY_TIMEOUT", 0) or None,
            db_ping_idle_seconds=_float("REV_DB_PING_IDLE_SECONDS", 5.0),
            heartbeat_seconds=max(0.1, _float("REV_HEARTBEAT_SECONDS", 30.0)),
            watchdog_interval=max(0.5, _float("REV_WATCHDOG_INTERVAL", 60.0)),
            watchdog_stale_seconds=max(1.0, _float("REV_WATCHDOG_STALE_SECONDS", 180.0)),
            watchdog_grace_seconds=max(1.0, _float("REV_WATCHDOG_GRACE_SECONDS", 120.0)),
            watchdog_max_resumes=max(0, _int("REV_WATCHDOG_MAX_RESUMES", 3)),
            rate_limit_rps=max(0.0, _float("REV_RATE_LIMIT_RPS", 100.0)),
            rate_limit_burst=max(1, _int("REV_RATE_LIMIT_BURST", 200)),
            anon_rate_limit_rps=max(0.0, _float("REV_ANON_RATE_LIMIT_RPS", 20.0)),
            anon_rate_limit_burst=max(1, _int("REV_ANON_RATE_LIMIT_BURST", 100)),
            trusted_proxies=tuple(_list(os.environ.get("REV_TRUSTED_PROXIES", ""))),
            apikey_cache_seconds=max(0.0, _float("REV_APIKEY_CACHE_SECONDS", 1.0)),
            max_body_bytes=max(1024, _int("REV_MAX_BODY_BYTES", 1 << 20)),
            max_model_bytes=max(1, _int("REV_MAX_MODEL_BYTES", 20_000_000_000)),
            max_model_files=max(1, _int("REV_MAX_MODEL_FILES", 10_000)),
            max_config_bytes=max(1024, _int("REV_MAX_CONFIG_BYTES", 4 << 20)),
            allow_pickle=os.environ.get("REV_ALLOW_PICKLE", "").strip() == "1",
            hsts=_flag("REV_HSTS"),
            endpoint_concurrency=max(1, _int("REV_ENDPOINT_CONCURRENCY", 4)),
            endpoint_rate=max(0.0, _float("REV_ENDPOINT_RATE", 20.0)),
            endpoint_timeout=max(0.1, _float("REV_ENDPOINT_TIMEOUT", 30.0)),
            endpoint_max_retries=max(0, _int("REV_ENDPOINT_MAX_RETRIES", 4)),
            endpoint_max_tokens=max(1, _int("REV_ENDPOINT_MAX_TOKENS", 200_000)),
            cert_key_file=_path_or_none("REV_CERT_KEY_FILE") or var_dir / "certificate.key",
            session_key_file=_path_or_none("REV_SESSION_KEY_FILE") or var_dir / "session.key",
        )


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings (cached: the environment is read once)."""
    return Settings.from_env()


def reset_settings() -> None:
    """Forget the cached settings (tests change the environment between cases)."""
    get_settings.cache_clear()


def api_url() -> str:
    """Where the CLI client finds the coordinator: ``REV_API_URL``, else the local one.

    The local coordinator listens on ``REV_PORT`` (``make up``), so the default follows it.
    """
    explicit = os.environ.get("REV_API_URL", "").strip()
    if explicit:
        return explicit.rstrip("/")
    port = os.environ.get("REV_PORT", "").strip()
    if not port:
        return DEFAULT_API_URL
    if not port.isdigit():
        raise ValueError(f"REV_PORT must be a port number, not {port!r}")
    return f"http://127.0.0.1:{int(port)}"
