"""GPU pinning end to end: ``rev worker --gpu 0`` consumes GPU 0's queue on the device.

Skipped without a CUDA device (it is not a missing *service*: CI has no GPU). Runs on an
embedded-style stack: SQLite and whatever Redis ``REDIS_URL`` names, so it needs no
PostgreSQL on the GPU machine. A CPU worker runs the other queues: the validators
re-execute the GPU's challenges on the CPU, which is the cross-device consensus check.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rev_tasks.queues import gpu_queue
from rev_tasks.testing.harness import ALL_QUEUES, ROOT, applied_environment, free_port
from rev_tasks.testing.variants import build_tiny_causal_lm, build_tiny_gpt2, copy_model
from tests.integration.farm import (
    TEST_KEY,
    FarmWorker,
    assert_drained,
    purge,
    register,
    rev_verify,
    submit,
    wait_job,
)

pytestmark = [pytest.mark.integration, pytest.mark.gpu]


def _cuda() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False


@pytest.fixture(scope="module")
def gpu_farm(redis_url: str, tmp_path_factory: Any) -> Iterator[dict[str, Any]]:
    if not _cuda():
        pytest.skip("no CUDA device")
    root = tmp_path_factory.mktemp("gpu-models")
    dirs = {
        "gpt2-a": build_tiny_gpt2(root / "gpt2-a", seed=0),
        "gpt2-b": build_tiny_gpt2(root / "gpt2-b", seed=1),
    }
    dirs["gpt2-a-copy"] = copy_model(dirs["gpt2-a"], root / "gpt2-a-copy")
    var = tmp_path_factory.mktemp("gpu-var")
    (var / "secret.key").write_bytes(TEST_KEY)
    env = {
        "DATABASE_URL": f"sqlite:///{var / 'rev.db'}",
        "REDIS_URL": redis_url,
        "REV_MODEL_ROOTS": str(root),
        "REV_SECRET_KEY_FILE": str(var / "secret.key"),
        "REV_VAR_DIR": str(var),
        "REV_INSPECT_TIMEOUT": "0.5",
        "REV_INSPECT_CACHE_SECONDS": "1",
        "REV_FINGERPRINT_CHALLENGES": "64",
        "REV_METRICS_PORT": "0",
        "REV_GPU_COUNT": "1",
    }
    with applied_environment(env):
        purge(redis_url)
        proc = subprocess.run(
            [sys.executable, "-m", "alembic", "upgrade", "head"],
            cwd=ROOT,
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
        logs = tmp_path_factory.mktemp("gpu-logs")
        metrics_port = free_port()
        gpu = FarmWorker(
            {**env, "REV_METRICS_PORT": str(metrics_port)},
            logs,
            queues=gpu_queue(0),
            name="gpu0",
            command=[sys.executable, "-m", "rev_tasks.cli", "worker", "--gpu", "0"],
        )
        cpu = FarmWorker(env, logs, queues=ALL_QUEUES, name="cpu")
        workers = [gpu.start(), cpu.start()]
        from rev_tasks.settings import Settings
        from web import create_app

        settings = Settings.from_env()
        app = create_app({"TESTING": True, "REV_SETTINGS": settings, "REV_METRICS": False})
        try:
            yield {
                "client": app.test_client(),
                "dirs": dirs,
                "env": env,
                "gpu": gpu,
                "gpu_metrics": f"http://127.0.0.1:{metrics_port}/metrics",
            }
        finally:
            for w in workers:
                print(f"--- {w.name} log tail\n{w.log_tail(3000)}")
                w.stop()
            purge(redis_url)


def _check_on_gpu(doc: dict[str, Any], gpu: FarmWorker) -> None:
    assert doc["device"] == "cuda" and doc["queue"] == gpu_queue(0), doc
    executed = doc["result"]["executed_on"]
    assert executed["device"].startswith("cuda"), executed
    assert executed["worker"] == gpu.name


def test_readyz_lists_the_gpu_queue(gpu_farm: dict[str, Any]) -> None:
    body = gpu_farm["client"].get("/readyz").get_json()
    assert body["checks"]["gpu_queues"] == [gpu_queue(0)], body


@pytest.mark.parametrize(
    ("candidate", "device", "expected"),
    [
        ("gpt2-a-copy", "cuda", "SAME"),
        ("gpt2-b", "cuda", "DIFFERENT"),
        ("gpt2-a-copy", "auto", "SAME"),
    ],
)
def test_verify_on_the_gpu_worker(
    gpu_farm: dict[str, Any], candidate: str, device: str, expected: str
) -> None:
    client, dirs = gpu_farm["client"], gpu_farm["dirs"]
    body = {
        "kind": "verify",
        "reference": {"path": str(dirs["gpt2-a"])},
        "candidate": {"path": str(dirs[candidate])},
        "device": device,
    }
    doc = wait_job(client, submit(client, body), timeout=240)
    assert doc["status"] == "succeeded", doc
    assert doc["result"]["verdict"] == expected
    assert doc["result"]["consensus"]["agreed"] is True
    _check_on_gpu(doc, gpu_farm["gpu"])
    local = rev_verify(dirs["gpt2-a"], dirs[candidate], gpu_farm["env"]["REV_SECRET_KEY_FILE"])
    assert local["verdict"] == expected


def test_fingerprint_and_verify_against_id_on_gpu(gpu_farm: dict[str, Any]) -> None:
    client, dirs = gpu_farm["client"], gpu_farm["dirs"]
    model = register(client, "gpt2-a", dirs["gpt2-a"], timeout=240)
    assert model["status"] == "ready", model
    body = {
        "kind": "verify",
        "reference": "gpt2-a",
        "candidate": {"path": str(dirs["gpt2-a-copy"])},
        "device": "cuda",
    }
    doc = wait_job(client, submit(client, body), timeout=240)
    assert doc["status"] == "succeeded" and doc["result"]["verdict"] == "SAME", doc
    _check_on_gpu(doc, gpu_farm["gpu"])


def test_deep_cuda_job_is_published_by_cpu_validators_5_of_5(gpu_farm: dict[str, Any]) -> None:
    """A 24-layer GPT-2 run on the GPU, its sampled records re-executed on the CPU worker:
    all five validators find CUDA's records within the re-execution allowance
    (docs/statistics.md §11) and vote for the verdict."""
    client, dirs = gpu_farm["client"], gpu_farm["dirs"]
    root = dirs["gpt2-a"].parent
    deep = build_tiny_causal_lm(root / "deep-a", "gpt2", seed=0, layers=24, hidden=128)
    deep_copy = copy_model(deep, root / "deep-a-copy")
    body = {
        "kind": "verify",
        "reference": {"path": str(deep)},
        "candidate": {"path": str(deep_copy)},
        "device": "cuda",
    }
    doc = wait_job(client, submit(client, body), timeout=240)
    assert doc["status"] == "succeeded", doc
    assert doc["result"]["verdict"] == "SAME"
    _check_on_gpu(doc, gpu_farm["gpu"])
    consensus = doc["result"]["consensus"]
    assert consensus["agreeing"] == 5 and consensus["agreed"] is True, consensus
    assert [v["verdict"] for v in consensus["votes"]] == ["SAME"] * 5


def test_gpu_worker_exports_its_gpu(gpu_farm: dict[str, Any]) -> None:
    """`rev worker --gpu 0` sets REV_WORKER_DEVICE=cuda: its metrics carry NVML's series."""
    import requests
    from prometheus_client.parser import text_string_to_metric_families

    from rev_tasks.ops.gpu import MEMORY_TOTAL, MEMORY_USED, UTILIZATION

    text = requests.get(gpu_farm["gpu_metrics"], timeout=10).text
    samples = {s.name: s for f in text_string_to_metric_families(text) for s in f.samples}
    assert {UTILIZATION, MEMORY_USED, MEMORY_TOTAL} <= samples.keys(), sorted(samples)
    assert samples[MEMORY_TOTAL].value > 0 and samples[MEMORY_TOTAL].labels["gpu"] == "0"


def test_gpu_queues_drained(gpu_farm: dict[str, Any]) -> None:
    assert_drained(gpu_farm["env"]["REDIS_URL"])


def test_worker_cli_pins_before_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    """`rev worker --gpu N` puts CUDA_VISIBLE_DEVICES in the exec'd environment."""
    from rev_tasks.cli.worker import worker_command
    from rev_tasks.settings import reset_settings

    monkeypatch.setenv("REV_GPU_COUNT", "4")  # inference.cuda0..3 declared
    reset_settings()
    try:
        argv, env = worker_command("gpu", gpu=3, environ={})
        with pytest.raises(ValueError, match="REV_GPU_COUNT"):
            worker_command("gpu", gpu=4, environ={})
    finally:
        monkeypatch.undo()
        reset_settings()
    assert env["CUDA_VISIBLE_DEVICES"] == "3" and env["REV_WORKER_DEVICE"] == "cuda"
    assert argv[argv.index("-Q") + 1] == gpu_queue(3)
    assert argv[argv.index("-c") + 1] == "1"
    assert Path(argv[0]).name.startswith("python")
