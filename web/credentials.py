"""``/v1/credentials``: a tenant's named endpoint credentials (set, rotate, list, delete).

Values go in and never come out: every answer is a name and timestamps
(:func:`rev_tasks.credentials.describe`); only the endpoint worker reveals a value, for the
one header that needs it. Credentials belong to the caller's tenant, admin keys included
(an admin key acts on its own tenant's credentials): another tenant's names answer 404
exactly like missing ones. Setting and deleting need the ``submit`` scope, listing ``read``.
A farm without ``REV_CREDENTIAL_KEY`` answers 503 ``credentials_unconfigured``.
"""

from __future__ import annotations

import re

from flask import Blueprint, url_for
from flask.typing import ResponseReturnValue
from pydantic import ValidationError
from sqlalchemy.exc import IntegrityError

from rev_tasks import credentials
from rev_tasks.db.session import read_scope, session_scope
from web.errors import ApiError, NotFound, ServiceUnavailable
from web.inputs import check_query, json_body, validation_error
from web.schemas import CREDENTIAL_NAME_PATTERN, CredentialSet, CredentialValue
from web.security import principal

_NAME = re.compile(CREDENTIAL_NAME_PATTERN)

bp = Blueprint("credentials", __name__, url_prefix="/v1/credentials")


def _not_found(name: str) -> NotFound:
    return NotFound(f"no credential {name[:64]!r}", code="credential_not_found")


def _store(name: str, value: str) -> ResponseReturnValue:
    tenant = principal().tenant
    try:
        keys = credentials.load_keys()
    except credentials.CredentialKeyError as exc:
        raise ServiceUnavailable(str(exc), code="credentials_unconfigured") from None
    for attempt in (1, 2):  # two first-time sets of one name race: the loser rotates
        try:
            with session_scope() as s:
                existed = credentials.exists(s, tenant, name)
                credentials.set_credential(s, tenant, name, value, keys=keys)
                doc = credentials.get_credential(s, tenant, name)
            break
        except IntegrityError:
            if attempt == 2:
                raise
        except credentials.CredentialError as exc:
            raise ApiError(str(exc), status=422, code="invalid_request") from None
    location = url_for("credentials.get_one", name=name)
    return doc, 200 if existed else 201, {"Location": location}


@bp.post("")
def create() -> ResponseReturnValue:
    """Create or rotate ``{"name", "value"}``: 201 when new, 200 when rotated."""
    check_query()
    try:
        req = CredentialSet.model_validate(json_body())
    except ValidationError as exc:
        raise validation_error(exc) from None
    return _store(req.name, req.value)


@bp.put("/<name>")
def put(name: str) -> ResponseReturnValue:
    """Create or rotate the named credential: 201 when new, 200 when rotated."""
    check_query()
    if not _NAME.fullmatch(name):
        raise ApiError(
            "a credential name is 1-64 characters: letters, digits, '.', '_' or '-'",
            status=422,
            code="invalid_request",
        )
    try:
        req = CredentialValue.model_validate(json_body())
    except ValidationError as exc:
        raise validation_error(exc) from None
    return _store(name, req.value)


@bp.get("")
def list_all() -> ResponseReturnValue:
    """The caller's tenant's credentials: names and timestamps."""
    check_query()
    with read_scope() as s:
        return {"credentials": credentials.list_credentials(s, principal().tenant)}


@bp.get("/<name>")
def get_one(name: str) -> ResponseReturnValue:
    check_query()
    with read_scope() as s:
        try:
            return credentials.get_credential(s, principal().tenant, name)
        except credentials.CredentialMissing:
            raise _not_found(name) from None


@bp.delete("/<name>")
def delete(name: str) -> ResponseReturnValue:
    """Delete the credential (204); jobs that name it afterwards fail with the reason."""
    check_query()
    with session_scope() as s:
        if not credentials.delete_credential(s, principal().tenant, name):
            raise _not_found(name)
    return "", 204
