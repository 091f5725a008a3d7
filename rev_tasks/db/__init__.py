"""Storage: SQLAlchemy tables (``tables``), one session per unit of work, small repositories."""

from rev_tasks.db.session import dispose_engine, get_engine, session_scope
from rev_tasks.db.tables import (
    ApiKey,
    Base,
    Certificate,
    Fingerprint,
    Job,
    ModelRecord,
    SigningKey,
    Transcript,
    Vote,
)

__all__ = [
    "ApiKey",
    "Base",
    "Certificate",
    "Fingerprint",
    "Job",
    "ModelRecord",
    "SigningKey",
    "Transcript",
    "Vote",
    "dispose_engine",
    "get_engine",
    "session_scope",
]
