"""Helpers for the integration tests: worker subprocesses, job polling, broker checks.

Processes, ports and the settings reset come from :mod:`rev_tasks.testing.harness`, shared
with the local stack and the benchmarks.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from rev_tasks.ops.memory import allocator_env
from rev_tasks.testing.harness import (
    ALL_QUEUES,
    ROOT,
    GroupProcess,
    applied_environment,
    backlog,
    declared_queues,
    node_name,
    queue_keys,
    wait_worker,
    worker_argv,
)

TERMINAL = {"succeeded", "failed", "cancelled"}
# A fixed test key (the farm's key file); the in-process comparison uses the same bytes.
TEST_KEY = bytes(range(100, 132))


def create_key(tenant: str, scopes: str, name: str = "test") -> str:
    """A new API key on the farm's DATABASE_URL (what `rev keys create` does); the token."""
    from rev_tasks import apikeys
    from rev_tasks.db.session import session_scope

    with session_scope() as s:
        _row, token = apikeys.create_key(s, tenant, scopes, name)
    return token


def authed_client(app: Any, token: str | None) -> Any:
    """A Flask test client that sends ``Authorization: Bearer <token>`` on every request."""
    client = app.test_client()
    if token is not None:
        client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {token}"
    return client


@contextlib.contextmanager
def farm_environment(
    redis_url: str,
    database_url: str,
    model_dirs: dict[str, Path],
    tmp_path_factory: Any,
    **extra: str,
) -> Iterator[dict[str, str]]:
    """The farm's environment, applied to this process (and restored after) for workers.

    Module fixtures use it so that tests outside tests/integration never see the farm's
    DATABASE_URL or key file; the chaos tests pass their own Redis, database URL (through
    a TCP proxy) and a short visibility timeout in ``extra``.
    """
    from rev_tasks.certificates import create_signing_key

    var = tmp_path_factory.mktemp("var")
    key_file = var / "secret.key"
    key_file.write_bytes(TEST_KEY)
    # The consensus workers sign published verdicts with it, as on the local stack.
    cert_key = var / "certificate.key"
    create_signing_key(cert_key)
    env = {
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "REV_MODEL_ROOTS": os.pathsep.join([str(model_dirs["root"]), str(model_dirs["minilm"])]),
        "REV_SECRET_KEY_FILE": str(key_file),
        "REV_CERT_KEY_FILE": str(cert_key),
        "REV_VAR_DIR": str(var),
        "REV_INSPECT_TIMEOUT": "0.5",
        "REV_INSPECT_CACHE_SECONDS": "1",
        "REV_FINGERPRINT_CHALLENGES": "64",
        "REV_MAX_MODELS_PER_WORKER": "3",
        "REV_METRICS_PORT": "0",
        "REV_ENABLE_FAULT_INJECTION": "",
        "REV_TEST_FAULTY_VALIDATORS": "",
        "REV_TEST_SLOW_BATCH_SECONDS": "",
        "REV_VISIBILITY_TIMEOUT": "",
        **extra,
    }
    empty_database(database_url)
    with applied_environment(env):
        purge(redis_url)
        yield env


def farm_env_fixture(**extra: str) -> Any:
    """A module-scoped ``farm_env`` fixture: :func:`farm_environment` with ``extra`` set.

    Applied to this process and passed to every worker, restored afterwards, so tests outside
    tests/integration never see the farm's DATABASE_URL or key file in their environment.
    The conftest's has no extras; a module whose workers all need other settings (fewer
    fingerprint challenges) defines its own with them.
    """

    @pytest.fixture(scope="module")
    def farm_env(
        redis_url: str, postgres_url: str, model_dirs: dict[str, Path], tmp_path_factory: Any
    ) -> Iterator[dict[str, str]]:
        with farm_environment(
            redis_url, postgres_url, model_dirs, tmp_path_factory, **extra
        ) as env:
            yield env

    return farm_env


