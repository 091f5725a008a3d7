"""Storage: SQLAlchemy 2 models, one session per unit of work, small repositories."""

from rev_tasks.db.attestations import Certificate, SigningKey
from rev_tasks.db.models import ApiKey, Base, Fingerprint, Job, ModelRecord, Transcript, Vote
from rev_tasks.db.session import dispose_engine, get_engine, session_scope

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
