"""rev_tasks/credentials.py without the API: master keys, validation, rotation, binding.

On an SQLite database in a temporary folder (the PostgreSQL path, the dump and the API are
tests/integration/test_credentials.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from cryptography.fernet import Fernet, MultiFernet
from sqlalchemy.orm import Session

from rev_tasks import credentials, redact
from rev_tasks.credentials import CredentialError, CredentialKeyError, CredentialMissing
from rev_tasks.db.tables import Credential

K1, K2 = Fernet.generate_key().decode(), Fernet.generate_key().decode()


@pytest.fixture
def session(tmp_path: Path) -> Iterator[Session]:
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'c.db'}")
    Credential.__table__.create(engine)
    with Session(engine) as s:
        yield s
    engine.dispose()


def test_master_key_sources(tmp_path: Path) -> None:
    with pytest.raises(CredentialKeyError, match="REV_CREDENTIAL_KEY .*REV_CREDENTIAL_KEY_FILE"):
        credentials.load_keys({})
    with pytest.raises(CredentialKeyError, match="not a Fernet key"):
        credentials.load_keys({"REV_CREDENTIAL_KEY": "hunter2"})
    with pytest.raises(CredentialKeyError, match="cannot read"):
        credentials.load_keys({"REV_CREDENTIAL_KEY_FILE": str(tmp_path / "missing")})
    key_file = tmp_path / "k"
    key_file.write_text(f"{K2}\n{K1}\n")
    from_file = credentials.load_keys({"REV_CREDENTIAL_KEY_FILE": str(key_file)})
    from_env = credentials.load_keys({"REV_CREDENTIAL_KEY": f"{K2}, {K1}"})
    token = Fernet(K1).encrypt(b"x")
    assert from_file.decrypt(token) == from_env.decrypt(token) == b"x"
    # the first key encrypts
    assert Fernet(K2).decrypt(from_env.encrypt(b"y")) == b"y"
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(CredentialKeyError, match="empty"):
        credentials.load_keys({"REV_CREDENTIAL_KEY_FILE": str(tmp_path / "empty")})
    assert len(credentials.generate_key()) == 44


def test_set_reveal_rotate_delete(session: Session) -> None:
    keys = MultiFernet([Fernet(K1)])
    credentials.set_credential(session, "alpha", "openai", "sk-first-value", keys=keys)
    row = session.get(Credential, ("alpha", "openai"))
    assert row is not None and "sk-first-value" not in row.ciphertext and row.rotated_at is None
    assert credentials.reveal(session, "alpha", "openai", keys=keys) == "sk-first-value"
    credentials.set_credential(session, "alpha", "openai", "sk-second-value", keys=keys)
    assert row.rotated_at is not None
    assert credentials.reveal(session, "alpha", "openai", keys=keys) == "sk-second-value"
    assert [d["name"] for d in credentials.list_credentials(session, "alpha")] == ["openai"]
    assert credentials.list_credentials(session, "beta") == []
    assert "sk-second-value" not in repr(credentials.list_credentials(session, "alpha"))
    with pytest.raises(CredentialMissing) as missing:
        credentials.reveal(session, "beta", "openai", keys=keys)
    assert isinstance(missing.value, KeyError)
    assert str(missing.value) == "no credential 'openai' for tenant 'beta'"
    assert credentials.delete_credential(session, "alpha", "openai")
    assert not credentials.delete_credential(session, "alpha", "openai")
    with pytest.raises(CredentialMissing):
        credentials.reveal(session, "alpha", "openai", keys=keys)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("-x", "value-ok"),
        ("a/b", "value-ok"),
        ("a" * 65, "value-ok"),
        ("ok", ""),
        ("ok", " padded"),
        ("ok", "two\nlines"),
        ("ok", "nul\x00byte"),
        ("ok", "x" * 8193),
    ],
)
def test_bad_names_and_values_are_refused_without_echo(
    session: Session, name: str, value: str
) -> None:
    with pytest.raises(CredentialError) as err:
        credentials.set_credential(session, "alpha", name, value, keys=MultiFernet([Fernet(K1)]))
    if len(value) > 3:
        assert value not in str(err.value)
    assert session.scalars(sa.select(Credential)).all() == []


def test_master_key_rotation_and_tenant_binding(session: Session) -> None:
    old, both, new = (
        MultiFernet([Fernet(K1)]),
        MultiFernet([Fernet(K2), Fernet(K1)]),
        MultiFernet([Fernet(K2)]),
    )
    credentials.set_credential(session, "alpha", "a", "value-of-alpha", keys=old)
    credentials.set_credential(session, "beta", "a", "value-of-beta", keys=old)
    with pytest.raises(CredentialKeyError, match="does not decrypt"):
        credentials.reveal(session, "alpha", "a", keys=new)
    assert credentials.rekey(session, keys=both) == 2
    assert credentials.reveal(session, "alpha", "a", keys=new) == "value-of-alpha"
    assert credentials.reveal(session, "beta", "a", keys=new) == "value-of-beta"
    with pytest.raises(CredentialKeyError):
        credentials.reveal(session, "alpha", "a", keys=old)
    # a ciphertext moved to another tenant's row is refused there
    alpha = session.get(Credential, ("alpha", "a"))
    beta = session.get(Credential, ("beta", "a"))
    assert alpha is not None and beta is not None
    beta.ciphertext = alpha.ciphertext
    with pytest.raises(CredentialKeyError, match="bound to another tenant") as err:
        credentials.reveal(session, "beta", "a", keys=new)
    assert "value-of-alpha" not in str(err.value)
    with pytest.raises(CredentialKeyError):  # rekey checks the binding before rewriting
        credentials.rekey(session, keys=new)


def test_values_are_remembered_for_redaction(session: Session) -> None:
    keys = MultiFernet([Fernet(K1)])
    credentials.set_credential(session, "alpha", "r", "remember-me-0042", keys=keys)
    assert redact.redact("sent remember-me-0042 to x") == "sent [REDACTED] to x"
