#!/usr/bin/env python3
"""``make fuzz``: schemathesis against a live, authenticated coordinator; no 5xx allowed.

It starts a private farm front end and tears it down afterwards:

* a private ``redis-server`` on a free port (the broker the coordinator enqueues into; no
  worker runs, so accepted jobs just wait there and are thrown away with it);
* a fresh PostgreSQL database ``rev_fuzz`` (``REV_TEST_PG_ADMIN_URL``, default the local
  server), migrated with ``alembic upgrade head`` — or, if PostgreSQL is not reachable, a
  SQLite file (the embedded default);
* a model root holding a tiny GPT-2 under the names the schema's examples use (``minilm``,
  ``minilm-copy``), so that the examples phase submits jobs that are accepted (202) and the
  stateful phase follows real job and model ids;
* the coordinator under gunicorn (2 workers), with an access log: the request and status
  counts below come from the server's own log, not from the fuzzer.

Then it runs ``schemathesis run /openapi.json`` twice with ``-H 'Authorization: Bearer …'``:
once as an admin key, once as a tenant key (submit+read). Every check runs except
``positive_data_acceptance``: a schema-valid model id or path that does not exist is rightly
a 422, and an opaque cursor cannot be typed by a schema. ``/readyz`` is left out: with no
worker its documented answer is 503, which is its purpose, not a fault. The run fails if
the coordinator answered any 5xx, or fewer than ``--min-requests`` requests were made;
other findings are printed and, with ``--strict``, fail the run too.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rev_tasks.testing.harness import (
    ROOT,
    GroupProcess,
    free_port,
    redis_server_binary,
    wait_http,
    wait_redis,
)

PY = sys.executable
DEFAULT_PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
FUZZ_DB = os.environ.get("REV_FUZZ_DB", "rev_fuzz")
ACCESS_FORMAT = "%(m)s %(U)s %(s)s"


def log(msg: str) -> None:
    print(f"[fuzz] {msg}", flush=True)


def start_redis(workdir: Path) -> tuple[GroupProcess, str]:
    port = free_port()
    argv = [
        redis_server_binary(system_first=True), "--port", str(port), "--bind", "127.0.0.1",
        "--save", "", "--appendonly", "no", "--dir", str(workdir), "--daemonize", "no",
    ]  # fmt: skip
    proc = GroupProcess("redis", argv, os.environ, workdir / "redis.log", cwd=workdir)
    url = f"redis://127.0.0.1:{port}/0"
    wait_redis(url, 10, proc)
    return proc, url


def database(workdir: Path) -> tuple[str, Any]:
    """(DATABASE_URL, cleanup) — PostgreSQL if reachable, else a SQLite file."""
    admin_url = os.environ.get("REV_TEST_PG_ADMIN_URL") or DEFAULT_PG_ADMIN
    try:
        import psycopg
        from psycopg.conninfo import conninfo_to_dict

        with psycopg.connect(admin_url, autocommit=True, connect_timeout=3) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{FUZZ_DB}" WITH (FORCE)')
            admin.execute(f'CREATE DATABASE "{FUZZ_DB}"')
    except Exception as exc:  # noqa: BLE001 - fall back to the embedded default
        log(f"PostgreSQL not reachable ({type(exc).__name__}); using SQLite")
        return f"sqlite:///{workdir / 'fuzz.db'}", lambda: None
    info = conninfo_to_dict(admin_url)
    auth = info.get("user", "postgres") + (f":{info['password']}" if info.get("password") else "")
    url = f"postgresql+psycopg://{auth}@{info.get('host', '127.0.0.1')}:{info.get('port', '5432')}/{FUZZ_DB}"

    def drop() -> None:
        with psycopg.connect(admin_url, autocommit=True, connect_timeout=3) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{FUZZ_DB}" WITH (FORCE)')

    return url, drop


def make_keys(env: dict[str, str]) -> dict[str, str]:
    tokens = {}
    for name, tenant, scopes in (
        ("admin", "ops", "admin,read,submit"),
        ("tenant", "fuzz", "submit,read"),
    ):
        proc = subprocess.run(
            [PY, "-m", "rev_tasks.cli", "keys", "create", "--tenant", tenant, "--scopes", scopes,
             "--name", f"fuzz-{name}", "--json"],
            cwd=ROOT, env=env, capture_output=True, text=True, check=True,
        )  # fmt: skip
        tokens[name] = json.loads(proc.stdout)["token"]
    return tokens


def count_access_log(path: Path) -> tuple[int, collections.Counter[int], list[str]]:
    statuses: collections.Counter[int] = collections.Counter()
    errors = []
    for line in path.read_text(errors="replace").splitlines():
        parts = line.rsplit(" ", 1)
        if len(parts) != 2 or not parts[1].isdigit():
            continue
        status = int(parts[1])
        statuses[status] += 1
        if status >= 500:
            errors.append(line)
    return sum(statuses.values()), statuses, errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-examples", type=int, default=120, help="per operation and run")
    parser.add_argument("--min-requests", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=20250101)
    parser.add_argument("--strict", action="store_true", help="fail on any schemathesis finding")
    parser.add_argument("--report-dir", default=str(ROOT / "var" / "fuzz"))
    args = parser.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="rev-fuzz-"))
    report_dir = Path(args.report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    procs: list[GroupProcess] = []
    cleanup = None
    started = time.monotonic()
    try:
        redis_proc, redis_url = start_redis(workdir)
        procs.append(redis_proc)
        db_url, cleanup = database(workdir)
        models = workdir / "models"
        from rev_tasks.testing.variants import build_tiny_causal_lm

        build_tiny_causal_lm(models / "minilm", "gpt2", seed=0, layers=2, hidden=64)
        shutil.copytree(models / "minilm", models / "minilm-copy")
        (workdir / "prom").mkdir()
        env = {
            **os.environ,
            "DATABASE_URL": db_url,
            "REDIS_URL": redis_url,
            "REV_MODEL_ROOTS": str(models),
            "REV_VAR_DIR": str(workdir),
            "REV_SECRET_KEY_FILE": str(workdir / "secret.key"),
            "REV_RATE_LIMIT_RPS": "100000",  # fuzz the API, not the limiter (tested elsewhere)
            "REV_RATE_LIMIT_BURST": "100000",
            "REV_INSPECT_TIMEOUT": "0.2",
            "PROMETHEUS_MULTIPROC_DIR": str(workdir / "prom"),
            "PYTHONUNBUFFERED": "1",
        }
        subprocess.run([PY, "-m", "alembic", "upgrade", "head"], cwd=ROOT, env=env, check=True,
                       capture_output=True)  # fmt: skip
        tokens = make_keys(env)
        port = free_port()
        access = workdir / "access.log"
        server_log = report_dir / "coordinator.log"
        gunicorn = [
            PY, "-m", "gunicorn", "-b", f"127.0.0.1:{port}", "-w", "2", "--timeout", "60",
            "--access-logfile", str(access), "--access-logformat", ACCESS_FORMAT,
            "--error-logfile", str(server_log), "web.wsgi:app",
        ]  # fmt: skip
        web = GroupProcess("web", gunicorn, env, report_dir / "coordinator.out", cwd=workdir)
        procs.append(web)
        base = f"http://127.0.0.1:{port}"
        wait_http(f"{base}/healthz", 60, web)
        log(f"coordinator {base} (database {db_url.split('@')[-1]}, redis {redis_url})")
        findings = 0
        for who, token in tokens.items():
            log(f"schemathesis as the {who} key: {args.max_examples} examples per operation")
            cmd = [
                PY, "-m", "schemathesis.cli", "run", f"{base}/openapi.json",
                "-H", f"Authorization: Bearer {token}",
                "--checks", "all", "--exclude-checks", "positive_data_acceptance",
                "--exclude-path", "/readyz",
                "--mode", "all", "--max-examples", str(args.max_examples),
                "--seed", str(args.seed), "--workers", "2", "--request-timeout", "20",
                "--suppress-health-check", "all", "--continue-on-failure",
                "--report", "junit", "--report-dir", str(report_dir / who),
                "--output-sanitize", "true",
            ]  # fmt: skip
            rc = subprocess.run(cmd, cwd=ROOT, env=env).returncode
            findings += rc != 0
        total, statuses, errors = count_access_log(access)
        summary = {
            "requests": total,
            "status_codes": dict(sorted(statuses.items())),
            "server_errors": len(errors),
            "wall_s": round(time.monotonic() - started, 1),
        }
        (report_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        log(f"summary: {json.dumps(summary)}")
        if errors:
            log("5xx responses (see var/fuzz/coordinator.log for tracebacks):")
            for line in errors[:20]:
                print("   ", line)
            return 1
        if total < args.min_requests:
            log(f"only {total} requests (< {args.min_requests}): raise --max-examples")
            return 1
        if findings and args.strict:
            log("schemathesis reported non-5xx findings (--strict)")
            return 1
        log(f"ok: {total} requests, no 5xx" + (" (non-5xx findings above)" if findings else ""))
        return 0
    finally:
        for proc in reversed(procs):
            proc.stop(15)
        if cleanup is not None:
            with contextlib.suppress(Exception):
                cleanup()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
