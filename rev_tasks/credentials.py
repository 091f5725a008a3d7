"""Tenants' named endpoint credentials, encrypted at rest (no Flask: the CLI and workers use it).

An endpoint job names a credential (``"credential": "openai"``); the worker reveals it just
before it calls the endpoint and sends it only in the ``Authorization`` header. What holds:

- the value is encrypted with Fernet (AES-128-CBC + HMAC-SHA256, from ``cryptography``) under
  the farm's master key; the plaintext bound into each token is ``{tenant, name, value}``,
  so a ciphertext copied into another tenant's row does not decrypt there;
- the master key comes from ``REV_CREDENTIAL_KEY`` (comma-separated Fernet keys) or the file
  named by ``REV_CREDENTIAL_KEY_FILE`` (one key per line). The first key encrypts, all of
  them decrypt (MultiFernet): to rotate the master key, put a new key first, keep the old
  ones after it, run ``rev credentials rekey`` (re-encrypts every row under the first key),
  then drop the old keys (docs/security.md, "Credentials");
- nothing here returns a value except :func:`reveal`, and every value set or revealed is
  given to :func:`rev_tasks.redact.remember_secret`, so a log line of this process that
  happens to contain it prints ``[REDACTED]``; no error message carries a value.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from sqlalchemy import select
from sqlalchemy.orm import Session

from rev_tasks import redact
from rev_tasks.db.tables import Credential, iso, utcnow

__all__ = [
    "NAME_PATTERN",
    "CredentialError",
    "CredentialKeyError",
    "CredentialMissing",
    "delete_credential",
    "generate_key",
    "list_credentials",
    "load_keys",
    "rekey",
    "reveal",
    "set_credential",
]

KEY_ENV = "REV_CREDENTIAL_KEY"
KEY_FILE_ENV = "REV_CREDENTIAL_KEY_FILE"
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
_NAME = re.compile(NAME_PATTERN)
#: Values are API keys and tokens, not documents.
MAX_VALUE_BYTES = 8192


class CredentialError(Exception):
    """A credential operation failed; ``str()`` is one line without the value."""


class CredentialMissing(CredentialError, KeyError):
    """The tenant has no credential of that name."""

    def __init__(self, tenant: str, name: str) -> None:
        super().__init__(f"no credential {name!r} for tenant {tenant!r}")
        self.tenant, self.name = tenant, name

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class CredentialKeyError(CredentialError, RuntimeError):
    """The master key is absent or malformed, or a stored value does not decrypt with it."""


def generate_key() -> str:
    """A fresh Fernet key (for ``REV_CREDENTIAL_KEY``)."""
    return Fernet.generate_key().decode()


def load_keys(environ: dict[str, str] | None = None) -> MultiFernet:
    """The master keys from ``REV_CREDENTIAL_KEY`` or ``REV_CREDENTIAL_KEY_FILE``."""
    env = os.environ if environ is None else environ
    raw = env.get(KEY_ENV, "").strip()
    source = KEY_ENV
    if not raw:
        path = env.get(KEY_FILE_ENV, "").strip()
        if not path:
            raise CredentialKeyError(
                f"credentials are not configured: set {KEY_ENV} (a Fernet key, e.g. from "
                f"`rev credentials keygen`) or {KEY_FILE_ENV} on the coordinator and workers"
            )
        source = f"{KEY_FILE_ENV} ({path})"
        try:
            raw = Path(path).expanduser().read_text()
        except OSError as exc:
            raise CredentialKeyError(
                f"cannot read {source}: {exc.strerror or type(exc).__name__}"
            ) from None
    keys: list[Fernet] = []
    for part in re.split(r"[,\s]+", raw):
        if not part:
            continue
        try:
            keys.append(Fernet(part.encode()))
        except (ValueError, TypeError):
            raise CredentialKeyError(
                f"{source} holds something that is not a Fernet key (32 url-safe base64 bytes)"
            ) from None
    if not keys:
        raise CredentialKeyError(f"{source} is empty")
    return MultiFernet(keys)


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise CredentialError(
            "a credential name is 1-64 characters: letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def _plaintext(tenant: str, name: str, value: str) -> bytes:
    return json.dumps({"t": tenant, "n": name, "v": value}, separators=(",", ":")).encode()


def _encrypt(keys: MultiFernet, tenant: str, name: str, value: str) -> str:
    return keys.encrypt(_plaintext(tenant, name, value)).decode("ascii")


def _decrypt(keys: MultiFernet, row: Credential) -> str:
    try:
        doc = json.loads(keys.decrypt(row.ciphertext.encode("ascii")))
    except (InvalidToken, ValueError, UnicodeError):
        raise CredentialKeyError(
            f"credential {row.name!r} does not decrypt with the farm's {KEY_ENV} "
            "(was the key rotated without keeping the old one?)"
        ) from None
    if not isinstance(doc, dict) or doc.get("t") != row.tenant or doc.get("n") != row.name:
        raise CredentialKeyError(f"credential {row.name!r} is bound to another tenant or name")
    return str(doc["v"])


def set_credential(
    session: Session,
    tenant_id: str,
    name: str,
    value: str,
    *,
    keys: MultiFernet | None = None,
) -> None:
    """Create the credential, or rotate its value (``rotated_at`` says when)."""
    check_name(name)
    if not isinstance(value, str) or not value or value != value.strip():
        raise CredentialError("a credential value must be a non-empty string without edge spaces")
    if len(value.encode()) > MAX_VALUE_BYTES:
        raise CredentialError(f"a credential value is at most {MAX_VALUE_BYTES} bytes")
    if any(ch in value for ch in "\r\n\x00"):
        raise CredentialError("a credential value must be one line (it is sent as a header)")
    keys = keys or load_keys()
    redact.remember_secret(value)
    token = _encrypt(keys, tenant_id, name, value)
    row = session.get(Credential, (tenant_id, name), with_for_update=True)
    if row is None:
        session.add(Credential(tenant=tenant_id, name=name, ciphertext=token))
    else:
        row.ciphertext = token
        row.rotated_at = utcnow()
    session.flush()


def reveal(session: Session, tenant_id: str, name: str, *, keys: MultiFernet | None = None) -> str:
    """The plaintext value, for the one request header that needs it."""
    row = session.get(Credential, (tenant_id, name)) if _NAME.match(str(name)) else None
    if row is None:
        raise CredentialMissing(tenant_id, str(name)[:64])
    value = _decrypt(keys or load_keys(), row)
    redact.remember_secret(value)
    return value


def exists(session: Session, tenant_id: str, name: str) -> bool:
    """Whether the tenant has the credential (submit-time check; nothing is decrypted)."""
    return bool(_NAME.match(str(name))) and session.get(Credential, (tenant_id, name)) is not None


def describe(row: Credential) -> dict[str, Any]:
    """A credential as the API and CLI show it: never its value."""
    return {
        "name": row.name,
        "created_at": iso(row.created_at),
        "rotated_at": iso(row.rotated_at),
    }


def list_credentials(session: Session, tenant_id: str) -> list[dict[str, Any]]:
    """The tenant's credentials by name: names and timestamps only."""
    rows = session.scalars(
        select(Credential).where(Credential.tenant == tenant_id).order_by(Credential.name)
    )
    return [describe(r) for r in rows]


def get_credential(session: Session, tenant_id: str, name: str) -> dict[str, Any]:
    """One credential's description, or :class:`CredentialMissing`."""
    row = session.get(Credential, (tenant_id, name)) if _NAME.match(str(name)) else None
    if row is None:
        raise CredentialMissing(tenant_id, str(name)[:64])
    return describe(row)


def delete_credential(session: Session, tenant_id: str, name: str) -> bool:
    """Delete the credential; False when there was none."""
    row = session.get(Credential, (tenant_id, name)) if _NAME.match(str(name)) else None
    if row is None:
        return False
    session.delete(row)
    session.flush()
    return True


def rekey(session: Session, *, keys: MultiFernet | None = None) -> int:
    """Re-encrypt every stored credential under the first master key; returns the count."""
    keys = keys or load_keys()
    count = 0
    for row in session.scalars(select(Credential).with_for_update()):
        _decrypt(keys, row)  # checks the binding before the token is rewritten
        try:
            row.ciphertext = keys.rotate(row.ciphertext.encode("ascii")).decode("ascii")
        except InvalidToken:  # pragma: no cover - _decrypt above would have failed first
            raise CredentialKeyError(f"credential {row.name!r} does not decrypt") from None
        count += 1
    session.flush()
    return count
