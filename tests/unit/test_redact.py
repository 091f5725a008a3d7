"""Credentials never reach a log line: the RedactSecrets filter on real logging handlers."""

from __future__ import annotations

import io
import logging

from rev_tasks.redact import REDACTED, RedactSecrets, install, redact

TOKEN = "rev_0123456789abcdef_" + "S" * 43


def test_patterns() -> None:
    assert redact(f"Authorization: Bearer {TOKEN}") == f"Authorization: {REDACTED}"
    assert redact(f"bad key {TOKEN} used") == f"bad key rev_0123456789abcdef_{REDACTED} used"
    assert redact("bearer abc.def-ghi") == f"bearer {REDACTED}"
    assert redact("{'Authorization': 'Basic dXNlcjpwYXNz'}") == f"{{'Authorization': '{REDACTED}'}}"
    assert redact("postgresql://rev:hunter2@db/rev") == f"postgresql://rev:{REDACTED}@db/rev"
    assert redact("GET /x?token=abc&y=1") == f"GET /x?token={REDACTED}&y=1"
    assert redact("nothing secret here") == "nothing secret here"


def _logger(name: str) -> tuple[logging.Logger, io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RedactSecrets())
    logger = logging.getLogger(name)
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    return logger, stream


def test_filter_redacts_args_and_tracebacks() -> None:
    logger, stream = _logger("test.redact.args")
    logger.info("headers: %s", {"Authorization": f"Bearer {TOKEN}"})
    try:
        raise ValueError(f"token {TOKEN} rejected")
    except ValueError:
        logger.exception("failed")
    out = stream.getvalue()
    assert "S" * 43 not in out
    assert out.count(REDACTED) >= 2
    assert "rev_0123456789abcdef_" in out  # the public key id stays, for the operator


def test_install_covers_root_handlers() -> None:
    root = logging.getLogger()
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    root.addHandler(handler)
    try:
        install()
        logging.getLogger("some.child").warning("Authorization: Bearer %s", TOKEN)
    finally:
        root.removeHandler(handler)
    assert TOKEN not in stream.getvalue()
    assert REDACTED in stream.getvalue()


def test_remembered_secrets_are_redacted_anywhere_in_a_record() -> None:
    """A tenant's endpoint credential matches no pattern: once this process has handled it
    (rev_tasks/credentials.py remembers every value it stores or reveals), it is redacted
    from messages, arguments and tracebacks."""
    from rev_tasks.redact import remember_secret

    value = "plainsecret-" + "q7Zx" * 4  # no key=, no bearer, no rev_ prefix
    logger, stream = _logger("test.redact.remembered")
    logger.info("before: %s", value)
    assert value in stream.getvalue()  # not a pattern: unknown values pass ...
    remember_secret(value)
    remember_secret("abc")  # too short to search for: ordinary words stay
    logger.info("calling with %s", value)
    logger.info("abc stays")
    try:
        raise RuntimeError(f"endpoint said {value!r}")
    except RuntimeError:
        logger.exception("failed")
    after = stream.getvalue().split("before:", 1)[1].split("\n", 1)[1]
    assert value not in after and after.count(REDACTED) == 2
    assert "abc stays" in after