def empty_database(database_url: str) -> None:
    """Every table emptied (the schema and its migration stamp kept).

    The session shares one migrated database; each module starts from none of the rows an
    earlier module left, so listings, key rings and counts see only their own.
    """
    import sqlalchemy as sa

    from rev_tasks.db.tables import Base

    names = ", ".join(f'"{t.name}"' for t in Base.metadata.sorted_tables)
    engine = sa.create_engine(database_url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text(f"TRUNCATE {names} RESTART IDENTITY CASCADE"))
    finally:
        engine.dispose()


def purge(redis_url: str) -> None:
    """Delete every declared queue's keys and the unacked bookkeeping (test teardown)."""
    import redis

    r = redis.Redis.from_url(redis_url)
    for q in declared_queues():
        r.delete(*queue_keys(q))
    r.delete("unacked", "unacked_index")


def assert_drained(redis_url: str, timeout: float = 20.0) -> None:
    """LLEN of each queue key is 0, nothing unacked, no chord counter left.

    Checked twice in a row half a second apart, so a message caught between the queue and
    the unacked table is not mistaken for an empty broker.
    """
    deadline = time.monotonic() + timeout
    clean = 0
    while True:
        busy = {k: v for k, v in backlog(redis_url).items() if v}
        clean = 0 if busy else clean + 1
        if clean >= 2:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"broker not drained: {busy}")
        time.sleep(0.5)


# ----------------------------------------------------------------------------- workers
class FarmWorker:
    """One ``celery -A rev_tasks worker`` subprocess in its own process group."""

    def __init__(
        self,
        env: dict[str, str],
        log_dir: Path,
        queues: str = ALL_QUEUES,
        name: str = "w",
        command: list[str] | None = None,
        preexec_fn: Callable[[], None] | None = None,
    ) -> None:
        self.name = node_name(f"revtest-{name}")
        self.queues = queues
        self.command = command
        self.preexec_fn = preexec_fn  # runs in the child before exec, e.g. a memory limit
        # what `rev worker` starts: jemalloc preloaded when installed (REV_WORKER_ALLOCATOR)
        self.env = allocator_env({**os.environ, **env})
        self.log_path = log_dir / f"{self.name.split('@')[0]}.log"
        self.proc: GroupProcess | None = None

    def start(self, timeout: float = 180.0) -> FarmWorker:
        cmd = worker_argv(self.queues, self.name)
        if self.command is not None:  # e.g. `rev worker --gpu 0`, which execs celery itself
            cmd = [*self.command, "-n", self.name]
        self.proc = GroupProcess(
            self.name, cmd, self.env, self.log_path, preexec_fn=self.preexec_fn
        )
        try:
            wait_worker(self.proc, self.name, timeout)
        except RuntimeError:
            self.stop()
            raise
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.alive()

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL the whole worker (main process and pool children): a lost node.

        Nothing is acked or restored on the way down: the message the worker held stays in
        Redis's ``unacked`` table until the visibility timeout hands it to another worker.
        """
        if self.proc is None:
            return
        self.proc.kill()
        self.proc = None

    def children(self) -> list[int]:
        """Pids of the prefork pool's children (the processes that run tasks)."""
        import psutil

        if self.proc is None:
            return []
        try:
            return [c.pid for c in psutil.Process(self.proc.pid).children()]
        except psutil.NoSuchProcess:
            return []

    def kill_child(self) -> int:
        """SIGKILL the pool child running the task (the OOM killer's way); returns its pid.

        The main process sees the child die, rejects the message with requeue
        (``task_reject_on_worker_lost``) and forks a new child.
        """
        pids = self.children()
        assert pids, "the worker has no pool child"
        with contextlib.suppress(ProcessLookupError):
            os.kill(pids[0], signal.SIGKILL)
        return pids[0]

    def stop(self, timeout: float = 30.0) -> None:
        """Warm shutdown (SIGTERM to the group), then SIGKILL whatever is left."""
        if self.proc is None:
            return
        self.proc.stop(timeout)
        self.proc = None


def worker_fixture(name: str) -> Any:
    """A module-scoped ``worker`` fixture: one worker on every queue (``start_worker``).

    ``name`` names its log and its Celery node, so that a failing module's worker is found.
    """

    @pytest.fixture(scope="module")
    def worker(start_worker: Any) -> Iterator[FarmWorker]:
        w = start_worker(name=name)
        yield w
        w.stop()

    return worker


