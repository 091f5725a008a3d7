"""Operating the farm, on real processes: health, Flower, metrics, logs, traces, backups.

One worker (all queues, prefork ``-c 1``) runs with everything an operator turns on:
its own metrics port and multiprocess directory, JSON logs, an OTLP endpoint (a tiny
HTTP server in this process), a backup directory. Beside it: the coordinator under
gunicorn with ``deploy/gunicorn.conf.py`` (two workers, its own multiprocess directory),
and a real Flower process. One registered model and one job then have to show up
everywhere: readiness, Flower, both ``/metrics``, the task's PROGRESS state, the log
lines, the spans, and a backup that survives dropping the database.

The tests run in file order and share that state (module-scoped fixtures); the backup
round trip, which drops the database, runs last.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from rev_tasks.queues import CPU_WORKER_QUEUES, INFERENCE_CPU, MAINTENANCE, Task, declared_queues
from rev_tasks.testing.harness import ROOT, GroupProcess, free_port, reconfigure, wait_http
from tests.conftest import DEFAULT_PG_ADMIN
from tests.integration.farm import register, submit, wait_job

pytestmark = pytest.mark.integration

JOB_TASKS = (
    Task.PREPARE,
    Task.RUN_INFERENCE,
    Task.VALIDATE,
    Task.TALLY,
)
ALL_TASKS = (*JOB_TASKS, Task.FINGERPRINT, Task.BACKUP)


# ----------------------------------------------------------------------------- helpers
class OtlpSink:
    """A local OTLP/HTTP receiver: records every POST (path, body) and answers 200."""

    def __init__(self, port: int = 0) -> None:
        posts: list[tuple[str, bytes]] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                posts.append((self.path, body))
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.posts = posts
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def spans(self) -> list[tuple[str, str]]:
        """(service.name, span name) of every span received on /v1/traces."""
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
        )

        out = []
        for path, body in list(self.posts):
            if path != "/v1/traces":
                continue
            for rs in ExportTraceServiceRequest.FromString(body).resource_spans:
                service = next(
                    (
                        a.value.string_value
                        for a in rs.resource.attributes
                        if a.key == "service.name"
                    ),
                    "",
                )
                out += [(service, span.name) for ss in rs.scope_spans for span in ss.spans]
        return out

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def scrape(url: str) -> list[tuple[str, dict[str, str], float]]:
    """Every sample of a Prometheus exposition as (name, labels, value)."""
    from prometheus_client.parser import text_string_to_metric_families

    resp = requests.get(url, timeout=10)
    assert resp.status_code == 200, resp.text[:500]
    return [
        (s.name, dict(s.labels), float(s.value))
        for family in text_string_to_metric_families(resp.text)
        for s in family.samples
    ]


def value(samples: list[tuple[str, dict[str, str], float]], name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels``; -1 if none."""
    hits = [v for n, lab, v in samples if n == name and labels.items() <= lab.items()]
    return sum(hits) if hits else -1.0


def service(name: str, argv: list[str], env: dict[str, str], log_dir: Path) -> GroupProcess:
    """A long-running subprocess (gunicorn, Flower, beat) with the farm's environment."""
    return GroupProcess(name, argv, {**os.environ, **env}, log_dir / f"{name}.log")


def _answers(status: int) -> bool:
    return status < 500


