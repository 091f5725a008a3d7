"""rev_tasks.metrics: the names we promise, the Flask hook, the Redis queue collector, and
the worker's multiprocess export (a real forked child, a real HTTP scrape)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import urllib.request
import uuid
from pathlib import Path

import pytest
from flask import Flask
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from rev_tasks import metrics, queues
from rev_tasks.ops.gpu import GPU_METRIC_NAMES

REDIS_TEST_URL = os.environ.get("REV_TEST_REDIS_URL", "redis://127.0.0.1:6379/14")
REPO = Path(__file__).resolve().parents[2]


def _need_redis() -> None:
    """Real Redis or nothing: skip on a laptop without one, fail in CI (CI=true)."""
    import redis

    try:
        redis.Redis.from_url(REDIS_TEST_URL, socket_connect_timeout=1).ping()
    except redis.RedisError as exc:
        msg = f"Redis not reachable at {REDIS_TEST_URL}: {exc}"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)


def _samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def _value(text: str, name: str, **labels: str) -> float:
    return _samples(text).get((name, frozenset(labels.items())), 0.0)


# --------------------------------------------------------------------------- names
def test_metric_names_cover_the_guides_series() -> None:
    for name in (
        "model_inference_duration_seconds_bucket",
        "model_load_duration_seconds_count",
        "models_cached",
        "worker_memory_bytes",
        "consensus_duration_seconds_sum",
        "consensus_validators_active",
        "consensus_validators_total",
        "queue_depth",
        "rev_http_requests_total",
        "rev_http_request_duration_seconds_bucket",
        "rev_jobs_submitted_total",
        "rev_jobs_finished_total",
        "rev_backup_last_success_timestamp_seconds",
        "rev_backup_failures_total",
        "rev_backup_duration_seconds_bucket",
        "rev_watchdog_actions_total",
        "rev_endpoint_request_duration_seconds_bucket",
        "rev_endpoint_errors_total",
        "rev_endpoint_tokens_total",
        "rev_endpoint_retries_total",
    ):
        assert name in metrics.METRIC_NAMES, name


def test_metric_names_equal_what_is_exposed(tmp_path: Path) -> None:
    """METRIC_NAMES is computed, not typed: prove it against a real exposition."""
    _need_redis()
    metrics.observe_inference("gpt2", "cpu", 0.05)
    with metrics.time_model_load("gpt2", "cpu"):
        pass
    metrics.set_models_cached(1)
    metrics.job_submitted("verify")
    metrics.job_finished("verify", "succeeded", "SAME")
    with metrics.validator_running():
        metrics.validator_vote("accept")
    metrics.consensus_round("published", 0.02)
    metrics.watchdog_action("resumed", "inference")
    metrics.record_backup_success(1.0)
    metrics.record_backup_failure()
    metrics.HTTP_REQUESTS.labels(endpoint="/x", method="GET", status="200").inc()
    metrics.HTTP_REQUEST_DURATION.labels(endpoint="/x").observe(0.01)
    metrics.EndpointObserver.request("completions", 0.02, "ok")
    metrics.EndpointObserver.error("timeout")
    metrics.EndpointObserver.tokens(5, 1)
    metrics.EndpointObserver.retry("http_429")
    (tmp_path / "rev-20250101T030000Z.dump").write_bytes(b"PGDMP")
    registry = metrics.build_registry(
        [
            metrics.QueueDepthCollector(REDIS_TEST_URL, [queues.DEFAULT]),
            metrics.WorkerMemoryCollector(),
            metrics.BackupAgeCollector(tmp_path),
        ]
    )
    exposed = {name for name, _ in _samples(generate_latest(registry).decode())}
    ours = {n for n in exposed if not n.startswith(("process_", "python_"))}
    # The GPU series need a GPU (or NVML's stand-in: tests/unit/test_gpu_metrics.py).
    assert ours == set(metrics.METRIC_NAMES) - GPU_METRIC_NAMES


class _BrokenSeries:
    """A metric whose every call raises, like a full multiprocess directory would."""

    def labels(self, **_: str) -> _BrokenSeries:
        raise OSError("No space left on device")

    inc = dec = set = observe = labels


def test_recording_never_fails_the_caller(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics, "JOBS_FINISHED", _BrokenSeries())
    monkeypatch.setattr(metrics, "MODEL_LOAD_DURATION", _BrokenSeries())
    monkeypatch.setattr(metrics, "CONSENSUS_VALIDATORS_ACTIVE", _BrokenSeries())
    assert metrics.job_finished("verify", "failed", None) is None
    assert metrics.observe_model_load("gpt2", "cpu", 0.5) is None
    with metrics.validator_running():
        ran = True
    assert ran


def test_a_wrong_call_is_an_error_not_a_silently_missing_count() -> None:
    with pytest.raises(TypeError):
        metrics.job_finished("verify", "failed")  # the verdict is missing
    with pytest.raises(TypeError):
        metrics.consensus_round(outcome="published", seconds=0.1)  # no such argument
    with pytest.raises(AttributeError):
        metrics.job_finishd  # noqa: B018 - a misspelt helper fails where it is named


def test_labels_stay_bounded() -> None:
    before = REGISTRY.get_sample_value("consensus_validators_total", {"vote": "other"}) or 0
    metrics.validator_vote("banana")
    assert REGISTRY.get_sample_value("consensus_validators_total", {"vote": "other"}) == before + 1
    metrics.job_finished("verify", "failed", None)
    assert (
        REGISTRY.get_sample_value(
            "rev_jobs_finished_total", {"kind": "verify", "status": "failed", "verdict": "none"}
        )
        is not None
    )


# --------------------------------------------------------------------------- Flask
def _app() -> Flask:
    app = Flask("metrics-test")

    @app.get("/v1/jobs/<job_id>")
    def get_job(job_id: str) -> dict[str, str]:
        return {"id": job_id}

    @app.get("/boom")
    def boom() -> str:
        raise RuntimeError("boom")

    metrics.init_app(app)
    return app


def test_init_app_counts_requests_by_rule_and_serves_metrics() -> None:
    client = _app().test_client()
    before = client.get("/metrics").get_data(as_text=True)
    assert client.get("/v1/jobs/1").status_code == 200
    assert client.get("/v1/jobs/2").status_code == 200
    assert client.get("/boom").status_code == 500
    assert client.get("/nowhere").status_code == 404
    resp = client.get("/metrics")
    assert resp.status_code == 200
    assert resp.content_type.startswith("text/plain")
    after = resp.get_data(as_text=True)

    def delta(name: str, **labels: str) -> float:
        return _value(after, name, **labels) - _value(before, name, **labels)

    job = {"endpoint": "/v1/jobs/<job_id>", "method": "GET", "status": "200"}
    assert delta("rev_http_requests_total", **job) == 2
    assert delta("rev_http_requests_total", endpoint="/boom", method="GET", status="500") == 1
    assert delta("rev_http_requests_total", endpoint="<unmatched>", method="GET", status="404") == 1
    assert delta("rev_http_request_duration_seconds_count", endpoint="/v1/jobs/<job_id>") == 2
    # scrapes are not requests worth counting, and raw paths never become labels
    assert delta("rev_http_requests_total", endpoint="/metrics", method="GET", status="200") == 0
    assert 'endpoint="/v1/jobs/1"' not in after


# --------------------------------------------------------------------------- Redis
def test_queue_depth_reads_redis_at_scrape_time() -> None:
    _need_redis()
    import redis

    client = redis.Redis.from_url(REDIS_TEST_URL)
    name = f"rev-test-queue-{uuid.uuid4().hex[:8]}"
    empty = f"rev-test-empty-{uuid.uuid4().hex[:8]}"
    prio = f"{name}{metrics.QueueDepthCollector.PRIORITY_SEP}6"
    try:
        client.rpush(name, "a", "b", "c")
        client.rpush(prio, "d", "e")
        app = Flask("queue-test")
        metrics.init_app(app, redis_url=REDIS_TEST_URL, queues=[name, empty])
        text = app.test_client().get("/metrics").get_data(as_text=True)
        assert _value(text, "queue_depth", queue=name) == 5
        assert ("queue_depth", frozenset({("queue", empty)})) in _samples(text)
        client.lpop(name)
        text = app.test_client().get("/metrics").get_data(as_text=True)
        assert _value(text, "queue_depth", queue=name) == 4
    finally:
        client.delete(name, prio)


def test_queue_depth_survives_a_dead_broker() -> None:
    collector = metrics.QueueDepthCollector("redis://127.0.0.1:1/0", [queues.DEFAULT])
    assert list(collector.collect()) == []


# --------------------------------------------------------------------------- workers
def test_worker_memory_reports_main_and_children() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        family = next(iter(metrics.WorkerMemoryCollector().collect()))
        roles = {s.labels["pid"]: s.labels["role"] for s in family.samples}
        assert roles[str(os.getpid())] == "main"
        assert roles[str(child.pid)] == "child"
        assert all(s.value > 0 for s in family.samples)
    finally:
        child.kill()
        child.wait()


def test_mark_process_dead_without_multiproc_dir_is_a_noop(monkeypatch) -> None:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    metrics.mark_process_dead(12345)


_WORKER_SCRIPT = textwrap.dedent(
    """
    import json, os, sys, urllib.request
    from rev_tasks.ops.multiproc import prepare_multiproc_dir
    prepare_multiproc_dir(os.environ["TEST_PROM_DIR"])  # before prometheus_client loads
    from rev_tasks import metrics, queues
    assert metrics.multiprocess_enabled()
    server, _ = metrics.start_worker_metrics_server(0, "127.0.0.1")
    url = f"http://127.0.0.1:{server.server_port}/metrics"
    before = urllib.request.urlopen(url).read().decode()
    pid = os.fork()
    if pid == 0:  # a pool child: records, then exits without any cleanup hook
        metrics.job_finished("verify", "succeeded", "DIFFERENT")
        metrics.job_finished("verify", "failed", None)
        metrics.consensus_round("no_quorum")
        metrics.validator_vote("reject")
        metrics.observe_inference("gpt2", "cpu", 0.12)
        metrics.set_models_cached(3)
        os._exit(0)
    os.waitpid(pid, 0)
    after = urllib.request.urlopen(url).read().decode()
    print(json.dumps({"pid": pid, "before": before, "text": after}))
    server.shutdown()
    """
)

#: Series a worker exports at 0 from its start (closed label sets), so that the first
#: event after a restart is an increase from 0 that rate() and increase() can see.
FIRST_EVENTS = [
    ("rev_jobs_finished_total", {"kind": "verify", "status": "failed", "verdict": "none"}),
    ("consensus_rounds_total", {"outcome": "no_quorum"}),
    ("consensus_validators_total", {"vote": "reject"}),
]


def test_worker_server_merges_children_and_forgets_dead_ones(tmp_path: Path) -> None:
    prom = tmp_path / "prom"
    prom.mkdir()
    # garbage from a "previous run": unwiped, it would break the merge
    (prom / "counter_99999999.db").write_bytes(b"stale")
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    env.update(TEST_PROM_DIR=str(prom), REV_BACKUP_DIR="")
    proc = subprocess.run(
        [sys.executable, "-c", _WORKER_SCRIPT],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    text = out["text"]
    labels = {"kind": "verify", "status": "succeeded", "verdict": "DIFFERENT"}
    assert _value(text, "rev_jobs_finished_total", **labels) == 1
    # First events: present at 0 in the scrape before them, 1 in the scrape after.
    before, after = _samples(out["before"]), _samples(text)
    for name, first in FIRST_EVENTS:
        assert before[(name, frozenset(first.items()))] == 0, (name, first)
        assert after[(name, frozenset(first.items()))] == 1, (name, first)
    every = {
        frozenset({"kind": k, "status": s, "verdict": v}.items())
        for k in metrics.KINDS
        for s, v in metrics.FINISHED
    }
    assert every <= {labels for name, labels in before if name == "rev_jobs_finished_total"}
    assert (
        _value(text, "model_inference_duration_seconds_count", model_family="gpt2", device="cpu")
        == 1
    )
    # the child died without mark_process_dead: its live gauge must not linger
    assert _value(text, "models_cached") == 0
    assert "worker_memory_bytes" in text


_COORDINATOR_SCRIPT = textwrap.dedent(
    """
    import os
    from rev_tasks.ops.multiproc import prepare_multiproc_dir
    prepare_multiproc_dir(os.environ["TEST_PROM_DIR"])  # as gunicorn.conf.py does
    from flask import Flask
    from rev_tasks import metrics
    app = Flask("coordinator")
    metrics.init_app(app)
    print(app.test_client().get("/metrics").get_data(as_text=True))
    """
)


def test_the_coordinator_exports_its_own_series_only(tmp_path: Path) -> None:
    """No worker series as zeros on the coordinator; its own counters at 0 from the start."""
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    env["TEST_PROM_DIR"] = str(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-c", _COORDINATOR_SCRIPT],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    samples = _samples(proc.stdout)
    families = {f.name for f in text_string_to_metric_families(proc.stdout)}
    assert not families & metrics.WORKER_ONLY, sorted(families & metrics.WORKER_ONLY)
    for kind in metrics.KINDS:
        assert samples[("rev_jobs_submitted_total", frozenset({("kind", kind)}))] == 0
        cancelled = {"kind": kind, "status": "cancelled", "verdict": "none"}
        assert samples[("rev_jobs_finished_total", frozenset(cancelled.items()))] == 0


def test_closed_label_sets_match_the_lifecycle_and_the_api() -> None:
    from typing import get_args

    from rev_tasks import jobs
    from web.schemas import IdentifyJobRequest, VerifyJobRequest

    assert {s for s, _ in metrics.FINISHED} == jobs.TERMINAL
    assert {v for _, v in metrics.FINISHED} <= metrics.VERDICTS
    kinds = {
        get_args(model.model_fields["kind"].annotation)[0]
        for model in (VerifyJobRequest, IdentifyJobRequest)
    }
    assert kinds == set(metrics.KINDS)


def test_backup_buckets_fit_a_20_ms_backup() -> None:
    edges = metrics.BACKUP_DURATION._upper_bounds
    assert edges[0] <= 0.01 and sum(e <= 1.0 for e in edges) >= 5, edges
    assert edges[-2] >= 3600  # an hour-long PostgreSQL dump still lands in a bucket


def test_prepare_multiproc_dir_refuses_when_too_late(monkeypatch) -> None:
    from rev_tasks.ops.multiproc import prepare_multiproc_dir

    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    with pytest.raises(RuntimeError, match="already imported"):
        prepare_multiproc_dir()


def test_start_worker_metrics_server_respects_off(monkeypatch) -> None:
    monkeypatch.setenv("REV_METRICS_PORT", "off")
    assert metrics.start_worker_metrics_server() is None


def test_start_worker_metrics_server_survives_a_taken_port() -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        assert metrics.start_worker_metrics_server(sock.getsockname()[1], "127.0.0.1") is None


def test_backup_age_collector_reads_the_newest_file(tmp_path: Path) -> None:
    assert list(metrics.BackupAgeCollector(tmp_path / "missing").collect()) == []
    (tmp_path / "rev-20250101T030000Z.dump").write_bytes(b"PGDMP")
    (tmp_path / "rev-20250102T030000Z.dump").write_bytes(b"PGDMP")
    family = next(iter(metrics.BackupAgeCollector(tmp_path).collect()))
    assert family.samples[0].value == 1735786800.0  # 2025-01-02T03:00:00Z


def test_scrape_over_http_in_single_process_mode() -> None:
    started = metrics.start_worker_metrics_server(0, "127.0.0.1")
    assert started is not None
    server, _ = started
    try:
        url = f"http://127.0.0.1:{server.server_port}/metrics"
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        assert "worker_memory_bytes" in text
    finally:
        server.shutdown()


def test_metrics_and_backups_do_not_import_each_other() -> None:
    """metrics reads backup files through ops.backup_files; only ops.backup records metrics."""
    import ast

    from rev_tasks.ops import backup, backup_files

    def imported(module: object) -> set[str]:
        tree = ast.parse(Path(module.__file__).read_text())  # type: ignore[attr-defined]
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        for n in ast.walk(tree):
            if isinstance(n, ast.ImportFrom) and n.module:
                names |= {n.module} | {f"{n.module}.{a.name}" for a in n.names}
        return names

    assert "rev_tasks.ops.backup" not in imported(metrics)
    assert "rev_tasks.metrics" in imported(backup)
    assert not {"rev_tasks.metrics", "rev_tasks.ops.backup"} & imported(backup_files)


@pytest.mark.parametrize("gpus", [0, 2])
def test_the_coordinator_reports_the_declared_queues_only(gpus: int) -> None:
    """REV_GPU_COUNT decides the inference.cudaN series: none on a CPU-only farm."""
    _need_redis()
    import dataclasses

    from rev_tasks.settings import Settings
    from web import create_app

    settings = dataclasses.replace(Settings.from_env(), gpu_count=gpus, redis_url=REDIS_TEST_URL)
    app = create_app({"TESTING": True, "REV_SETTINGS": settings})
    text = app.test_client().get("/metrics").get_data(as_text=True)
    reported = {dict(labels)["queue"] for name, labels in _samples(text) if name == "queue_depth"}
    assert reported == set(queues.declared_queues(gpus))
    assert {q for q in reported if queues.is_gpu_queue(q)} == set(queues.gpu_queues(gpus))


# --------------------------------------------------------------------------- endpoint jobs
def test_endpoint_series_start_at_zero_for_every_class() -> None:
    """A worker's first endpoint timeout, 429 retry or token must show in ``rate()``."""
    metrics.preinitialise_worker()
    text = generate_latest(REGISTRY).decode()
    samples = _samples(text)
    for cls in metrics.ENDPOINT_ERROR_CLASSES:
        assert ("rev_endpoint_errors_total", frozenset({("error_class", cls)})) in samples, cls
    for reason in metrics.ENDPOINT_RETRY_REASONS:
        assert ("rev_endpoint_retries_total", frozenset({("reason", reason)})) in samples
    for kind in metrics.ENDPOINT_TOKEN_TYPES:
        assert ("rev_endpoint_tokens_total", frozenset({("type", kind)})) in samples


