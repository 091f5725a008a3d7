"""The database tables as typed SQLAlchemy classes: jobs, models, fingerprints, transcripts,
votes, API keys, certificates and their signing keys, tenants' endpoint credentials.

Big documents (transcripts, fingerprints) are zlib-compressed JSON in ``LargeBinary``
columns: they are written once, read whole, and never queried inside. Small structured
fields (request, result, error) are JSON columns so the API can return them as they are.
"""

from __future__ import annotations

import json
import zlib
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

MODEL_PENDING, MODEL_READY, MODEL_FAILED = "pending", "ready", "failed"

# Rows written before tenants existed (migration 0002) belong to this tenant.
DEFAULT_TENANT = "default"


def utcnow() -> datetime:
    return datetime.now(UTC)


def iso(ts: datetime | None) -> str | None:
    """ISO 8601 in UTC with a Z (SQLite hands datetimes back naive; they are UTC)."""
    if ts is None:
        return None
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)
    return ts.astimezone(UTC).isoformat().replace("+00:00", "Z")


def pack_json(doc: Any) -> bytes:
    """Compact JSON, compressed: the storage form of transcripts and fingerprints."""
    return zlib.compress(json.dumps(doc, separators=(",", ":"), sort_keys=True).encode(), 6)


def unpack_json(blob: bytes) -> Any:
    return json.loads(zlib.decompress(blob).decode())


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class ModelRecord(Base):
    """A registered reference model: a folder under the model roots plus its fingerprint.

    Model ids are global; ``tenant`` is the owner. Other tenants cannot see or use the
    model (the API answers 404 / ``unknown_model``); admin keys see every tenant's models.
    """

    __tablename__ = "models"
    __table_args__ = (Index("ix_models_tenant", "tenant"),)

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    tenant: Mapped[str] = mapped_column(
        String(64), default=DEFAULT_TENANT, server_default=DEFAULT_TENANT
    )
    path: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), default=MODEL_PENDING)
    # The compute dtype its fingerprint is (to be) computed in; jobs against it must match.
    dtype: Mapped[str] = mapped_column(String(16), default="float32", server_default="float32")
    descriptor: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, onupdate=utcnow
    )


class Fingerprint(Base):
    """One model's signatures for its committed challenges under the farm key."""

    __tablename__ = "fingerprints"

    model_id: Mapped[str] = mapped_column(
        String(128), ForeignKey("models.id", ondelete="CASCADE"), primary_key=True
    )
    key_id: Mapped[str] = mapped_column(String(64))
    n_challenges: Mapped[int] = mapped_column(Integer)
    bits: Mapped[int] = mapped_column(Integer)
    sites: Mapped[list[Any]] = mapped_column(JSON)
    descriptor: Mapped[dict[str, Any]] = mapped_column(JSON)
    commitment: Mapped[str | None] = mapped_column(String(64), default=None)
    doc: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # A pool top-up (fresh challenges) was enqueued then; cleared when it is stored.
    topup_requested_at: Mapped[datetime | None] = mapped_column(
        DateTime(timezone=True), default=None
    )

    def document(self) -> dict[str, Any]:
        return unpack_json(self.doc)


class EndpointFingerprint(Base):
    """A registered model's endpoint fingerprint (``rev-endpoint-fingerprint/1``) under the
    farm key: what endpoint jobs against the model read instead of running its weights.

    Asked for at registration (``endpoint_evidence``): ``pending`` until the fingerprint
    task stores it (``ready``), or ``failed`` with the reason (a model that is no causal LM).
    """

    __tablename__ = "endpoint_fingerprints"

    model_id: Mapped[str] = mapped_column(
        String(128), ForeignKey("models.id", ondelete="CASCADE"), primary_key=True
    )
    status: Mapped[str] = mapped_column(String(16), default=MODEL_PENDING)
    key_id: Mapped[str | None] = mapped_column(String(64), default=None)
    n_challenges: Mapped[int | None] = mapped_column(Integer, default=None)
    doc: Mapped[bytes | None] = mapped_column(LargeBinary, default=None)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    def document(self) -> dict[str, Any] | None:
        return None if self.doc is None else unpack_json(self.doc)


