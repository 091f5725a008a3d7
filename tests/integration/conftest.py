"""Integration fixtures: real Redis, real PostgreSQL, real ``celery worker`` subprocesses.

The farm runs exactly as deployed: ``.venv/bin/celery -A rev_tasks worker -P prefork -c 1``
processes consume the declared queues, and the Flask app (test client) enqueues into the
same Redis. Models are built once per session into a temporary model root.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.farm import ALL_QUEUES, TEST_KEY, FarmWorker, purge, reconfigure
from tests.models import (
    build_tiny_gpt2,
    build_tiny_llama,
    copy_model,
    corrupt_copy,
    gaussian_noise,
    minilm_path,
    save_variant,
)

pytestmark = pytest.mark.integration


# ----------------------------------------------------------------------------- models
@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every model folder the farm tests use, under one model root (plus MiniLM's own)."""
    root = tmp_path_factory.mktemp("models")
    outside = tmp_path_factory.mktemp("outside")
    d: dict[str, Path] = {"root": root, "outside_root": outside}
    d["gpt2-a"] = build_tiny_gpt2(root / "gpt2-a", seed=0)
    d["gpt2-b"] = build_tiny_gpt2(root / "gpt2-b", seed=1)
    d["gpt2-a-copy"] = copy_model(d["gpt2-a"], root / "gpt2-a-copy")
    d["llama-a"] = build_tiny_llama(root / "llama-a", seed=0)
    d["corrupt"] = corrupt_copy(d["gpt2-a"], root / "corrupt")
    d["minilm"] = minilm_path()
    d["minilm-copy"] = copy_model(d["minilm"], root / "minilm-copy")
    d["minilm-noisy"] = save_variant(d["minilm"], root / "minilm-noisy", gaussian_noise(0.01))
    not_a_model = root / "not-a-model"
    not_a_model.mkdir()
    (not_a_model / "README.txt").write_text("just a folder\n")
    d["not-a-model"] = not_a_model
    d["outside"] = copy_model(d["gpt2-a"], outside / "gpt2-outside")
    link = root / "escape-link"
    link.symlink_to(d["outside"], target_is_directory=True)
    d["escape-link"] = link
    return d


# ----------------------------------------------------------------------------- environment
@pytest.fixture(scope="module")
def farm_env(
    redis_url: str, postgres_url: str, model_dirs: dict[str, Path], tmp_path_factory: Any
) -> Iterator[dict[str, str]]:
    """The farm's environment, applied to this process and passed to every worker.

    Module-scoped and restored afterwards, so tests outside tests/integration never see
    the farm's DATABASE_URL or key file in their environment.
    """
    var = tmp_path_factory.mktemp("var")
    key_file = var / "secret.key"
    key_file.write_bytes(TEST_KEY)
    env = {
        "DATABASE_URL": postgres_url,
        "REDIS_URL": redis_url,
        "REV_MODEL_ROOTS": os.pathsep.join([str(model_dirs["root"]), str(model_dirs["minilm"])]),
        "REV_SECRET_KEY_FILE": str(key_file),
        "REV_VAR_DIR": str(var),
        "REV_INSPECT_TIMEOUT": "0.5",
        "REV_INSPECT_CACHE_SECONDS": "1",
        "REV_FINGERPRINT_CHALLENGES": "64",
        "REV_MAX_MODELS_PER_WORKER": "3",
        "REV_METRICS_PORT": "0",
        "REV_ENABLE_FAULT_INJECTION": "",
        "REV_TEST_FAULTY_VALIDATORS": "",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    reconfigure()
    purge(redis_url)
    yield env
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    reconfigure()


@pytest.fixture(scope="module")
def start_worker(farm_env: dict[str, str], tmp_path_factory: Any) -> Iterator[Any]:
    """Factory: ``start_worker(queues=..., name=..., **env)``; every worker is stopped at exit."""
    log_dir = tmp_path_factory.mktemp("worker-logs")
    started: list[FarmWorker] = []

    def start(queues: str = ALL_QUEUES, name: str = "w", **env: str) -> FarmWorker:
        worker = FarmWorker({**farm_env, **env}, log_dir, queues=queues, name=name)
        started.append(worker)
        return worker.start()

    yield start
    for worker in started:
        worker.stop()
    purge(farm_env["REDIS_URL"])


# ----------------------------------------------------------------------------- the API
@pytest.fixture(scope="module")
def app(farm_env: dict[str, str]) -> Any:
    from rev_tasks.settings import Settings
    from web import create_app

    return create_app({"TESTING": True, "REV_SETTINGS": Settings.from_env(), "REV_METRICS": False})


@pytest.fixture(scope="module")
def client(app: Any) -> Any:
    return app.test_client()
