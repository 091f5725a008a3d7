"""``Idempotency-Key`` on ``POST /v1/jobs``: a retried submission returns the first job.

The keys are stored with the job, in its transaction (:mod:`rev_tasks.db.idempotency`):
per tenant, for 24 hours. A repeated key with the same validated body answers as the first
request did (202, the same id, plus ``Idempotent-Replayed: true``); with another body it
is a 422. A job whose message never reached the broker gives its key back, so a retry after
that 503 creates a new job.
"""

from __future__ import annotations

import re

from flask import request, url_for
from flask.typing import ResponseReturnValue

from rev_tasks.db import idempotency
from rev_tasks.db.idempotency import Remembered
from web.errors import BadRequest, Unprocessable

HEADER = "Idempotency-Key"
_KEY = re.compile(rf"[\x21-\x7e]{{1,{idempotency.MAX_LENGTH}}}")


class Replayed(Exception):
    """A concurrent request with the same key created the job first: answer with it.

    Raised inside the submit's unit of work, so that its own job row is rolled back.
    """

    def __init__(self, remembered: Remembered) -> None:
        super().__init__(remembered.job_id)
        self.remembered = remembered


def request_key() -> str | None:
    """The request's key, None without one; a 400 for a key that is not 1-255 printable ASCII."""
    raw = request.headers.get(HEADER)
    if raw is None:
        return None
    if not _KEY.fullmatch(raw):
        raise BadRequest(
            f"{HEADER} must be 1 to {idempotency.MAX_LENGTH} printable ASCII characters",
            code="invalid_idempotency_key",
        )
    return raw


def answer(remembered: Remembered) -> ResponseReturnValue:
    """The first request's answer again, or a 422 when this body differs from its body."""
    if not remembered.same_request:
        raise Unprocessable(
            f"this {HEADER} was used for a different request within 24 hours; "
            "send a new key for a new job",
            code="idempotency_key_reused",
        )
    url = url_for("jobs.get_job", job_id=remembered.job_id)
    body = {"id": remembered.job_id, "status": "queued", "url": url}
    return body, 202, {"Location": url, "Idempotent-Replayed": "true"}


def replayed(exc: Replayed) -> ResponseReturnValue:
    """Error handler of :class:`Replayed` (registered on the jobs blueprint)."""
    return answer(exc.remembered)
