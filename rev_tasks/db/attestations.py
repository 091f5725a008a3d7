"""Stored certificates and the public half of every key that ever signed one.

Both tables are insert-only: a certificate is the farm's word at the moment a verdict was
published and is never re-signed, and a retired signing key's public half stays so that the
certificates it signed remain verifiable (docs/certificates.md, "Key rotation").
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import DateTime, ForeignKey, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from rev_tasks.db.models import Base, utcnow


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
