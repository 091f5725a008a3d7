"""The pool policy of ``prepare`` on a real (SQLite) database: draws, retirement, top-up, wait.

``_challenge_set`` is what ``prepare`` stores; the messages it would send after a commit
(inference, a top-up, its own retry) are registered on the session and never sent here,
since the test never commits.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.orm import Session

from rev_tasks import jobs
from rev_tasks.core.challenges import commitment, job_challenges, nonce_challenges
from rev_tasks.core.keys import key_id
from rev_tasks.db import repo
from rev_tasks.db.session import _AFTER_COMMIT, make_engine
from rev_tasks.db.tables import Base, Fingerprint, ModelRecord, pack_json
from rev_tasks.queues import INFERENCE_CPU
from rev_tasks.tasks import verify
from rev_tasks.tasks.common import FarmError

KEY = hashlib.sha256(b"pool key").digest()
POOL = 12


@pytest.fixture
def session(tmp_path: Path) -> Iterator[Session]:
    engine = make_engine(f"sqlite:///{tmp_path / 'pool.db'}")
    Base.metadata.create_all(engine)
    with Session(engine) as s:
        s.add(ModelRecord(id="m", path="/x", status="ready"))
        s.flush()  # no relationship orders the inserts: the model row first
        doc = {"signatures": [{"index": i} for i in range(POOL)]}
        s.add(
            Fingerprint(
                model_id="m", key_id=key_id(KEY), n_challenges=POOL, bits=64, sites=[1],
                descriptor={}, doc=pack_json(doc),
            )
        )  # fmt: skip
        s.flush()
        yield s
    engine.dispose()


def _job(s: Session, job_id: str, reference: str | None = "m", budget: int = 5) -> object:
    job = jobs.new_job(
        id=job_id, kind="verify", request={"max_challenges": budget}, device="cpu",
        queue=INFERENCE_CPU, reference_model_id=reference,
        reference_path=None if reference else "/r", candidate_path="/c",
    )  # fmt: skip
    s.add(job)
    s.flush()
    return job


def _prepare(s: Session, job: object, since: float | None = None) -> dict | str:
    out = verify._challenge_set(s, job, KEY, time.time() if since is None else since)
    if isinstance(out, dict) and out:
        jobs.mark_prepared(s, job, key_id(KEY), **out)  # type: ignore[arg-type]
    return out


def test_two_folder_jobs_get_a_fresh_nonce_each(session: Session) -> None:
    a = _prepare(session, _job(session, "a", reference=None, budget=16))
    b = _prepare(session, _job(session, "b", reference=None, budget=16))
    assert isinstance(a, dict) and isinstance(b, dict)
    assert a["challenge_nonce"] != b["challenge_nonce"] and a["commitment"] != b["commitment"]
    nonce = bytes.fromhex(a["challenge_nonce"])
    assert a["commitment"] == commitment(nonce_challenges(KEY, nonce, 16)).hex()
    assert "challenge_indices" not in a


def test_draws_avoid_held_and_retired_challenges_and_ask_for_a_top_up(session: Session) -> None:
    first = _prepare(session, _job(session, "j1"))
    assert isinstance(first, dict)
    drawn1 = first["challenge_indices"]
    assert len(set(drawn1)) == 5 and set(drawn1) <= set(range(POOL))
    assert first["commitment"] == commitment(job_challenges(KEY, 5, indices=drawn1)).hex()
    fp = session.get(Fingerprint, "m")
    assert fp is not None and fp.topup_requested_at is None  # 7 left: enough for another
    second = _prepare(session, _job(session, "j2"))
    assert isinstance(second, dict)
    assert not set(second["challenge_indices"]) & set(drawn1)  # j1 still holds its draw
    assert fp.topup_requested_at is not None  # 2 left: the next job would wait
    # j1's transcript shows two challenges; j1 finishes: the rest of its draw is free again.
    repo.retire_challenges(session, "m", drawn1[:2], "j1")
    jobs.fail(session, "j1", "test", "done")
    session.flush()
    free = set(repo.available_indices(session, fp, "nobody"))
    assert free == set(range(POOL)) - set(drawn1[:2]) - set(second["challenge_indices"])
    third = _prepare(session, _job(session, "j3"))
    assert isinstance(third, dict)
    assert not set(third["challenge_indices"]) & set(drawn1[:2])


def test_a_job_waits_for_the_top_up_then_fails_after_the_bound(session: Session) -> None:
    _prepare(session, _job(session, "big", budget=10))
    job = _job(session, "late", budget=10)
    assert _prepare(session, job) == verify._WAIT  # 2 left, 10 needed
    assert job.commitment is None and job.status == "queued"  # type: ignore[attr-defined]
    with pytest.raises(FarmError) as exc:
        _prepare(session, job, since=time.time() - verify.POOL_WAIT_S - 1)
    assert exc.value.code == "challenge_pool_exhausted"


def test_a_top_up_request_is_not_repeated_while_pending(session: Session) -> None:
    fp = session.get(Fingerprint, "m")
    assert fp is not None
    verify._request_topup(session, fp, INFERENCE_CPU)
    first = fp.topup_requested_at
    verify._request_topup(session, fp, INFERENCE_CPU)
    assert fp.topup_requested_at == first
    assert len(session.info[_AFTER_COMMIT]) == 1  # one send, after the commit


def test_key_mismatch_is_refused(session: Session) -> None:
    fp = session.get(Fingerprint, "m")
    assert fp is not None
    fp.key_id = "0" * 32
    with pytest.raises(FarmError) as exc:
        _prepare(session, _job(session, "k"))
    assert exc.value.code == "key_mismatch"
