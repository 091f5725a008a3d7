"""The tally signs what it publishes, with the digest the inference took, and never withholds
a verdict for want of a certificate (a real SQLite database and real key and model files)."""

from __future__ import annotations

import logging
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session

from rev_tasks import attest, jobs
from rev_tasks import certificates as C
from rev_tasks.db import repo
from rev_tasks.db.session import make_engine
from rev_tasks.db.tables import Base, Certificate, Job
from rev_tasks.settings import reset_settings
from rev_tasks.tasks.consensus import _tally, vote_digest
from tests.unit.test_certificates import _transcript

JOB_ID = "0f8e4c1a-aaaa-bbbb-cccc-444455556666"


def _model(folder: Path, payload: bytes) -> Path:
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(payload)
    (folder / "config.json").write_text("{}")  # not a weight file: outside the digest
    return folder


@pytest.fixture
def session(tmp_path: Path) -> Iterator[Session]:
    engine = make_engine(f"sqlite:///{tmp_path / 'farm.db'}")
    Base.metadata.create_all(engine)
    with Session(engine) as s:
        yield s
    engine.dispose()


@pytest.fixture
def key_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A real signing key, named by REV_CERT_KEY_FILE as a consensus worker's environment does."""
    path = tmp_path / "certificate.key"
    C.create_signing_key(path)
    monkeypatch.setenv("REV_CERT_KEY_FILE", str(path))
    reset_settings()
    yield path
    reset_settings()


@pytest.fixture
def models(tmp_path: Path) -> dict[str, Path]:
    return {
        "reference": _model(tmp_path / "ref", b"reference weights"),
        "candidate": _model(tmp_path / "cand", b"candidate weights"),
    }


def _decided_job(session: Session, models: dict[str, Path], **digests: Any) -> dict[str, Any]:
    """A job the validators voted on unanimously: transcript stored, five agreeing votes."""
    transcript = _transcript(0.0, seed=1)
    verdict, root = transcript["decision"]["verdict"], transcript["root"]
    session.add(
        jobs.new_job(
            id=JOB_ID,
            tenant="alpha",
            kind="verify",
            request={"reference": {"path": str(models["reference"])}, "candidate": {}},
            device="cpu",
            queue="q",
            reference_path=str(models["reference"]),
            candidate_path=str(models["candidate"]),
            challenges_max=64,
        )
    )
    session.flush()
    consensus = jobs.State.CONSENSUS
    session.execute(
        update(Job).where(Job.id == JOB_ID).values(status=consensus.status, stage=consensus.stage)
    )
    outcome = {
        "verdict": verdict,
        "transcript_root": root,
        "tolerance": "exact",
        "alpha": 0.01,
        "challenges_used": transcript["decision"]["challenges_used"],
        "challenges_max": 64,
        **digests,
    }
    repo.store_transcript(session, JOB_ID, outcome, transcript)
    for validator in range(5):
        digest = vote_digest(JOB_ID, root, verdict)
        repo.store_vote(session, JOB_ID, validator, verdict, digest, [], [0, 1])
    session.commit()
    return transcript


def test_the_tally_signs_the_weights_the_inference_digested(
    session: Session, key_file: Path, models: dict[str, Path]
) -> None:
    recorded = attest.weights_digests(str(models["candidate"]), str(models["reference"]))
    assert recorded == {
        "candidate_digest": C.weights_digest(models["candidate"]),
        "reference_digest": C.weights_digest(models["reference"]),
    }
    transcript = _decided_job(session, models, **recorded)
    # The folder changes after the verification ran: the certificate must not follow it.
    (models["candidate"] / "model.safetensors").write_bytes(b"other weights")
    assert C.weights_digest(models["candidate"]) != recorded["candidate_digest"]

    outcome = _tally(session, JOB_ID)
    session.commit()

    assert outcome is not None and outcome[:2] == ("published", jobs.SUCCEEDED)
    row = session.get(Certificate, JOB_ID)
    assert row is not None
    public = C.load_signing_key(key_file).public_key()
    ok = C.verify(row.envelope.encode(), public, transcript)
    assert ok.checked_transcript and ok.predicate["verdict"] == transcript["decision"]["verdict"]
    subject = ok.statement["subject"][0]
    assert subject["digest"] == {C.SUBJECT_DIGEST: recorded["candidate_digest"]}
    assert ok.predicate["reference"]["digest"] == {C.SUBJECT_DIGEST: recorded["reference_digest"]}
    assert ok.predicate["job"]["id"] == JOB_ID and ok.predicate["published_at"]
    # Signed once: a second issue returns the stored bytes.
    assert attest.issue(session, JOB_ID, C.load_signing_key(key_file)) == row.envelope


