"""Identify on the real farm, as a new user tries it: register models, submit identify at once.

Real Celery workers (prefork, -c 1, every queue), real Redis and PostgreSQL, the real MiniLM
and tiny GPT-2 models. The job waits (queued, with its wait shown under ``progress``) for
the fingerprints of the models registered before it, lists every model of the tenant as
compared, incompatible (DIFFERENT, with the reason) or unavailable (with the reason), and
goes through the same five-validator consensus as a verify job.
"""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any

import pytest

from tests.integration.farm import purge, register, submit, wait_certificate

pytestmark = pytest.mark.integration
#: The first test's job, which the forgery test tampers with afterwards.
_JOBS: dict[str, str] = {}


def _post_model(client: Any, model_id: str, path: Path) -> None:
    resp = client.post("/v1/models", json={"id": model_id, "path": str(path)})
    assert resp.status_code == 202, resp.get_json()


def _follow(client: Any, job_id: str, timeout: float = 600.0) -> tuple[dict[str, Any], list[Any]]:
    """The finished job document, and every ``progress.waiting`` seen while it was queued."""
    seen: list[Any] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        doc = client.get(f"/v1/jobs/{job_id}").get_json()
        if doc["status"] == "queued" and doc["progress"]["waiting"] is not None:
            seen.append(doc["progress"]["waiting"])
        if doc["status"] in ("succeeded", "failed", "cancelled"):
            return doc, seen
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not finish in {timeout}s")


def _votes(job_id: str) -> list[Any]:
    from sqlalchemy import select

    from rev_tasks.db.session import session_scope
    from rev_tasks.db.tables import Vote

    with session_scope() as s:
        rows = s.scalars(select(Vote).where(Vote.job_id == job_id).order_by(Vote.validator))
        return [(v.validator, v.verdict, list(v.problems or []), v.reexecuted) for v in rows]


def _check_consensus(doc: dict[str, Any], verdict: str) -> None:
    votes = _votes(doc["id"])
    assert [v[0] for v in votes] == [0, 1, 2, 3, 4], votes  # five votes stored
    assert all(v[1] == verdict and v[2] == [] for v in votes), votes
    assert all(v[3] is not None and len(v[3]) == 2 for v in votes), votes  # two re-executed
    consensus = doc["result"]["consensus"]
    assert consensus["agreeing"] == 5 and consensus["agreed"] is True


def test_identify_submitted_at_once_waits_and_lists_every_model(
    client: Any, start_worker: Any, model_dirs: dict[str, Path]
) -> None:
    worker = start_worker(name="identify")
    try:
        for model_id in ("gpt2-a", "gpt2-b", "minilm"):
            _post_model(client, model_id, model_dirs[model_id])
        job_id = submit(
            client, {"kind": "identify", "candidate": {"path": str(model_dirs["gpt2-a-copy"])}}
        )
        # Submitted before the fingerprints were made: before this change such a model was
        # skipped silently.
        pending = [
            m
            for m in ("gpt2-a", "gpt2-b", "minilm")
            if client.get(f"/v1/models/{m}").get_json()["status"] == "pending"
        ]
        assert pending, "every fingerprint was ready at submission: nothing to wait for"
        doc, seen = _follow(client, job_id)
    finally:
        worker.stop()
    assert doc["status"] == "succeeded", doc
    _JOBS["first"] = job_id
    result = doc["result"]
    ranking = result["ranking"]
    assert [(r["model_id"], r["status"], r["verdict"]) for r in ranking] == [
        ("gpt2-a", "compared", "SAME"),
        ("gpt2-b", "compared", "DIFFERENT"),
        ("minilm", "incompatible", "DIFFERENT"),
    ], ranking
    assert ranking[0]["mean_distance"] == 0.0 < ranking[1]["mean_distance"]
    assert ranking[0]["challenges_used"] >= 1 and ranking[0]["statistic"] is not None
    assert "hidden size 384 vs 64" in ranking[2]["reason"], ranking[2]
    assert ranking[2]["challenges_used"] == 0 and ranking[2]["mean_distance"] is None
    assert result["unavailable"] == []
    assert (result["best"], result["verdict"]) == ("gpt2-a", "SAME")
    assert (result["compared"], result["incompatible"], result["registered"]) == (2, 1, 3)
    # It waited, queued, for the pending fingerprints, and said so.
    assert seen and seen[0]["for"] == "fingerprints" and seen[0]["pending"], seen
    assert result["waited"]["done"] is True and result["waited"]["pending"] == []
    assert doc["progress"]["challenges_done"] == result["challenges_used"] > 0
    _check_consensus(doc, "SAME")
    envelope = json.loads(wait_certificate(client, job_id))  # signed in the tally
    predicate = json.loads(base64.b64decode(envelope["payload"]))["predicate"]
    assert predicate["verdict"] == "SAME" and predicate["consensus"]["agreeing"] == 5
    assert [(r["model_id"], r["status"]) for r in predicate["ranking"]][2] == (
        "minilm",
        "incompatible",
    )
    assert predicate["evidence_root"] == result["transcript_root"]
    # The evidence stays with the validators: no transcript is released.
    assert client.get(f"/v1/jobs/{job_id}/transcript").status_code == 404

    from web.reports import report_html

    html = report_html(doc, None, None, "", standalone=True)
    assert "incompatible" in html and "hidden size 384 vs 64" in html and "gpt2-b" in html


