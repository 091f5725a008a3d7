"""Consensus under lying validators (test-only fault injection read by the worker).

``REV_TEST_FAULTY_VALIDATORS="i,j"`` makes those validator indices vote the opposite verdict,
and only when ``REV_ENABLE_FAULT_INJECTION=1``. One liar of five leaves the verdict
published with 4/5; two liars leave no quorum, so no SAME/DIFFERENT is published.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.integration.farm import assert_drained, submit, wait_job

pytestmark = pytest.mark.integration


def _same_job(client: Any, model_dirs: dict[str, Path]) -> dict[str, Any]:
    body = {
        "kind": "verify",
        "reference": {"path": str(model_dirs["gpt2-a"])},
        "candidate": {"path": str(model_dirs["gpt2-a-copy"])},
        "device": "cpu",
    }
    return wait_job(client, submit(client, body))


def test_one_liar_leaves_the_verdict_unchanged(
    client: Any, start_worker: Any, model_dirs: dict[str, Path], farm_env: dict[str, str]
) -> None:
    worker = start_worker(
        name="liar1", REV_ENABLE_FAULT_INJECTION="1", REV_TEST_FAULTY_VALIDATORS="2"
    )
    try:
        doc = _same_job(client, model_dirs)
    finally:
        worker.stop()
    assert doc["status"] == "succeeded", doc
    assert doc["result"]["verdict"] == "SAME"
    consensus = doc["result"]["consensus"]
    assert consensus["agreed"] is True and consensus["agreeing"] == 4
    votes = {v["validator"]: v for v in consensus["votes"]}
    assert len(votes) == 5
    assert votes[2]["verdict"] == "DIFFERENT"
    assert all(votes[i]["verdict"] == "SAME" for i in (0, 1, 3, 4))
    assert len({votes[i]["digest"] for i in (0, 1, 3, 4)}) == 1
    assert votes[2]["digest"] != votes[0]["digest"]
    assert_drained(farm_env["REDIS_URL"])


def test_two_liars_publish_no_verdict(
    client: Any, start_worker: Any, model_dirs: dict[str, Path], farm_env: dict[str, str]
) -> None:
    worker = start_worker(
        name="liar2", REV_ENABLE_FAULT_INJECTION="1", REV_TEST_FAULTY_VALIDATORS="0,3"
    )
    try:
        doc = _same_job(client, model_dirs)
    finally:
        worker.stop()
    assert doc["status"] == "failed", doc
    assert doc["error"]["code"] == "no_consensus"
    assert doc["result"]["verdict"] is None
    consensus = doc["result"]["consensus"]
    assert consensus["agreed"] is False and consensus["agreeing"] == 3
    assert len(consensus["votes"]) == 5
    assert {v["validator"] for v in consensus["votes"] if v["verdict"] == "DIFFERENT"} == {0, 3}
    assert_drained(farm_env["REDIS_URL"])


def test_fault_switch_needs_the_enable_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    from rev_tasks.settings import Settings

    monkeypatch.setenv("REV_TEST_FAULTY_VALIDATORS", "0,3")
    monkeypatch.delenv("REV_ENABLE_FAULT_INJECTION", raising=False)
    assert Settings.from_env().faulty_validators == frozenset()
    monkeypatch.setenv("REV_ENABLE_FAULT_INJECTION", "1")
    assert Settings.from_env().faulty_validators == frozenset({0, 3})