def api_url_fixture() -> Any:
    """A module-scoped ``api_url`` fixture: the test app over real HTTP, for the ``rev`` client.

    The Flask test client has no port; the CLI needs one (a werkzeug server thread).
    """

    @pytest.fixture(scope="module")
    def api_url(app: Any) -> Iterator[str]:
        from werkzeug.serving import make_server

        server = make_server("127.0.0.1", 0, app, threaded=True)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        yield f"http://127.0.0.1:{server.server_port}"
        server.shutdown()

    return api_url


def wait_job(client: Any, job_id: str, timeout: float = 300.0) -> dict[str, Any]:
    """Poll GET /v1/jobs/<id> until it is finished (TERMINAL); return the document."""
    deadline = time.monotonic() + timeout
    doc: dict[str, Any] = {}
    while time.monotonic() < deadline:
        resp = client.get(f"/v1/jobs/{job_id}")
        assert resp.status_code == 200, resp.get_json()
        doc = resp.get_json()
        if doc["status"] in TERMINAL:
            return doc
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} did not finish in {timeout}s: {doc}")


def wait_certificate(client: Any, job_id: str, timeout: float = 60.0) -> bytes:
    """The job's certificate file once it is signed (an identify job's comes just after)."""
    deadline = time.monotonic() + timeout
    while True:
        resp = client.get(f"/v1/jobs/{job_id}/certificate")
        if resp.status_code == 200:
            return bytes(resp.data)
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id}: no certificate in {timeout}s: {resp.get_json()}")
        time.sleep(0.3)


def submit(client: Any, body: dict[str, Any]) -> str:
    resp = client.post("/v1/jobs", json=body)
    assert resp.status_code == 202, resp.get_json()
    doc = resp.get_json()
    assert doc["status"] == "queued" and doc["url"] == f"/v1/jobs/{doc['id']}"
    return doc["id"]


def register(
    client: Any,
    model_id: str,
    path: Path,
    timeout: float = 300.0,
    fields: dict[str, Any] | None = None,
    new: bool = False,
) -> dict[str, Any]:
    """Register a model and wait until its fingerprint is ready (or it failed).

    ``fields`` adds to the request body (``endpoint_evidence``: the model's status stays
    pending until its endpoint fingerprint is computed too). ``new``: the model must not
    exist yet (202, every fingerprint the request asks for still pending), not 409.
    """
    body = {"id": model_id, "path": str(path), **(fields or {})}
    resp = client.post("/v1/models", json=body)
    assert resp.status_code in ((202,) if new else (202, 409)), resp.get_json()
    if new and fields and fields.get("endpoint_evidence"):
        assert resp.get_json()["endpoint_fingerprint"]["status"] == "pending", resp.get_json()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        doc = client.get(f"/v1/models/{model_id}").get_json()
        if doc["status"] != "pending":
            return doc
        time.sleep(0.3)
    raise AssertionError(f"model {model_id} still pending after {timeout}s")


def rev_verify(
    reference: Path,
    candidate: Path,
    key_file: str,
    env: dict[str, str] | None = None,
    **params: Any,
) -> dict[str, Any]:
    """The ``rev verify`` path (the CLI, in-process engine, no farm): same pair, same key.

    ``env`` adds to this process's environment (e.g. ``OMP_NUM_THREADS``).
    """
    cmd = [
        sys.executable, "-m", "rev_tasks.cli", "verify", str(reference), str(candidate),
        "--key-file", key_file, "--json",
        "--tolerance", str(params.get("tolerance", "exact")),
        "--alpha", str(params.get("alpha", 0.01)),
        "--max-challenges", str(params.get("max_challenges", 64)),
        "--batch-size", str(params.get("batch_size") or 8),
    ]  # fmt: skip
    if params.get("nonce"):  # a farm job's own challenges (its transcript's challenge_nonce)
        cmd += ["--nonce", str(params["nonce"])]
    if params.get("dtype"):  # the job's compute dtype
        cmd += ["--dtype", str(params["dtype"])]
    proc = subprocess.run(
        cmd,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])
