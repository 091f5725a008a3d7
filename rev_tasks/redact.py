"""A logging filter that keeps credentials out of logs.

API tokens must never reach a log file: logs are shipped, kept and read by more people than
the keys are. :class:`RedactSecrets` rewrites every record that passes a handler it is
attached to: ``Authorization: Bearer <token>`` values, bare ``rev_<id>_<secret>`` tokens
and ``password=``/``token=`` style pairs become ``[REDACTED]``; the public key id of a
farm token is kept (``rev_<id>_[REDACTED]``) so that an operator can still tell which key
was used. Values that match no pattern (tenants' endpoint credentials) are redacted once
this process has handled them: :func:`remember_secret` (called by rev_tasks/credentials.py).
:func:`install` attaches it to the root logger's handlers and to the loggers
that gunicorn, werkzeug and Celery write through.
"""

from __future__ import annotations

import logging
import re
import threading
from collections import OrderedDict
from typing import Any

REDACTED = "[REDACTED]"

_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    # farm tokens anywhere: keep the public id, drop the secret
    (re.compile(r"\b(rev_[0-9a-f]{16}_)[A-Za-z0-9_-]{8,}"), r"\1" + REDACTED),
    # any bearer credential (other schemes' tokens too)
    (re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9._~+/=-]+"), r"\1" + REDACTED),
    # whole Authorization header values, whatever the scheme (Basic …)
    (re.compile(r"(?i)(authorization['\"]?\s*[:=]\s*['\"]?)[^'\"\n,}]+"), r"\1" + REDACTED),
    # key=value secrets in URLs, DSNs and messages
    (re.compile(r"(?i)\b((?:api[_-]?key|token|password|secret)=)[^\s&'\"]+"), r"\1" + REDACTED),
    # user:password@host in connection URLs
    (re.compile(r"(://[^:/\s@]+:)[^@\s/]+@"), r"\1" + REDACTED + "@"),
)  # fmt: skip


#: Secrets this process has seen (most recent last), and how many it keeps.
_SECRETS: OrderedDict[str, None] = OrderedDict()
#: The same secrets by their first MIN_SECRET_CHARS characters: a log line is scanned once,
#: whatever the number of secrets.
_BY_PREFIX: dict[str, set[str]] = {}
_SECRETS_LOCK = threading.Lock()
MAX_SECRETS = 4096
#: Shorter values are not searched for (they would blank ordinary words).
MIN_SECRET_CHARS = 4


def remember_secret(value: str) -> None:
    """Redact ``value`` wherever it appears from now on, in this process."""
    if not isinstance(value, str) or len(value) < MIN_SECRET_CHARS:
        return
    with _SECRETS_LOCK:
        if value in _SECRETS:
            _SECRETS.move_to_end(value)
            return
        _SECRETS[value] = None
        _BY_PREFIX.setdefault(value[:MIN_SECRET_CHARS], set()).add(value)
        while len(_SECRETS) > MAX_SECRETS:
            old, _ = _SECRETS.popitem(last=False)
            bucket = _BY_PREFIX.get(old[:MIN_SECRET_CHARS], set())
            bucket.discard(old)
            if not bucket:
                _BY_PREFIX.pop(old[:MIN_SECRET_CHARS], None)


def _remembered_in(text: str) -> list[str]:
    """The remembered secrets that occur in ``text``, longest first."""
    if not _BY_PREFIX:
        return []
    n = MIN_SECRET_CHARS
    found: set[str] = set()
    with _SECRETS_LOCK:
        for i in range(len(text) - n + 1):
            bucket = _BY_PREFIX.get(text[i : i + n])
            if bucket:
                found.update(v for v in bucket if text.startswith(v, i))
    return sorted(found, key=len, reverse=True)


def redact(text: str) -> str:
    """``text`` with every remembered secret and every credential pattern replaced."""
    for secret in _remembered_in(text):
        text = text.replace(secret, REDACTED)
    for pattern, repl in _PATTERNS:
        text = pattern.sub(repl, text)
    return text


class RedactSecrets(logging.Filter):
    """Rewrite a record's message (formatted with its args) and exception text."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a broken format string is not ours to fix
            return True
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


_FILTER = RedactSecrets()
_LOGGERS = ("", "gunicorn.error", "gunicorn.access", "werkzeug", "celery", "flask.app")


def install(*extra_loggers: str) -> None:
    """Attach the filter to every handler of the usual loggers (idempotent)."""
    for name in (*_LOGGERS, *extra_loggers):
        logger = logging.getLogger(name)
        targets: list[Any] = list(logger.handlers) or [logger]
        for target in targets:
            if _FILTER not in target.filters:
                target.addFilter(_FILTER)
