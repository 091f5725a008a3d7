"""API keys: generation, hashing, lookup, revocation (shared by the coordinator and the CLI).

A token is ``rev_<id>_<secret>``: ``id`` is public (it names the key in logs and in
``rev keys list``), ``secret`` is 256 bits from :mod:`secrets`. Only ``sha256(token)`` is
stored, so a database dump does not hand out working keys. A request's key is found by
the hash of the token it presents: no stored secret is compared in Python, so there is no
timing oracle on the token, and an unknown token and a revoked one look the same (401).

Nothing here imports Flask: ``rev keys`` works on ``DATABASE_URL`` directly.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from rev_tasks.db.tables import ApiKey, utcnow

SCOPES = ("submit", "read", "admin")
TENANT_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
TOKEN_PATTERN = re.compile(r"^rev_[0-9a-f]{16}_[A-Za-z0-9_-]{43}$")
DEV_TENANT = "default"


@dataclass(frozen=True)
class Principal:
    """Who is calling: the key's id, its tenant and its scopes (admin implies all)."""

    key_id: str
    tenant: str
    scopes: frozenset[str]

    @property
    def is_admin(self) -> bool:
        return "admin" in self.scopes

    def allows(self, scope: str) -> bool:
        return self.is_admin or scope in self.scopes


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def parse_scopes(raw: str | list[str] | tuple[str, ...]) -> list[str]:
    """``"submit,read"`` → ``["read", "submit"]``; unknown scopes are an error."""
    items = raw.split(",") if isinstance(raw, str) else list(raw)
    scopes = sorted({s.strip() for s in items if s.strip()})
    bad = [s for s in scopes if s not in SCOPES]
    if bad or not scopes:
        raise ValueError(f"scopes must be a non-empty subset of {', '.join(SCOPES)}; got {raw!r}")
    return scopes


def check_tenant(tenant: str) -> str:
    if not TENANT_PATTERN.fullmatch(tenant):
        raise ValueError(f"tenant must match {TENANT_PATTERN.pattern}, not {tenant!r}")
    return tenant


def create_key(
    session: Session, tenant: str, scopes: str | list[str], name: str | None = None
) -> tuple[ApiKey, str]:
    """Store a new key and return it with its token (the only time the token exists)."""
    key_id = secrets.token_hex(8)
    token = f"rev_{key_id}_{secrets.token_urlsafe(32)}"
    row = ApiKey(
        id=key_id,
        tenant=check_tenant(tenant),
        scopes=",".join(parse_scopes(scopes)),
        name=(name or None),
        token_hash=hash_token(token),
        created_at=utcnow(),
    )
    session.add(row)
    session.flush()
    return row, token


def lookup(session: Session, token: str) -> ApiKey | None:
    """The active key whose hash matches ``token``; ``None`` for unknown or revoked keys."""
    if not TOKEN_PATTERN.fullmatch(token):
        return None
    row = session.scalars(select(ApiKey).where(ApiKey.token_hash == hash_token(token))).first()
    if row is None or row.revoked_at is not None:
        return None
    return row


class KeyCache:
    """Who presented a token, remembered for ``ttl`` seconds per process.

    The coordinator authenticates every request; without this each costs a database
    lookup. The price is the revocation bound: a process that authenticated a key just
    before its revocation committed keeps accepting it for at most ``ttl`` seconds. Only
    active keys are kept (an unknown or revoked token is looked up every time, so a flood
    of made-up tokens cannot push real keys out), by the token's hash, never the token,
    and at most ``max_entries`` of them (oldest out first). ``ttl <= 0`` turns it off.
    """

    def __init__(
        self,
        ttl: float,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl = float(ttl)
        self.max_entries = max_entries
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, tuple[float, Principal]] = OrderedDict()

    def get(self, token_hash: str) -> Principal | None:
        """The cached principal, or None when absent or older than ``ttl``."""
        if self.ttl <= 0:
            return None
        with self._lock:
            entry = self._entries.get(token_hash)
            if entry is None:
                return None
            if self._clock() >= entry[0]:
                del self._entries[token_hash]
                return None
            return entry[1]

    def put(self, token_hash: str, who: Principal) -> None:
        if self.ttl <= 0:
            return
        with self._lock:
            self._entries.pop(token_hash, None)
            self._entries[token_hash] = (self._clock() + self.ttl, who)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


def revoke(session: Session, key_id: str) -> bool:
    """Revoke a key by id; True when it was active.

    Coordinators refuse it once their :class:`KeyCache` entry expires
    (``REV_APIKEY_CACHE_SECONDS``, 1 s by default): at most that long after the commit.
    """
    row = session.get(ApiKey, key_id)
    if row is None or row.revoked_at is not None:
        return False
    row.revoked_at = utcnow()
    return True


def list_keys(session: Session, tenant: str | None = None) -> list[ApiKey]:
    stmt = select(ApiKey).order_by(ApiKey.created_at, ApiKey.id)
    if tenant:
        stmt = stmt.where(ApiKey.tenant == tenant)
    return list(session.scalars(stmt))


def write_token_file(path: Path, token: str) -> None:
    """Write a token readable by its owner only (created 0600, never world-readable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(token + "\n")
    os.replace(tmp, path)


def ensure_dev_key(session: Session, path: Path) -> tuple[str, bool]:
    """The local stack's admin key: reuse ``path`` if it holds an active key, else create one.

    Returns (key id, created). Used by ``make up`` only; production keys are made with
    ``rev keys create`` and handed out by an operator.
    """
    if path.is_file():
        token = path.read_text().strip()
        row = lookup(session, token)
        if row is not None:
            return row.id, False
    row, token = create_key(session, DEV_TENANT, list(SCOPES), name="make up development key")
    write_token_file(path, token)
    return row.id, True