def test_endpoint_observer_counts_and_bounds_its_labels() -> None:
    """Durations, errors, tokens and retries land in their series; a label value outside
    the closed sets (a URL, say) collapses into ``other`` instead of a new series."""
    before = generate_latest(REGISTRY).decode()
    obs = metrics.EndpointObserver
    obs.request("completions", 0.03, "ok")
    obs.request("https://tenant.example/v1/secret-path", 0.03, "error")
    obs.error("http_429")
    obs.error("a-url-or-anything")
    obs.tokens(7, 1)
    obs.retry("http_429")
    after = generate_latest(REGISTRY).decode()

    def delta(name: str, **labels: str) -> float:
        return _value(after, name, **labels) - _value(before, name, **labels)

    assert (
        delta("rev_endpoint_request_duration_seconds_count", route="completions", outcome="ok") == 1
    )
    assert delta("rev_endpoint_request_duration_seconds_count", route="other", outcome="error") == 1
    assert delta("rev_endpoint_errors_total", error_class="http_429") == 1
    assert delta("rev_endpoint_errors_total", error_class="other") == 1
    assert delta("rev_endpoint_tokens_total", type="prompt") == 7
    assert delta("rev_endpoint_tokens_total", type="completion") == 1
    assert delta("rev_endpoint_retries_total", reason="http_429") == 1
    assert "secret-path" not in after
