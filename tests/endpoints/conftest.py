"""Real llama.cpp servers for the endpoint tests: one per GGUF variant, started once per session.

The GGUF files are built once per machine (rev_tasks/testing/ggufs.py caches them) and each
server runs with a small context and one thread. Under CI=true a missing llama-cpp-python
build fails the tests (scripts/llama_wheel.sh installs it); locally they skip with the reason.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from rev_tasks.testing import ggufs
from rev_tasks.testing.servers import LlamaServer, have_llama_server, start_llama_server
from rev_tasks.testing.smollm2 import smollm2_dir
from tests.conftest import service_unavailable


@pytest.fixture(scope="session")
def smollm2() -> Path:
    return smollm2_dir()


@pytest.fixture(scope="session")
def reference(smollm2: Path):
    from rev_tasks.endpoints.reference import Reference

    return Reference(smollm2, threads=1)


@pytest.fixture(scope="session")
def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., LlamaServer]]:
    """``serve(variant, logprobs=True)``: the session's server for that GGUF variant."""
    why = have_llama_server()
    if why:
        service_unavailable(why)
    logs = tmp_path_factory.mktemp("llama-logs")
    running: dict[tuple[str, bool], LlamaServer] = {}

    def get(variant: str, logprobs: bool = True) -> LlamaServer:
        key = (variant, logprobs)
        if key not in running:
            try:
                path = ggufs.build(variant)
            except ggufs.GGUFUnavailable as exc:
                service_unavailable(str(exc))
            running[key] = start_llama_server(path, logprobs=logprobs, log_dir=logs)
        return running[key]

    yield get
    for server in running.values():
        server.stop()