def test_a_missing_signing_key_never_withholds_the_verdict(
    session: Session,
    models: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("REV_CERT_KEY_FILE", str(tmp_path / "absent.key"))
    reset_settings()
    try:
        _decided_job(session, models, **attest.weights_digests(str(models["candidate"]), None))
        with caplog.at_level(logging.ERROR, logger="rev_tasks.attest"):
            outcome = _tally(session, JOB_ID)
        session.commit()
    finally:
        reset_settings()
    assert outcome is not None and outcome[:2] == ("published", jobs.SUCCEEDED)
    job = session.get(Job, JOB_ID)
    assert job is not None and job.status == jobs.SUCCEEDED and job.result["verdict"] == "SAME"
    assert session.get(Certificate, JOB_ID) is None
    assert "no certificate issued" in caplog.text and "absent.key" in caplog.text


def test_weights_the_inference_could_not_read_are_never_certified_later(
    session: Session,
    key_file: Path,
    models: dict[str, Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.ERROR, logger="rev_tasks.attest"):
        unreadable = attest.weights_digests(str(models["candidate"] / "gone"), None)
    assert unreadable == {"candidate_digest": None}
    assert "no weights digest" in caplog.text
    _decided_job(session, models, **unreadable)
    outcome = _tally(session, JOB_ID)
    session.commit()
    assert outcome is not None and outcome[:2] == ("published", jobs.SUCCEEDED)
    assert session.get(Certificate, JOB_ID) is None  # the folder now would not be proof
    with pytest.raises(C.CertificateError, match="could not digest"):
        attest.issue(session, JOB_ID, C.load_signing_key(key_file))


def _rev(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rev_tasks.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
        check=False,
    )


def test_rev_certificate_keygen_and_issue_certify_a_job_published_without_a_key(
    session: Session, models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REV_CERT_KEY_FILE", str(tmp_path / "absent.key"))
    reset_settings()
    try:
        transcript = _decided_job(
            session, models, **attest.weights_digests(str(models["candidate"]), None)
        )
        _tally(session, JOB_ID)
        session.commit()
    finally:
        reset_settings()
    assert session.get(Certificate, JOB_ID) is None

    key = tmp_path / "new.key"
    made = _rev("certificate", "keygen", str(key))
    assert made.returncode == 0, made.stderr
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    again = _rev("certificate", "keygen", str(key))
    assert again.returncode == 2 and "never overwritten" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1

    database = str(session.get_bind().url)
    issued = _rev("certificate", "issue", "--key-file", str(key), DATABASE_URL=database)
    assert issued.returncode == 0, issued.stderr
    assert f"{JOB_ID} certified by {C.keyid(C.load_signing_key(key))[:16]}" in issued.stdout
    session.expire_all()
    row = session.get(Certificate, JOB_ID)
    assert row is not None
    C.verify(row.envelope.encode(), C.load_signing_key(key).public_key(), transcript)

    unknown = _rev(
        "certificate", "issue", "no-such-job", "--key-file", str(key), DATABASE_URL=database
    )
    assert unknown.returncode == 1 and "no job no-such-job" in unknown.stderr
