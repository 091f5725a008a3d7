"""Input checks every blueprint shares: strict JSON bodies, query parameters, schema errors."""

from __future__ import annotations

from typing import Any

from flask import current_app, request
from pydantic import ValidationError

from rev_tasks import boundedjson
from web.errors import BadRequest, PayloadTooLarge, Unprocessable, UnsupportedMediaType

#: Request bodies are flat documents (a job nests 3 levels): deeper is refused unparsed.
MAX_DEPTH = 32


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """Refuse ``{"a": 1, "a": 2}``: parsers disagree on which one wins (smuggling)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def json_body() -> Any:
    """The request's JSON, or a 400/413/415 in the API's error shape.

    Strict JSON: no duplicate keys, no ``NaN``/``Infinity``; nesting deeper than
    :data:`MAX_DEPTH` is a 400 (:mod:`rev_tasks.boundedjson`), never a RecursionError. The
    body size is capped by ``MAX_CONTENT_LENGTH``: a declared length over it is a 413
    before anything is read, and so is a chunked body that runs past it (werkzeug stops
    reading there and would hand back the truncated prefix).
    """
    if not request.is_json:
        raise UnsupportedMediaType("send a JSON body with Content-Type: application/json")
    raw = request.get_data(cache=True)
    limit = current_app.config.get("MAX_CONTENT_LENGTH")
    streamed = request.content_length is None  # chunked: no length to refuse up front
    # A streamed body that filled the cap: one more byte from the server's own stream
    # (werkzeug's stops at the cap) means it is larger.
    if (
        streamed
        and limit is not None
        and len(raw) >= limit
        and request.environ["wsgi.input"].read(1)
    ):
        raise PayloadTooLarge(f"the request body is larger than {limit} bytes")
    try:
        return boundedjson.loads(
            raw,
            max_depth=MAX_DEPTH,
            object_pairs_hook=_no_duplicate_keys,
            parse_constant=_no_constants,
        )
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"malformed JSON: {str(exc)[:200]}", code="malformed_json") from exc


def check_query(*allowed: str) -> None:
    """Query parameters are part of the schema: unknown or repeated ones are a 400."""
    unknown = sorted(set(request.args) - set(allowed))
    if unknown:
        raise BadRequest(
            f"unknown query parameter(s): {', '.join(unknown)[:200]}", code="unknown_parameter"
        )
    repeated = sorted(k for k in request.args if len(request.args.getlist(k)) > 1)
    if repeated:
        raise BadRequest(f"repeated query parameter: {repeated[0]}", code="unknown_parameter")


def validation_error(exc: ValidationError) -> Unprocessable:
    """A pydantic error as one 422: the first problem in the message, all of them in details."""
    details = [
        {"loc": [str(p) for p in err["loc"]], "message": err["msg"], "type": err["type"]}
        for err in exc.errors(include_url=False, include_input=False)
    ]
    first = details[0] if details else {"loc": [], "message": "invalid"}
    where = ".".join(first["loc"]) or "body"
    return Unprocessable(f"{where}: {first['message']}", code="invalid_request", details=details)
