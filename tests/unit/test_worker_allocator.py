"""The workers that run models start with jemalloc preloaded (rev_tasks/ops/memory.py).

The choice (``REV_WORKER_ALLOCATOR``) is made by ``rev worker`` before it execs Celery; the
real library is loaded into real subprocesses here, and a model's signatures must not
depend on which allocator served its tensors.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rev_tasks.cli.worker import worker_command
from rev_tasks.ops import memory
from rev_tasks.testing.harness import ROOT, python_json
from rev_tasks.testing.variants import build_tiny_llama
from tests.conftest import service_unavailable

BASE = {"PATH": os.environ.get("PATH", "")}


@pytest.fixture(scope="module")
def jemalloc() -> str:
    lib = memory.find_jemalloc()
    if lib is None:
        service_unavailable("libjemalloc.so.2 not installed (scripts/install_tools.sh)")
    return str(lib)


def test_auto_preloads_jemalloc_before_anything_else(jemalloc: str) -> None:
    env = memory.allocator_env({**BASE, "LD_PRELOAD": "libother.so"})
    assert env["LD_PRELOAD"] == f"{jemalloc}:libother.so"
    assert memory.allocator_env(env)["LD_PRELOAD"] == env["LD_PRELOAD"]  # idempotent


@pytest.mark.parametrize(
    "settings",
    [{"REV_WORKER_ALLOCATOR": "glibc"}, {"REV_WORKER_MEMORY_TUNING": "0"}],
    ids=["glibc", "tuning-off"],
)
def test_glibc_and_tuning_off_leave_the_environment_alone(settings: dict[str, str]) -> None:
    env = {**BASE, **settings}
    assert memory.allocator_env(env) == env


def test_an_unknown_allocator_is_refused() -> None:
    with pytest.raises(ValueError, match="auto, jemalloc, glibc, not 'tcmalloc'"):
        memory.allocator_env({"REV_WORKER_ALLOCATOR": "tcmalloc"})


def test_jemalloc_required_but_missing_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # a missing library cannot be caused on a machine that has it: find_library is patched
    monkeypatch.setattr(memory.ctypes.util, "find_library", lambda name: None)
    assert "LD_PRELOAD" not in memory.allocator_env({"REV_WORKER_ALLOCATOR": "auto"})
    with pytest.raises(ValueError, match="apt-get install libjemalloc2"):
        memory.allocator_env({"REV_WORKER_ALLOCATOR": "jemalloc"})


def test_model_workers_get_it_and_the_endpoint_worker_does_not(jemalloc: str) -> None:
    for role, gpu in (("cpu", None), ("consensus", None)):
        _, env = worker_command(role, gpu=gpu, environ=dict(BASE))
        assert env["LD_PRELOAD"].split(":")[0] == jemalloc, role
    _, env = worker_command("endpoint", environ=dict(BASE))
    assert "LD_PRELOAD" not in env


def test_rev_worker_refuses_a_bad_allocator_with_a_message() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "rev_tasks.cli", "worker", "--cpu", "--dry-run"],
        env={**os.environ, "REV_WORKER_ALLOCATOR": "tcmalloc", "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert "REV_WORKER_ALLOCATOR must be one of" in out.stderr
    assert "Traceback" not in out.stderr


SIGNATURES = textwrap.dedent(
    """
    import json, sys
    import torch
    torch.set_num_threads(1)
    from rev_tasks.core.challenges import generate_challenges
    from rev_tasks.core.keys import DEMO_KEY
    from rev_tasks.inference import load_model, site_signatures
    from rev_tasks.ops.memory import active_allocator
    model = load_model(sys.argv[1])
    prompts = [c.prompt for c in generate_challenges(DEMO_KEY, 6)]
    sigs = site_signatures(model.pooled_states(prompts, model.sites), DEMO_KEY, 1024)
    print(json.dumps({"allocator": active_allocator(),
                      "sigs": [{str(k): v.tobytes().hex() for k, v in s.items()} for s in sigs]}))
    """
)


def _signatures(model: Path, environ: dict[str, str]) -> dict[str, object]:
    return python_json(SIGNATURES, str(model), env=environ, timeout=300)


def test_signatures_are_the_same_bits_under_either_allocator(jemalloc: str, tmp_path: Path) -> None:
    model = build_tiny_llama(tmp_path / "llama")
    glibc = _signatures(model, {**os.environ, "REV_WORKER_ALLOCATOR": "glibc"})
    je = _signatures(model, memory.allocator_env({**os.environ, "REV_WORKER_ALLOCATOR": "auto"}))
    assert (glibc["allocator"], je["allocator"]) == ("glibc", "jemalloc")
    assert len(glibc["sigs"]) == 6 and all(glibc["sigs"])  # six challenges, every site
    assert je["sigs"] == glibc["sigs"]
