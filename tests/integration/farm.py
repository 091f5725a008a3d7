"""Helpers for the integration tests: worker subprocesses, job polling, broker checks."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
CELERY = [sys.executable, "-m", "celery"]  # the venv's celery, wherever its scripts live
ALL_QUEUES = "inference.cpu,consensus,default,maintenance"
TERMINAL = {"succeeded", "failed"}
# A fixed test key (the farm's key file); the in-process comparison uses the same bytes.
TEST_KEY = bytes(range(100, 132))


def reconfigure() -> None:
    """Point the cached settings, DB engine and Celery app of this process at the env."""
    import importlib

    from rev_tasks.db.session import dispose_engine
    from rev_tasks.settings import reset_settings

    reset_settings()
    dispose_engine()
    if "celeryconfig" in sys.modules:
        import celeryconfig

        importlib.reload(celeryconfig)
        from rev_tasks.celery import app

        app.config_from_object(celeryconfig, force=True)
        app.conf.broker_url = celeryconfig.broker_url
        app.conf.result_backend = celeryconfig.result_backend


def purge(redis_url: str) -> None:
    """Delete every declared queue's keys and the unacked bookkeeping (test teardown)."""
    import redis

    r = redis.Redis.from_url(redis_url)
    for q in declared_queues():
        r.delete(*queue_keys(q))
    r.delete("unacked", "unacked_index")


def queue_keys(name: str) -> list[str]:
    return [name] + [f"{name}\x06\x16{p}" for p in (3, 6, 9)]


def declared_queues() -> list[str]:
    import celeryconfig

    return list(celeryconfig.ALL_QUEUES)


def backlog(redis_url: str) -> dict[str, Any]:
    """Messages left in every declared queue, unacked deliveries and pending chords."""
    import redis

    r = redis.Redis.from_url(redis_url)
    out: dict[str, Any] = {q: sum(r.llen(k) for k in queue_keys(q)) for q in declared_queues()}
    out["unacked"] = r.hlen("unacked")
    out["chords"] = sorted(
        k.decode()
        # .j/.t/.s: a chord's joined results, counter and size, deleted when its body runs
        # (.c, a completion marker with its own expiry, is not pending state).
        for pattern in (
            "celery-taskset-meta-*.j",
            "celery-taskset-meta-*.t",
            "celery-taskset-meta-*.s",
            "chord-unlock*",
        )
        for k in r.scan_iter(pattern)
    )
    return out


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
    ) -> None:
        self.name = f"revtest-{name}-{uuid.uuid4().hex[:6]}@{socket.gethostname()}"
        self.queues = queues
        self.command = command
        self.env = {**os.environ, **env}
        self.log_path = log_dir / f"{self.name.split('@')[0]}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 180.0) -> FarmWorker:
        cmd = [
            *CELERY, "-A", "rev_tasks", "worker", "-P", "prefork", "-c", "1",
            "-Q", self.queues, "-n", self.name, "--loglevel", "INFO",
            "--without-gossip", "--without-mingle",
        ]  # fmt: skip
        if self.command is not None:  # e.g. `rev worker --gpu 0`, which execs celery itself
            cmd = [*self.command, "-n", self.name]
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        from rev_tasks.celery import app

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}:\n{self.log_tail()}")
            if app.control.ping(destination=[self.name], timeout=1.0):
                return self
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"worker did not answer ping in {timeout}s:\n{self.log_tail()}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self, timeout: float = 30.0) -> None:
        """Warm shutdown (SIGTERM to the group), then SIGKILL whatever is left."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        self._log.close()
        self.proc = None


def wait_job(client: Any, job_id: str, timeout: float = 300.0) -> dict[str, Any]:
    """Poll GET /v1/jobs/<id> until it is succeeded or failed; return the document."""
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


def submit(client: Any, body: dict[str, Any]) -> str:
    resp = client.post("/v1/jobs", json=body)
    assert resp.status_code == 202, resp.get_json()
    doc = resp.get_json()
    assert doc["status"] == "queued" and doc["url"] == f"/v1/jobs/{doc['id']}"
    return doc["id"]


def register(client: Any, model_id: str, path: Path, timeout: float = 300.0) -> dict[str, Any]:
    """Register a model and wait until its fingerprint is ready (or it failed)."""
    resp = client.post("/v1/models", json={"id": model_id, "path": str(path)})
    assert resp.status_code in (202, 409), resp.get_json()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        doc = client.get(f"/v1/models/{model_id}").get_json()
        if doc["status"] != "pending":
            return doc
        time.sleep(0.3)
    raise AssertionError(f"model {model_id} still pending after {timeout}s")


def rev_verify(reference: Path, candidate: Path, key_file: str, **params: Any) -> dict[str, Any]:
    """The ``rev verify`` path (the CLI, in-process engine, no farm): same pair, same key."""
    cmd = [
        sys.executable, "-m", "rev_tasks.cli", "verify", str(reference), str(candidate),
        "--key-file", key_file, "--json",
        "--tolerance", str(params.get("tolerance", "exact")),
        "--alpha", str(params.get("alpha", 0.01)),
        "--max-challenges", str(params.get("max_challenges", 64)),
        "--batch-size", str(params.get("batch_size") or 8),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])
