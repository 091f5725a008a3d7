"""Input checks every blueprint shares: strict JSON bodies, query parameters, schema errors."""

from __future__ import annotations

import json
from typing import Any

from flask import request
from pydantic import ValidationError

from web.errors import BadRequest, Unprocessable, UnsupportedMediaType


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

    Strict JSON: no duplicate keys, no ``NaN``/``Infinity``; deep nesting is a 400, not a
    RecursionError. The body size is capped by ``MAX_CONTENT_LENGTH`` (413) before parsing.
    """
    if not request.is_json:
        raise UnsupportedMediaType("send a JSON body with Content-Type: application/json")
    raw = request.get_data(cache=True)
    try:
        return json.loads(raw, object_pairs_hook=_no_duplicate_keys, parse_constant=_no_constants)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        message = str(exc)[:200] if not isinstance(exc, RecursionError) else "nested too deeply"
        raise BadRequest(f"malformed JSON: {message}", code="malformed_json") from exc


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