class RetiredChallenge(Base):
    """A pool challenge a stored transcript has shown: no later job of the model draws it."""

    __tablename__ = "retired_challenges"

    model_id: Mapped[str] = mapped_column(
        String(128), ForeignKey("fingerprints.model_id", ondelete="CASCADE"), primary_key=True
    )
    challenge_index: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[str | None] = mapped_column(
        String(36), ForeignKey("jobs.id", ondelete="SET NULL"), default=None
    )
    retired_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Job(Base):
    """A verify or identify job; status and progress are what the API reports.

    ``status`` and ``stage`` are written by :mod:`rev_tasks.jobs` only, which holds the
    states they may take and the moves between them.
    """

    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_created_id", "created_at", "id"),
        Index("ix_jobs_tenant_created_id", "tenant", "created_at", "id"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    tenant: Mapped[str] = mapped_column(
        String(64), default=DEFAULT_TENANT, server_default=DEFAULT_TENANT
    )
    kind: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), index=True)
    stage: Mapped[str] = mapped_column(String(16))
    request: Mapped[dict[str, Any]] = mapped_column(JSON)
    device: Mapped[str] = mapped_column(String(8))
    queue: Mapped[str] = mapped_column(String(64))
    reference_model_id: Mapped[str | None] = mapped_column(
        String(128), ForeignKey("models.id", ondelete="SET NULL"), default=None
    )
    reference_path: Mapped[str | None] = mapped_column(Text, default=None)
    candidate_path: Mapped[str] = mapped_column(Text)
    key_id: Mapped[str | None] = mapped_column(String(64), default=None)
    commitment: Mapped[str | None] = mapped_column(String(64), default=None)
    # The job's secret challenge nonce (hex; two model folders) or its draw from the
    # reference's pool (a registered model), fixed at prepare with the commitment.
    challenge_nonce: Mapped[str | None] = mapped_column(String(64), default=None)
    challenge_indices: Mapped[list[Any] | None] = mapped_column(JSON, default=None)
    challenges_done: Mapped[int] = mapped_column(Integer, default=0)
    challenges_max: Mapped[int] = mapped_column(Integer, default=0)
    # Deliveries that started the inference: a poison job is failed after REV_MAX_ATTEMPTS.
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # Times the watchdog re-dispatched the job after its work was lost (rev_tasks/ops/watchdog.py).
    resumes: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    # An identify job's wait for pending fingerprints (rev_tasks.tasks.verify.prepare):
    # which models, since and until when; the API shows it under ``progress``.
    waiting: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, onupdate=utcnow
    )
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)
    decided_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)
    consensus_dispatched_at: Mapped[datetime | None] = mapped_column(
        DateTime(timezone=True), default=None
    )
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)
    # Written by the worker that runs the job (inference or consensus) while it runs.
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)


class Transcript(Base):
    """The committed transcript of a decided verification and the engine's result."""

    __tablename__ = "transcripts"

    job_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True
    )
    root: Mapped[str] = mapped_column(String(64))
    verdict: Mapped[str] = mapped_column(String(16))
    outcome: Mapped[dict[str, Any]] = mapped_column(JSON)
    doc: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    def document(self) -> dict[str, Any]:
        return unpack_json(self.doc)


class Vote(Base):
    """One validator's vote; (job, validator) is unique so redelivered votes are upserts."""

    __tablename__ = "votes"
    __table_args__ = (UniqueConstraint("job_id", "validator", name="uq_votes_job_validator"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("jobs.id", ondelete="CASCADE"), index=True
    )
    validator: Mapped[int] = mapped_column(Integer)
    verdict: Mapped[str] = mapped_column(String(16))
    digest: Mapped[str] = mapped_column(String(64))
    problems: Mapped[list[Any]] = mapped_column(JSON, default=list)
    # Record positions this validator re-executed (drawn from OS randomness at validation).
    reexecuted: Mapped[list[int] | None] = mapped_column(JSON, nullable=True)
    # Where the validator re-executed: {"worker", "device", "dtype"} (null before 0008).
    executed_on: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ApiKey(Base):
    """An API key: only the SHA-256 of the token is stored, never the token itself.

    Tokens are 256-bit random strings, so a plain (unsalted) SHA-256 is enough: there is
    nothing to brute-force, and looking a request's key up by its hash means no secret is
    ever compared byte by byte in Python (no timing oracle on the token).
    """

    __tablename__ = "api_keys"
    __table_args__ = (UniqueConstraint("token_hash", name="uq_api_keys_token_hash"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64), index=True)
    scopes: Mapped[str] = mapped_column(String(128))
    name: Mapped[str | None] = mapped_column(String(128), default=None)
    token_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)

    @property
    def scope_set(self) -> frozenset[str]:
        return frozenset(s for s in self.scopes.split(",") if s)


# Certificates and signing keys are insert-only: a certificate is the farm's word at the moment
# a verdict was published and is never re-signed, and a retired signing key's public half stays
# so that the certificates it signed remain verifiable (docs/certificates.md, "Key rotation").


class Certificate(Base):
    """A published job's DSSE envelope, stored as the exact bytes of the certificate file."""

    __tablename__ = "certificates"

    job_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True
    )
    keyid: Mapped[str] = mapped_column(String(64), index=True)
    envelope: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class SigningKey(Base):
    """The public key (PEM) behind a keyid, recorded the first time it signs."""

    __tablename__ = "signing_keys"

    keyid: Mapped[str] = mapped_column(String(64), primary_key=True)
    public_pem: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class IdempotencyKey(Base):
    """A client's ``Idempotency-Key`` on ``POST /v1/jobs`` and the job that request made.

    (tenant, key) is the primary key: of two concurrent requests with one key, the second
    insert waits for the first transaction and then fails, so only one of them creates a
    job and the other answers with it. ``request_hash`` is the SHA-256 of the validated
    request: the same key with another body is refused. The beat watchdog prunes expired keys.
    """

    __tablename__ = "idempotency_keys"
    __table_args__ = (Index("ix_idempotency_keys_created_at", "created_at"),)

    tenant: Mapped[str] = mapped_column(String(64), primary_key=True)
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    request_hash: Mapped[str] = mapped_column(String(64))
    job_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("jobs.id", ondelete="CASCADE"), index=True
    )
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Credential(Base):
    """A tenant's named endpoint credential, encrypted (rev_tasks/credentials.py).

    ``ciphertext`` is a Fernet token over the value bound to (tenant, name): the plaintext is
    never stored, and a token copied into another tenant's row does not decrypt there.
    """

    __tablename__ = "credentials"

    tenant: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    ciphertext: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    rotated_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)