def test_validators_catch_a_listing_that_hides_the_true_model(farm_env: dict[str, str]) -> None:
    """A worker's self-consistent document that drops or demotes the true model is voted down.

    The validator's own check (the one ``validate`` runs), in this process, on the stored
    evidence of the first test's job, then on two forgeries written over it.
    """
    from rev_tasks.core.identification import (
        audit_identification,
        build_identification,
        recorded_verdict,
        unavailable_entry,
    )
    from rev_tasks.db.session import session_scope
    from rev_tasks.db.tables import Transcript, pack_json
    from rev_tasks.tasks.consensus import _check

    job_id = _JOBS["first"]
    recorded, _root, problems, sample = _check(job_id, 0)
    assert (recorded, problems, len(sample)) == ("SAME", [], 2)

    def forge(unavailable: list[dict[str, Any]]) -> list[str]:
        with session_scope() as s:
            tr = s.get(Transcript, job_id)
            doc = tr.document()
            kept = {m: t for m, t in doc["comparisons"].items() if m != "gpt2-a"}
            forged = build_identification(
                doc["key_id"], doc["candidate"], doc["parameters"], kept, unavailable
            )
            assert audit_identification(forged) == []  # consistent on its own
            tr.doc, tr.root, tr.verdict = (
                pack_json(forged),
                forged["root"],
                recorded_verdict(forged),
            )
        return _check(job_id, 0)[2]

    hidden = forge([unavailable_entry("gpt2-a", "fingerprint failed: model_load_error: x")])
    assert any("gpt2-a is listed unavailable" in p for p in hidden), hidden
    dropped = forge([])
    assert any("gpt2-a, registered before the job, is not listed" in p for p in dropped), dropped


def test_pending_past_the_bound_and_failed_fingerprints_are_listed_unavailable(
    client: Any, start_worker: Any, model_dirs: dict[str, Path], farm_env: dict[str, str]
) -> None:
    # A registration whose fingerprint message is lost stays pending for real.
    _post_model(client, "lost", model_dirs["gpt2-b"])
    purge(farm_env["REDIS_URL"])
    worker = start_worker(name="identify-short", REV_IDENTIFY_WAIT_SECONDS="4")
    try:
        broken = register(client, "broken", model_dirs["corrupt"])
        assert broken["status"] == "failed", broken
        job_id = submit(
            client, {"kind": "identify", "candidate": {"path": str(model_dirs["gpt2-a-copy"])}}
        )
        doc, seen = _follow(client, job_id)
    finally:
        worker.stop()
    assert doc["status"] == "succeeded", doc
    result = doc["result"]
    assert seen and seen[-1]["pending"] == ["lost"], seen  # it waited for "lost" …
    assert result["waited"]["done"] is True and result["waited"]["waited_s"] >= 4
    unavailable = {u["model_id"]: u for u in result["unavailable"]}
    assert sorted(unavailable) == ["broken", "lost"]  # … and then listed it, not dropped it
    assert "still pending after the job waited" in unavailable["lost"]["reason"]
    assert unavailable["broken"]["reason"].startswith("fingerprint failed: model_load_error")
    assert all(u["status"] == "unavailable" and u["verdict"] is None for u in unavailable.values())
    assert [r["model_id"] for r in result["ranking"]] == ["gpt2-a", "gpt2-b", "minilm"]
    assert result["ranking"][0]["verdict"] == "SAME" and result["registered"] == 5
    _check_consensus(doc, "SAME")
