"""Integration fixtures: real Redis, real PostgreSQL, real ``celery worker`` subprocesses.

The farm runs exactly as deployed: ``.venv/bin/celery -A rev_tasks worker -P prefork -c 1``
processes consume the declared queues, and the Flask app (test client) enqueues into the
same Redis. Models are built once per session into a temporary model root.

Every API call authenticates: ``client`` sends an admin key (tenant ``ops``) by default;
``keys`` holds per-tenant keys (``alpha``, ``beta`` with submit+read, ``alpha-reader`` with
read only) and ``client_for(token)`` builds a client for any of them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from rev_tasks.testing.harness import ALL_QUEUES
from rev_tasks.testing.variants import (
    build_tiny_gpt2,
    build_tiny_llama,
    copy_model,
    corrupt_copy,
    gaussian_noise,
    minilm_path,
    save_transformed,
)
from tests.integration.farm import (
    FarmWorker,
    authed_client,
    create_key,
    farm_env_fixture,
    purge,
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
    d["minilm-noisy"] = save_transformed(d["minilm"], root / "minilm-noisy", gaussian_noise(0.01))
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
# The farm's environment, applied to this process and passed to every worker (module-scoped,
# restored afterwards); a module that needs other settings defines its own farm_env.
farm_env = farm_env_fixture()


@pytest.fixture(scope="module")
def start_worker(farm_env: dict[str, str], tmp_path_factory: Any) -> Iterator[Any]:
    """Factory: ``start_worker(queues=..., name=..., preexec_fn=..., **env)``; all stopped at exit."""
    log_dir = tmp_path_factory.mktemp("worker-logs")
    started: list[FarmWorker] = []

    def start(
        queues: str = ALL_QUEUES,
        name: str = "w",
        preexec_fn: Callable[[], None] | None = None,
        **env: str,
    ) -> FarmWorker:
        worker = FarmWorker(
            {**farm_env, **env}, log_dir, queues=queues, name=name, preexec_fn=preexec_fn
        )
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
def keys(farm_env: dict[str, str]) -> dict[str, str]:
    """Tokens by name: ``admin`` (tenant ops), ``alpha``, ``beta``, ``alpha-reader``."""
    return {
        "admin": create_key("ops", "admin,read,submit"),
        "alpha": create_key("alpha", "submit,read"),
        "beta": create_key("beta", "submit,read"),
        "alpha-reader": create_key("alpha", "read"),
    }


@pytest.fixture(scope="module")
def client_for(app: Any) -> Any:
    """``client_for(token)``: a test client that sends ``Authorization: Bearer token``."""
    return lambda token: authed_client(app, token)


@pytest.fixture(scope="module")
def client(app: Any, keys: dict[str, str]) -> Any:
    """The admin's client: every existing test runs authenticated, seeing all tenants."""
    return authed_client(app, keys["admin"])
