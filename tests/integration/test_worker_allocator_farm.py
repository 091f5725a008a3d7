"""`rev worker` as deployed: its processes run on jemalloc, and a job through them is
published with five votes (the allocator's choice: rev_tasks/ops/memory.py)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from rev_tasks.ops.memory import active_allocator, find_jemalloc
from rev_tasks.queues import CONSENSUS_WORKER_QUEUES, INFERENCE_CPU
from tests.conftest import service_unavailable
from tests.integration.farm import FarmWorker, submit, wait_job

pytestmark = pytest.mark.integration

REV_WORKER = [sys.executable, "-m", "rev_tasks.cli", "worker"]


@pytest.fixture(scope="module")
def logs(tmp_path_factory: Any) -> Path:
    if find_jemalloc() is None:
        service_unavailable("libjemalloc.so.2 not installed (scripts/install_tools.sh)")
    return tmp_path_factory.mktemp("allocator-logs")


@pytest.fixture(scope="module")
def workers(farm_env: dict[str, str], logs: Path) -> Any:
    started = {
        "cpu": FarmWorker(
            farm_env, logs, queues=INFERENCE_CPU, name="je-cpu",
            command=[*REV_WORKER, "--cpu", "-c", "1"],
        ),
        "consensus": FarmWorker(
            farm_env, logs, queues=",".join(CONSENSUS_WORKER_QUEUES), name="je-consensus",
            command=[*REV_WORKER, "--consensus", "-c", "2"],
        ),
    }  # fmt: skip
    try:
        for worker in started.values():
            worker.start()
        yield started
    finally:
        for worker in started.values():
            worker.stop()


def _allocators(worker: FarmWorker) -> set[str]:
    pids = [worker.proc.pid, *worker.children()]
    assert len(pids) >= 2, f"{worker.name}: no pool child"
    return {active_allocator(pid) for pid in pids}


def test_rev_worker_processes_run_on_jemalloc(workers: dict[str, FarmWorker]) -> None:
    for worker in workers.values():
        assert _allocators(worker) == {"jemalloc"}, worker.name
        assert "allocator jemalloc" in worker.log_tail(20000), worker.name


def test_rev_worker_keeps_glibc_when_told(farm_env: dict[str, str], logs: Path) -> None:
    worker = FarmWorker(
        {**farm_env, "REV_WORKER_ALLOCATOR": "glibc"},
        logs,
        queues=",".join(CONSENSUS_WORKER_QUEUES),
        name="glibc",
        command=[*REV_WORKER, "--consensus", "-c", "1"],
    )  # no job runs meanwhile: stopped before the next test
    try:
        worker.start()
        assert _allocators(worker) == {"glibc"}
        assert "allocator glibc" in worker.log_tail(20000)
    finally:
        worker.stop()


def test_a_job_on_jemalloc_workers_is_published_5_of_5(
    workers: dict[str, FarmWorker], client: Any, model_dirs: dict[str, Path]
) -> None:
    for candidate, expected in (("gpt2-a-copy", "SAME"), ("gpt2-b", "DIFFERENT")):
        body = {
            "kind": "verify",
            "reference": {"path": str(model_dirs["gpt2-a"])},
            "candidate": {"path": str(model_dirs[candidate])},
            "max_challenges": 32,
        }
        doc = wait_job(client, submit(client, body))
        assert doc["status"] == "succeeded", doc
        assert doc["result"]["verdict"] == expected
        votes = doc["result"]["consensus"]["votes"]
        assert len(votes) == 5 and {v["verdict"] for v in votes} == {expected}
