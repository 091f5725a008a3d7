"""rev_tasks.testing.faults: every hook is inert without the enable flag and does its one
thing with it (the farm-level effects are in tests/integration/test_faults.py)."""

from __future__ import annotations

import ast
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rev_tasks.testing import faults

ROOT = Path(__file__).resolve().parents[2]
ALL_FAULTS = {
    "REV_TEST_FAULTY_VALIDATORS": "0,1:random,2:crash",
    "REV_TEST_SLOW_BATCH_SECONDS": "0.3",
    "REV_TEST_SLOW_VALIDATION_SECONDS": "0.2",
    "REV_TEST_FORGE_INFERENCE_PATH": "forged",
    "REV_TEST_KILL_INFERENCE_PATH": "bomb",
}


@pytest.fixture
def injected(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """Every fault variable set, the enable flag not yet; the cache reset around the test."""
    for name, value in ALL_FAULTS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv(faults.ENABLE, raising=False)
    faults.reset()
    yield monkeypatch
    faults.reset()


def _enable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(faults.ENABLE, "1")
    faults.reset()


def test_without_the_flag_every_hook_leaves_things_alone(injected: pytest.MonkeyPatch) -> None:
    assert faults.active() == faults.Faults()
    faults.before_inference("/models/bomb")  # would SIGKILL this test process
    reference, candidate = object(), object()
    assert faults.computed_candidate("/models/forged", reference, candidate) is candidate
    start = time.perf_counter()
    faults.after_batch()
    assert time.perf_counter() - start < 0.1
    faults.before_validation(2)
    assert time.perf_counter() - start < 0.1
    assert [faults.validator_verdict(v, "job", "SAME") for v in range(3)] == ["SAME"] * 3


def test_with_the_flag_each_hook_injects_its_fault(injected: pytest.MonkeyPatch) -> None:
    _enable(injected)
    reference, candidate = object(), object()
    assert faults.computed_candidate("/models/forged", reference, candidate) is reference
    assert faults.computed_candidate("/models/honest", reference, candidate) is candidate
    fingerprint = {"signatures": []}  # a registered reference cannot stand in for a model
    assert faults.computed_candidate("/models/forged", fingerprint, candidate) is candidate
    start = time.perf_counter()
    faults.after_batch()
    assert time.perf_counter() - start >= 0.3
    with pytest.raises(RuntimeError, match="validator 2 crashed"):
        faults.before_validation(2)
    start = time.perf_counter()
    faults.before_validation(0)  # a liar does not crash; every validator is slow
    assert time.perf_counter() - start >= 0.2
    assert faults.validator_verdict(0, "job", "SAME") == "DIFFERENT"
    assert faults.validator_verdict(0, "job", "INVALID") == "SAME"
    assert {faults.validator_verdict(1, "job", "SAME") for _ in range(200)} == set(faults.VERDICTS)
    assert faults.validator_verdict(3, "job", "UNDECIDED") == "UNDECIDED"


def test_the_kill_hook_sigkills_only_a_marked_candidate() -> None:
    code = (
        "from rev_tasks.testing import faults\n"
        "faults.before_inference('/models/honest')\n"
        "print('survived', flush=True)\n"
        "faults.before_inference('/models/bomb')\n"
        "print('not reached')\n"
    )
    env = {**ALL_FAULTS, faults.ENABLE: "1"}
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert proc.stdout.split() == ["survived"]


def test_production_code_calls_one_hook_per_point_and_nothing_else() -> None:
    """The tasks reach fault injection only through the hooks, one call per hook point."""
    hooks = {"before_inference", "computed_candidate", "after_batch"}
    hooks |= {"before_validation", "validator_verdict", "endpoint_client"}
    calls: list[str] = []
    for path in sorted((ROOT / "rev_tasks").rglob("*.py")):
        if "testing" in path.relative_to(ROOT).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and _is_faults(node.value):
                calls.append(node.attr)
            if isinstance(node, ast.ImportFrom) and node.module == "rev_tasks.testing.faults":
                calls.extend(f"import {a.name}" for a in node.names)
    assert sorted(calls) == sorted(hooks)


def _is_faults(node: ast.AST) -> bool:
    return isinstance(node, ast.Name) and node.id == "faults"


def test_malformed_faults_stop_the_importing_process_at_start() -> None:
    env = {**os.environ, faults.ENABLE: "1", "REV_TEST_FAULTY_VALIDATORS": "1:sleepy"}
    proc = subprocess.run(
        [sys.executable, "-c", "import rev_tasks.testing.faults"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode != 0 and "REV_TEST_FAULTY_VALIDATORS" in proc.stderr


def test_the_endpoint_forgery_moves_every_top_logprob_and_nothing_else() -> None:
    """What a forging endpoint worker records (REV_TEST_FORGE_ENDPOINT=1): each top-k value
    shifted by FORGE_SHIFT, the rest of the reply as it was; without the flag, nothing."""
    import json

    raw = json.dumps(
        {
            "id": "x",
            "choices": [
                {"text": " Paris", "logprobs": {"top_logprobs": [{" Paris": -0.1, " a": -3.0}]}}
            ],
            "usage": {"prompt_tokens": 5, "completion_tokens": 1},
        }
    ).encode()
    out = json.loads(faults.forged_reply(raw))
    top = out["choices"][0]["logprobs"]["top_logprobs"][0]
    assert top == {" Paris": -0.1 - faults.FORGE_SHIFT, " a": -3.0 - faults.FORGE_SHIFT}
    assert out["choices"][0]["text"] == " Paris" and out["usage"]["prompt_tokens"] == 5
    assert faults.forged_reply(b"not json") == b"not json"
    marker = object()
    assert faults.Faults.from_env({"REV_TEST_FORGE_ENDPOINT": "1"}).forge_endpoint is False
    assert faults.Faults.from_env(
        {faults.ENABLE: "1", "REV_TEST_FORGE_ENDPOINT": "1"}
    ).forge_endpoint
    faults.reset()
    assert faults.endpoint_client(marker) is marker  # this process: the flag is off
