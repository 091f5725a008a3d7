"""One JSON error hierarchy for the coordinator.

Every error leaves as ``{"error": {"code", "message"[, "details"]}}`` with a 4xx/5xx status:
:class:`ApiError` subclasses for the API's own decisions, werkzeug's HTTP exceptions
(404 for unknown routes, 405, 413 …) mapped to the same shape, database outages mapped to
503 ``database_unavailable`` (a client should retry, not report a bug), and a last-resort
500 handler that logs the traceback and returns JSON instead of an HTML page.
"""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, jsonify
from flask.typing import ResponseReturnValue
from werkzeug.exceptions import ClientDisconnected, HTTPException

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error the API reports on purpose; subclasses fix the HTTP status."""

    status = 400
    code = "bad_request"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        details: Any = None,
        status: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.details = details
        self.headers = dict(headers or {})

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details is not None:
            body["details"] = self.details
        return {"error": body}


class BadRequest(ApiError):
    status, code = 400, "bad_request"


class NotFound(ApiError):
    status, code = 404, "not_found"


class Conflict(ApiError):
    status, code = 409, "conflict"


class UnsupportedMediaType(ApiError):
    status, code = 415, "unsupported_media_type"


class PayloadTooLarge(ApiError):
    status, code = 413, "payload_too_large"


class Unprocessable(ApiError):
    status, code = 422, "invalid_request"


class ServiceUnavailable(ApiError):
    status, code = 503, "service_unavailable"


# werkzeug's names where the API's own code reads better
_HTTP_CODES = {413: "payload_too_large"}


def register_error_handlers(app: Flask) -> None:
    from sqlalchemy.exc import DataError, DBAPIError, InterfaceError, OperationalError
    from sqlalchemy.exc import TimeoutError as PoolTimeout

    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError) -> ResponseReturnValue:
        return jsonify(exc.to_dict()), exc.status, exc.headers

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> ResponseReturnValue:
        if isinstance(exc, ClientDisconnected) and isinstance(exc.__context__, TimeoutError):
            # The body did not arrive within the server's read deadline (web/serving.py):
            # the client is slow, not gone, so it is told so; the server closes after this.
            body = {"error": {"code": "request_timeout", "message": "the request body did not "
                              "arrive in time"}}  # fmt: skip
            return jsonify(body), 408
        status = exc.code or 500
        code = _HTTP_CODES.get(status) or (exc.name or "error").lower().replace(" ", "_")
        headers = {"Allow": exc.valid_methods} if getattr(exc, "valid_methods", None) else {}
        if "Allow" in headers:
            headers["Allow"] = ", ".join(headers["Allow"])
        body = {"error": {"code": code, "message": exc.description or exc.name}}
        return jsonify(body), status, headers

    @app.errorhandler(OperationalError)
    @app.errorhandler(InterfaceError)
    @app.errorhandler(PoolTimeout)
    def _db_down(exc: Exception) -> ResponseReturnValue:
        log.error("database unavailable: %s", str(exc).splitlines()[0][:300])
        body = {"error": {"code": "database_unavailable", "message": "the database is unavailable"}}
        return jsonify(body), 503, {"Retry-After": "5"}

    @app.errorhandler(DBAPIError)
    def _db_error(exc: DBAPIError) -> ResponseReturnValue:
        if exc.connection_invalidated:
            return _db_down(exc)
        if isinstance(exc, DataError):  # a value the column cannot hold: the client's input
            body = {"error": {"code": "invalid_value", "message": "a value cannot be stored"}}
            return jsonify(body), 422
        return _unexpected(exc)

    def _unexpected(exc: Exception) -> ResponseReturnValue:
        log.error("unhandled error", exc_info=exc)
        body = {"error": {"code": "internal_error", "message": "internal server error"}}
        return jsonify(body), 500

    app.register_error_handler(Exception, _unexpected)