def rev(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the ``rev`` CLI as an operator would (a fresh process, the farm's environment)."""
    return subprocess.run(
        [sys.executable, "-m", "rev_tasks.cli", *args],
        cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def ops_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ops")


@pytest.fixture(scope="module")
def otlp_sink() -> Iterator[OtlpSink]:
    sink = OtlpSink()
    yield sink
    sink.close()


@pytest.fixture(scope="module")
def app(app: Any, farm_env: dict[str, str]) -> Any:
    """The farm's app (whatever conftest configures) plus ``/metrics``, as in production."""
    from rev_tasks import metrics

    metrics.init_app(app, redis_url=farm_env["REDIS_URL"])
    return app


@pytest.fixture(scope="module")
def coordinator(farm_env: dict[str, str], ops_dir: Path) -> Iterator[str]:
    """The coordinator exactly as deployed: gunicorn, deploy/gunicorn.conf.py, 2 workers."""
    port = free_port()
    prom = ops_dir / "prom-web"
    prom.mkdir()
    (prom / "counter_99999.db").write_bytes(b"stale")  # on_starting must wipe it
    env = {
        **farm_env,
        "GUNICORN_BIND": f"127.0.0.1:{port}",
        "WEB_CONCURRENCY": "2",
        "PROMETHEUS_MULTIPROC_DIR": str(prom),
    }
    argv = [sys.executable, "-m", "gunicorn", "-c", "deploy/gunicorn.conf.py", "web.wsgi:app"]
    svc = service("gunicorn", argv, env, ops_dir)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/healthz", proc=svc, ok=_answers)
        yield url
    finally:
        svc.stop(15)


@pytest.fixture(scope="module")
def flower(farm_env: dict[str, str], ops_dir: Path) -> Iterator[str]:
    """A real Flower on the test broker (started before the job so it sees its events)."""
    port = free_port()
    argv = [
        sys.executable, "-m", "celery", "-A", "rev_tasks", "flower",
        "--address=127.0.0.1", f"--port={port}", "--persistent=False",
    ]  # fmt: skip
    svc = service("flower", argv, {**farm_env, "FLOWER_UNAUTHENTICATED_API": "true"}, ops_dir)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/healthcheck", proc=svc, ok=_answers)
        yield url
    finally:
        svc.stop(15)


@pytest.fixture(scope="module")
def ops(
    start_worker: Any, farm_env: dict[str, str], ops_dir: Path, otlp_sink: OtlpSink
) -> dict[str, Any]:
    """The worker with metrics, JSON logs, traces and backups switched on."""
    prom = ops_dir / "prom-worker"
    prom.mkdir()
    port = free_port()
    backups = ops_dir / "backups"
    worker = start_worker(
        name="ops",
        REV_METRICS_PORT=str(port),
        PROMETHEUS_MULTIPROC_DIR=str(prom),
        REV_LOG_JSON="1",
        OTEL_EXPORTER_OTLP_ENDPOINT=otlp_sink.url,
        OTEL_BSP_SCHEDULE_DELAY="100",
        REV_BACKUP_DIR=str(backups),
    )
    return {"worker": worker, "metrics": f"http://127.0.0.1:{port}/metrics", "backups": backups}


@pytest.fixture(scope="module")
def job(
    client: Any, ops: dict[str, Any], flower: str, model_dirs: dict[str, Path], farm_env: Any
) -> dict[str, Any]:
    """One registered model and one verify job against it, watched through the backend.

    The Redis result backend publishes every state write on the task's key: subscribing
    before the submit sees the inference task's PROGRESS states, not just the last one.
    """
    import redis

    model = register(client, "ops-gpt2", model_dirs["gpt2-a"])
    assert model["status"] == "ready", model
    pubsub = redis.Redis.from_url(farm_env["REDIS_URL"]).pubsub()
    pubsub.psubscribe("celery-task-meta-inference-*")
    job_id = submit(
        client,
        {
            "kind": "verify",
            "reference": "ops-gpt2",
            "candidate": {"path": str(model_dirs["gpt2-a-copy"])},
            "batch_size": 1,
        },
    )
    doc = wait_job(client, job_id, timeout=180)
    states: list[dict[str, Any]] = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        msg = pubsub.get_message(timeout=0.5)
        if msg is None:
            if states and states[-1]["status"] in ("SUCCESS", "FAILURE"):
                break
            continue
        if msg["type"] == "pmessage" and msg["channel"].decode().endswith(job_id):
            states.append(json.loads(msg["data"]))
    pubsub.close()
    return {"id": job_id, "doc": doc, "model": model, "states": states}


# ----------------------------------------------------------------------------- health
def test_readyz_503_without_a_live_worker(coordinator: str, farm_env: dict[str, str]) -> None:
    resp = requests.get(f"{coordinator}/readyz", timeout=10)
    assert resp.status_code == 503
    body = resp.json()
    assert body["status"] == "unavailable"
    assert "no live worker for queue(s)" in body["reason"]
    assert body["checks"]["database"] == "ok" and body["checks"]["broker"] == "ok"
    assert body["checks"]["queues"] == dict.fromkeys(CPU_WORKER_QUEUES, 0)
    assert requests.get(f"{coordinator}/healthz", timeout=5).json() == {"status": "ok"}
    proc = rev("health", "--api", coordinator, env=farm_env)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert re.search(r"^workers\s+\| DOWN\s+\| no live worker for", proc.stdout, re.M), proc.stdout


def test_readyz_200_once_a_worker_is_up(
    coordinator: str, ops: dict[str, Any], farm_env: dict[str, str]
) -> None:
    deadline = time.monotonic() + 15
    while True:  # the coordinator caches the worker list for REV_INSPECT_CACHE_SECONDS
        resp = requests.get(f"{coordinator}/readyz", timeout=10)
        if resp.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["status"] == "ready"
    assert body["checks"]["database"] == "ok" and body["checks"]["broker"] == "ok"
    assert all(n == 1 for n in body["checks"]["queues"].values()), body
    assert body["checks"]["gpu_queues"] == []
    proc = rev("health", "--api", coordinator, env=farm_env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    table = proc.stdout
    for service in ("coordinator", "database", "broker", "workers"):
        assert re.search(rf"^{service}\s+\| UP ", table, re.M), table
    # Directly, without the coordinator: PostgreSQL version and schema, Redis, workers.
    direct = rev("health", "--api", "http://127.0.0.1:9", "--json", env=farm_env)
    checks = {c["name"]: c for c in json.loads(direct.stdout)["checks"]}
    assert not checks["coordinator"]["ok"] and direct.returncode == 1
    assert checks["database"]["ok"] and "PostgreSQL" in checks["database"]["detail"]
    assert checks["broker"]["ok"] and checks["workers"]["ok"], checks


# ----------------------------------------------------------------------------- Flower
def test_flower_lists_the_workers_and_their_tasks(flower: str, ops: dict[str, Any]) -> None:
    name = ops["worker"].name
    deadline = time.monotonic() + 30
    workers: dict[str, Any] = {}
    while name not in workers and time.monotonic() < deadline:
        workers = requests.get(f"{flower}/api/workers", params={"refresh": 1}, timeout=20).json()
    assert name in workers, workers
    info = workers[name]
    assert set(ALL_TASKS) <= set(info["registered"]), info["registered"]
    queues = {q["name"] for q in info["active_queues"]}
    assert queues == set(CPU_WORKER_QUEUES)


def flower_task(flower: str, task_id: str, state: str, timeout: float = 15.0) -> dict[str, Any]:
    """Flower's /api/task/info for ``task_id`` once it shows ``state`` (its events arrive late)."""
    deadline = time.monotonic() + timeout
    info: dict[str, Any] = {}
    while info.get("state") != state and time.monotonic() < deadline:
        resp = requests.get(f"{flower}/api/task/info/{task_id}", timeout=5)
        info = resp.json() if resp.status_code == 200 else {}
        time.sleep(0.3)
    assert info.get("state") == state, info
    return info


def test_flower_saw_the_job_and_its_final_state(flower: str, job: dict[str, Any]) -> None:
    task_id = f"inference-{job['id']}"
    info = flower_task(flower, task_id, "SUCCESS")
    assert info["name"] == Task.RUN_INFERENCE
    types = requests.get(f"{flower}/api/task/types", timeout=5).json()["task-types"]
    assert set(JOB_TASKS) <= set(types), types
    tasks = requests.get(
        f"{flower}/api/tasks", params={"taskname": Task.VALIDATE}, timeout=5
    ).json()
    votes = [t for t in tasks.values() if job["id"] in (t.get("args") or "")]
    assert len(votes) == 5 and all(t["state"] == "SUCCESS" for t in votes), votes
    result = requests.get(f"{flower}/api/task/result/{task_id}", timeout=5).json()
    assert result["state"] == "SUCCESS" and result["result"] == "decided"


# ----------------------------------------------------------------------------- progress
def test_inference_reports_progress_then_success(job: dict[str, Any]) -> None:
    from celery.result import AsyncResult

    doc = job["doc"]
    assert doc["status"] == "succeeded" and doc["result"]["verdict"] == "SAME", doc
    used = doc["result"]["challenges_used"]
    progress = [s for s in job["states"] if s["status"] == "PROGRESS"]
    # batch_size 1: one PROGRESS state per challenge, counting up to the decision.
    assert [s["result"]["challenges_done"] for s in progress] == list(range(1, used + 1))
    assert {s["result"]["challenges_max"] for s in progress} == {doc["progress"]["challenges_max"]}
    assert all(s["result"]["job_id"] == job["id"] for s in progress)
    assert job["states"][-1]["status"] == "SUCCESS"
    from rev_tasks.celery import app

    final = AsyncResult(f"inference-{job['id']}", app=app)
    assert final.state == "SUCCESS" and final.result == "decided"


def test_cli_status_and_wait_through_gunicorn(
    coordinator: str, job: dict[str, Any], farm_env: dict[str, str]
) -> None:
    """`rev status` / `rev wait` as an operator runs them, with a read-only API key."""
    from tests.integration.farm import create_key

    env = {**farm_env, "REV_API_URL": coordinator, "REV_API_KEY": create_key("ops", "read")}
    status = rev("status", job["id"], "--json", env=env)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["status"] == "succeeded"
    waited = rev("wait", job["id"], "--timeout", "30", "--json", env=env)
    assert waited.returncode == 0, waited.stderr
    doc = json.loads(waited.stdout)
    assert doc["result"]["verdict"] == "SAME"
    assert doc["progress"]["challenges_done"] == doc["result"]["challenges_used"]


# ----------------------------------------------------------------------------- metrics
def test_metrics_count_the_job(
    client: Any, coordinator: str, ops: dict[str, Any], job: dict[str, Any]
) -> None:
    # The coordinator that took the job (this process's app): submitted, requests, queues.
    resp = client.get("/metrics")
    assert resp.status_code == 200
    from prometheus_client.parser import text_string_to_metric_families

    web = [
        (s.name, dict(s.labels), float(s.value))
        for f in text_string_to_metric_families(resp.get_data(as_text=True))
        for s in f.samples
    ]
    assert value(web, "rev_jobs_submitted_total", kind="verify") >= 1
    assert (
        value(web, "rev_http_requests_total", endpoint="/v1/jobs", method="POST", status="202") >= 1
    )
    assert value(web, "rev_http_request_duration_seconds_count", endpoint="/v1/jobs/<job_id>") >= 1
    for queue in CPU_WORKER_QUEUES:
        assert value(web, "queue_depth", queue=queue) == 0

    # The coordinator under gunicorn: both workers' requests merged through the multiprocess
    # directory; the stale file planted before start was wiped by on_starting.
    for _ in range(6):
        requests.get(f"{coordinator}/healthz", timeout=5)
    merged = scrape(f"{coordinator}/metrics")
    assert value(merged, "rev_http_requests_total", endpoint="/healthz", status="200") >= 6
    assert value(merged, "rev_http_requests_total", endpoint="/readyz", status="503") >= 1
    assert value(merged, "rev_http_request_duration_seconds_bucket", endpoint="/readyz") > 0
    assert value(merged, "queue_depth", queue=INFERENCE_CPU) == 0
    # Only the declared queues (REV_GPU_COUNT unset: no inference.cudaN), and none of the
    # series only workers record, not even as zeros.
    assert {lab["queue"] for n, lab, _ in merged if n == "queue_depth"} == set(declared_queues(0))
    names = {n for n, _, _ in merged}
    assert not names & {"models_cached", "consensus_validators_active", "rev_backup_failures_total",
                        "consensus_duration_seconds_count", "model_inference_duration_seconds_count",
                        "consensus_rounds_total"}, sorted(names)  # fmt: skip
    assert value(merged, "rev_jobs_finished_total", kind="identify", status="cancelled") == 0

    # The worker: every series of the job, exactly once for this worker's one job.
    w = scrape(ops["metrics"])
    assert value(w, "model_inference_duration_seconds_count", device="cpu") >= 1
    assert value(w, "model_inference_duration_seconds_bucket", le="+Inf") >= 1
    assert value(w, "model_load_duration_seconds_count") >= 1
    assert value(w, "models_cached") >= 1
    assert value(w, "consensus_duration_seconds_count") == 1
    assert value(w, "consensus_validators_total", vote="accept") == 5
    assert value(w, "consensus_validators_total") == 5
    assert value(w, "consensus_validators_active") == 0
    assert value(w, "consensus_rounds_total", outcome="published") == 1
    assert (
        value(w, "rev_jobs_finished_total", kind="verify", status="succeeded", verdict="SAME") == 1
    )
    assert value(w, "worker_memory_bytes", role="main") > 0
    assert value(w, "worker_memory_bytes", role="child") > 0


# ----------------------------------------------------------------------------- logs
def test_json_logs_carry_job_and_task_ids(ops: dict[str, Any], job: dict[str, Any]) -> None:
    lines = ops["worker"].log_tail(1_000_000).splitlines()
    plain = [ln for ln in lines if re.match(r"^\[\d{4}-\d\d-\d\d [\d:,]+: [A-Z]+/", ln)]
    assert not plain, plain[:5]  # no record escaped the JSON handler as Celery text
    records = [json.loads(ln) for ln in lines if ln.startswith("{")]
    assert records and all({"time", "level", "logger", "message"} <= r.keys() for r in records)
    mine = [r for r in records if r.get("job_id") == job["id"]]
    assert {r["task_name"] for r in mine} >= set(JOB_TASKS), {r["task_name"] for r in mine}
    assert all(r["task_id"] for r in mine)
    # Every line logged while a job task runs (in the pool child) carries both ids ...
    running = [
        r
        for r in records
        if r.get("task_name") in JOB_TASKS and r["logger"] != "celery.worker.strategy"
    ]
    assert running and all(r["job_id"] == job["id"] and r["task_id"] for r in running), [
        r for r in running if r["job_id"] != job["id"]
    ][:3]
    # ... and the main process's "received" lines name the task.
    received = [r for r in records if r["logger"] == "celery.worker.strategy"]
    assert any(r["task_id"] == f"inference-{job['id']}" for r in received), received[:3]
    # Fingerprinting binds the model id the same way.
    assert any(r.get("model_id") == "ops-gpt2" for r in records)


# ----------------------------------------------------------------------------- traces
def test_worker_exports_task_spans(otlp_sink: OtlpSink, job: dict[str, Any]) -> None:
    deadline = time.monotonic() + 15
    names: set[str] = set()
    while time.monotonic() < deadline:
        names = {name for service, name in otlp_sink.spans() if service == "rev-worker"}
        if any("run_inference" in n for n in names) and any("tally" in n for n in names):
            break
        time.sleep(0.3)
    assert any(n.startswith("run/") and n.endswith("run_inference") for n in names), names
    assert any(n.endswith("consensus.validate") for n in names), names


_OTEL_SCRIPT = """
import json, sys
from web import create_app
from rev_tasks import telemetry
app = create_app({"TESTING": True, "REV_METRICS": False})
client = app.test_client()
for _ in range(3):
    client.get("/healthz")
telemetry.shutdown()
print(json.dumps(sorted(m for m in sys.modules if m.startswith("opentelemetry"))))
"""


def test_coordinator_traces_only_with_an_endpoint(
    farm_env: dict[str, str], otlp_sink: OtlpSink
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}

    def run(extra: dict[str, str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", _OTEL_SCRIPT], cwd=ROOT, env={**env, **farm_env, **extra},
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip

    # Unset: OpenTelemetry is not even imported, nothing reaches the default OTLP port,
    # and nothing is logged at all.
    default_sink = None
    with contextlib.suppress(OSError):
        default_sink = OtlpSink(4318)
    try:
        off = run({})
        assert off.returncode == 0, off.stderr
        assert json.loads(off.stdout.strip().splitlines()[-1]) == []
        assert off.stderr.strip() == "", off.stderr
        if default_sink is not None:
            time.sleep(0.5)
            assert default_sink.posts == []
    finally:
        if default_sink is not None:
            default_sink.close()

    before = len(otlp_sink.spans())
    on = run({"OTEL_EXPORTER_OTLP_ENDPOINT": otlp_sink.url, "OTEL_SERVICE_NAME": "rev-test-web"})
    assert on.returncode == 0, on.stderr
    assert "error" not in on.stderr.lower(), on.stderr
    spans = otlp_sink.spans()[before:]
    assert spans.count(("rev-test-web", "GET /healthz")) == 3, spans


# ----------------------------------------------------------------------------- a failed job
@pytest.fixture(scope="module")
def prometheus(ops: dict[str, Any], ops_dir: Path) -> Iterator[str | None]:
    """A real Prometheus scraping the ops worker every second (None when not installed)."""
    binary = shutil.which("prometheus")
    if binary is None:
        yield None
        return
    port = free_port()
    target = ops["metrics"].removeprefix("http://").removesuffix("/metrics")
    config = ops_dir / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: rev-worker-cpu\n"
        f"    static_configs: [{{targets: ['{target}']}}]\n"
    )
    argv = [
        binary, f"--config.file={config}", f"--storage.tsdb.path={ops_dir / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]  # fmt: skip
    svc = service("prometheus", argv, {}, ops_dir)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/-/ready", proc=svc)
        yield url
    finally:
        svc.stop(15)


def promql(url: str, query: str) -> list[dict[str, Any]]:
    """The result vector of an instant query on the real Prometheus."""
    resp = requests.get(f"{url}/api/v1/query", params={"query": query}, timeout=10)
    assert resp.status_code == 200 and resp.json()["status"] == "success", resp.text
    return list(resp.json()["data"]["result"])


FAILED_VERIFY = {"kind": "verify", "status": "failed", "verdict": "none"}


@pytest.fixture(scope="module")
def failed_job(
    client: Any,
    job: dict[str, Any],
    ops: dict[str, Any],
    flower: str,
    prometheus: str | None,
    model_dirs: dict[str, Path],
) -> dict[str, Any]:
    """The ops worker's first failed job (a candidate whose weights are corrupt), with the
    worker's exposition before and after it and, once Prometheus has scraped the series at
    0, that Prometheus."""
    before = scrape(ops["metrics"])
    if prometheus is not None:  # the series scraped at 0 before the failure
        deadline = time.monotonic() + 30
        query = 'rev_jobs_finished_total{kind="verify",status="failed"}'
        while not promql(prometheus, query) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert [r["value"][1] for r in promql(prometheus, query)] == ["0"]
    body = {
        "kind": "verify",
        "reference": job["model"]["id"],
        "candidate": {"path": str(model_dirs["corrupt"])},
    }
    doc = wait_job(client, submit(client, body), timeout=180)
    return {"doc": doc, "before": before, "after": scrape(ops["metrics"])}


def test_a_failed_job_is_a_failed_task_in_flower(
    flower: str, failed_job: dict[str, Any], ops: dict[str, Any], farm_env: dict[str, str]
) -> None:
    """FAILURE in Flower (its Failed counter too) while the job keeps its own clear error;
    the failure was stored before the task failed, and the message was not delivered again."""
    from celery.result import AsyncResult

    from rev_tasks.celery import app
    from tests.integration.farm import assert_drained

    doc = failed_job["doc"]
    assert doc["status"] == "failed" and doc["result"] is None, doc
    assert doc["error"]["code"] == "model_load_error"
    assert doc["error"]["message"].startswith("candidate: "), doc["error"]
    task_id = f"inference-{doc['id']}"
    info = flower_task(flower, task_id, "FAILURE")
    assert info["exception"].startswith("JobFailed("), info["exception"]
    assert f"model_load_error: {doc['error']['message'][:40]}" in info["exception"]
    assert info["retries"] == 0 and info["name"] == Task.RUN_INFERENCE, info
    failures = requests.get(f"{flower}/api/tasks", params={"state": "FAILURE"}, timeout=5).json()
    assert task_id in failures, sorted(failures)
    workers = requests.get(f"{flower}/workers", params={"json": 1}, timeout=10).json()["data"]
    counted = {w["hostname"]: w.get("task-failed", 0) for w in workers}
    assert counted.get(ops["worker"].name, 0) >= 1, counted
    result = AsyncResult(task_id, app=app)
    assert result.state == "FAILURE" and "model_load_error" in str(result.result)
    # Acked on failure: one delivery, nothing left unacked or queued; an expected outcome
    # (the task's `throws`), logged at INFO, not as an error.
    assert_drained(farm_env["REDIS_URL"])
    log = ops["worker"].log_tail(2_000_000)
    assert log.count(f"Task {Task.RUN_INFERENCE}[{task_id}] received") == 1
    lines = [json.loads(ln) for ln in log.splitlines() if ln.startswith("{")]
    mine = [r for r in lines if r.get("task_id") == task_id]
    expected = [r for r in mine if "raised expected: JobFailed(" in r["message"]]
    assert [r["level"] for r in expected] == ["INFO"], mine[-3:]
    assert not [r for r in mine if r["level"] in ("ERROR", "CRITICAL")], mine[-3:]


def test_the_first_failed_job_after_a_worker_start_shows_in_increase(
    failed_job: dict[str, Any], prometheus: str | None
) -> None:
    """rev_jobs_finished_total{status="failed"} is 0 before the worker's first failure and 1
    after it, so increase() sees the first one (on a real Prometheus when installed)."""
    assert failed_job["doc"]["status"] == "failed"
    assert value(failed_job["before"], "rev_jobs_finished_total", **FAILED_VERIFY) == 0
    assert value(failed_job["after"], "rev_jobs_finished_total", **FAILED_VERIFY) == 1
    for name, labels in (
        ("consensus_rounds_total", {"outcome": "no_quorum"}),
        ("consensus_validators_total", {"vote": "reject"}),
        ("rev_jobs_finished_total", {"status": "cancelled"}),
    ):
        assert value(failed_job["before"], name, **labels) == 0, (name, labels)
    if prometheus is None:
        pytest.skip("Prometheus not installed (Debian prometheus; scripts/install_tools.sh)")
    query = 'increase(rev_jobs_finished_total{status="failed"}[5m])'
    deadline = time.monotonic() + 30
    increase = 0.0
    while increase <= 0 and time.monotonic() < deadline:
        increase = sum(float(r["value"][1]) for r in promql(prometheus, query))
        time.sleep(0.5)
    assert increase > 0, promql(prometheus, query)


# ----------------------------------------------------------------------------- backups
def test_beat_schedules_the_backup_on_maintenance(
    ops: dict[str, Any], farm_env: dict[str, str], ops_dir: Path
) -> None:
    """A real beat with REV_BACKUP_SCHEDULE=1 s: the ops worker writes backups from it."""
    from rev_tasks.ops.backup import list_backups

    existing = {b.path for b in list_backups(ops["backups"])}
    argv = [
        sys.executable, "-m", "celery", "-A", "rev_tasks", "beat", "--loglevel", "INFO",
        "-s", str(ops_dir / "beat-schedule"), "--pidfile", str(ops_dir / "beat.pid"),
    ]  # fmt: skip
    beat = service("beat", argv, {**farm_env, "REV_BACKUP_SCHEDULE": "1"}, ops_dir)
    try:
        deadline = time.monotonic() + 60
        new: set[Path] = set()
        while not new and time.monotonic() < deadline:
            new = {b.path for b in list_backups(ops["backups"])} - existing
            time.sleep(0.3)
    finally:
        beat.stop(15)
    assert new, beat.tail(2000)
    assert Task.BACKUP in beat.output()
    assert all(p.name.endswith(".dump") and p.read_bytes()[:5] == b"PGDMP" for p in new)
    listing = rev("backup", "list", "--dir", str(ops["backups"]))
    assert listing.returncode == 0 and str(sorted(new)[0]) in listing.stdout, listing.stdout
    w = scrape(ops["metrics"])
    newest = max(b.created.timestamp() for b in list_backups(ops["backups"]))
    assert value(w, "rev_backup_last_success_timestamp_seconds") == newest
    assert value(w, "rev_backup_duration_seconds_count") >= 1


def test_a_failed_backup_is_visible(ops: dict[str, Any]) -> None:
    """Task FAILURE, an ERROR log line, and rev_backup_failures_total (root ignores modes,
    so the directory is made unusable by putting a file where it should be)."""
    from rev_tasks.celery import app

    backups: Path = ops["backups"]
    aside = backups.with_name("backups-aside")
    backups.rename(aside)
    backups.write_text("not a directory\n")
    try:
        result = app.send_task(Task.BACKUP, queue=MAINTENANCE)
        result.get(timeout=60, propagate=False)
        assert result.state == "FAILURE"
        assert "cannot create backup directory" in str(result.result)
    finally:
        backups.unlink()
        aside.rename(backups)
    records = [
        json.loads(ln)
        for ln in ops["worker"].log_tail(1_000_000).splitlines()
        if ln.startswith("{")
    ]
    errors = [r for r in records if r["message"].startswith("database backup failed")]
    assert errors and errors[-1]["level"] == "ERROR" and errors[-1]["task_id"] == result.id
    assert value(scrape(ops["metrics"]), "rev_backup_failures_total") == 1


def test_backup_restore_round_trip(
    client: Any, job: dict[str, Any], ops: dict[str, Any], farm_env: dict[str, str], ops_dir: Path
) -> None:
    """`rev backup now`, drop the database, `rev restore`: the API serves the same data."""
    import psycopg
    from sqlalchemy.engine import make_url

    models_before = client.get("/v1/models").get_json()
    jobs_before = client.get("/v1/jobs?limit=100").get_json()
    job_before = client.get(f"/v1/jobs/{job['id']}").get_json()
    model_before = client.get("/v1/models/ops-gpt2").get_json()
    assert job_before["status"] == "succeeded" and model_before["status"] == "ready"

    dest = ops_dir / "manual-backups"
    made = rev("backup", "now", "--dir", str(dest), env=farm_env)
    assert made.returncode == 0, made.stderr
    path = Path(made.stdout.split("backup written: ", 1)[1].split(" (", 1)[0])
    listed = rev("backup", "list", "--dir", str(dest))
    assert listed.stdout.startswith(str(path)), listed.stdout

    # Stop the writers, then lose everything: drop and recreate the database.
    ops["worker"].stop()
    url = make_url(farm_env["DATABASE_URL"])
    admin_url = os.environ.get("REV_TEST_PG_ADMIN_URL") or DEFAULT_PG_ADMIN
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE "{url.database}" WITH (FORCE)')
        admin.execute(f'CREATE DATABASE "{url.database}"')
    reconfigure()
    refused = rev("restore", "/nonexistent.dump", env=farm_env)
    assert refused.returncode == 2 and "no such backup file" in refused.stderr

    restored = rev("restore", str(path), env=farm_env)
    assert restored.returncode == 0, restored.stderr
    assert "alembic upgrade head" in restored.stdout
    again = rev("restore", str(path), env=farm_env)  # not into a database with tables
    assert again.returncode == 2 and "not empty" in again.stderr
    upgrade = subprocess.run(
        [sys.executable, "-m", "alembic", "upgrade", "head"],
        cwd=ROOT, env={**os.environ, **farm_env}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert upgrade.returncode == 0, upgrade.stderr
    reconfigure()

    assert client.get("/v1/models").get_json() == models_before
    assert client.get("/v1/jobs?limit=100").get_json() == jobs_before
    assert client.get(f"/v1/jobs/{job['id']}").get_json() == job_before
    assert client.get("/v1/models/ops-gpt2").get_json() == model_before
    shutil.rmtree(dest, ignore_errors=True)


# ----------------------------------------------------------------------------- a worker stops
def test_rev_health_says_down_within_one_census_interval_of_a_worker_stop(
    coordinator: str, start_worker: Any, farm_env: dict[str, str]
) -> None:
    """Every gunicorn process has answered "up" from its census; the only worker stops.

    Past one census interval (REV_INSPECT_CACHE_SECONDS, 1 s here) no process may answer
    with a census from before the stop: the first /readyz or `rev health` after it says
    DOWN, whichever process serves it (a stale-while-revalidate census would say UP first).
    """
    from rev_tasks.settings import Settings

    interval = Settings.from_env().inspect_cache_seconds
    worker = start_worker(name="health")
    deadline = time.monotonic() + 30
    while requests.get(f"{coordinator}/readyz", timeout=10).status_code != 200:
        assert time.monotonic() < deadline, "the coordinator never saw the worker"
        time.sleep(0.3)
    for _ in range(12):  # both gunicorn processes hold an "up" census now
        assert requests.get(f"{coordinator}/readyz", timeout=10).status_code == 200
    worker.stop()
    stopped = time.monotonic()
    time.sleep(interval + 0.5)
    proc = rev("health", "--api", coordinator, env=farm_env)
    first = requests.get(f"{coordinator}/readyz", timeout=10)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert re.search(r"^workers\s+\| DOWN\s+\| no live worker for", proc.stdout, re.M), proc.stdout
    assert first.status_code == 503, first.text
    for _ in range(6):  # every process, not only the one that answered first
        assert requests.get(f"{coordinator}/readyz", timeout=10).status_code == 503
    assert time.monotonic() - stopped < 30
