"""``/ui``: the browser pages (log in with an API key, the jobs list, a job's report).

A browser has no ``Authorization`` header, so ``/ui`` authenticates by a signed session
cookie instead: ``POST /ui/login`` checks the API key exactly as the API does and stores the
key's *id* (never the token) in Flask's session (itsdangerous-signed, HttpOnly,
SameSite=Lax, path ``/ui``, 8 hours). Every request re-reads that key from the database, so
a revoked key logs its browser sessions out at once, and the tenant and scopes are the
key's: the pages see exactly what ``GET /v1/...`` would (another tenant's job is a 404).
Both forms carry a CSRF token bound to the session. The ``/v1`` API never reads the cookie,
so a cross-site request cannot use it there.
"""

from __future__ import annotations

import base64
import hmac
import json
import os
import secrets
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from flask import Blueprint, Flask, Response, current_app, g, redirect, request, session
from flask.typing import ResponseReturnValue
from sqlalchemy import select

from rev_tasks import __version__, apikeys, attest, jobs
from rev_tasks.apikeys import Principal
from rev_tasks.db.session import session_scope
from rev_tasks.db.tables import ApiKey, Job, Transcript
from rev_tasks.report import build_report
from web import services
from web.errors import NotFound
from web.jobs import page_of, visible_job
from web.rendering import render
from web.security import principal

PREFIX = "/ui"
PAGE = 50
SESSION_HOURS = 8
CSP = (
    "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
    "base-uri 'none'; frame-ancestors 'none'"
)
FILTERS = [("", "All"), *((s, s.capitalize()) for s in jobs.STATUSES)]

bp = Blueprint(
    "reports", __name__, url_prefix=PREFIX, static_folder="static", static_url_path="/static"
)


# ----------------------------------------------------------------------------- session
def session_secret(path: Path) -> bytes:
    """The cookie-signing secret, created (0600, 32 random bytes) on first use.

    Every coordinator process on a host reads the same file, so gunicorn's workers accept
    each other's cookies; replicas on several hosts must share it (a mounted secret).
    Losing it only logs every browser out.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return path.read_bytes()
        data = secrets.token_bytes(32)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
    if len(data) < 16:
        raise ValueError(f"session key file {path} holds fewer than 16 bytes")
    return data


def init_app(app: Flask) -> None:
    """Register the pages and configure the session cookie (call from the app factory)."""
    settings = app.config["REV_SETTINGS"]
    if not app.config.get("SECRET_KEY"):
        key_file = settings.session_key_file or settings.var_dir / "session.key"
        app.config["SECRET_KEY"] = session_secret(Path(key_file))
    app.config.update(
        SESSION_COOKIE_NAME="rev_session",
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_PATH=PREFIX,
        SESSION_COOKIE_SECURE=bool(settings.hsts),  # TLS in front: never send it in clear
        PERMANENT_SESSION_LIFETIME=timedelta(hours=SESSION_HOURS),
    )
    app.register_blueprint(bp)


def is_browser_path(path: str) -> bool:
    return path == PREFIX or path.startswith(PREFIX + "/")


def _csrf_token() -> str:
    token = session.get("csrf")
    if not token:
        token = session["csrf"] = secrets.token_urlsafe(32)
    return str(token)


def _csrf_ok() -> bool:
    sent = request.form.get("csrf_token", "")
    return bool(sent) and hmac.compare_digest(sent, str(session.get("csrf", "")))


def _session_principal() -> Principal | None:
    key_id = session.get("key_id")
    if not isinstance(key_id, str):
        return None
    with session_scope() as s:
        row = s.get(ApiKey, key_id)
        if row is None or row.revoked_at is not None:
            return None
        return Principal(key_id=row.id, tenant=row.tenant, scopes=row.scope_set)


def gate() -> ResponseReturnValue | None:
    """The ``/ui`` counterpart of the API's bearer check (called by :mod:`web.security`).

    Logged out → a redirect to the login page; rate limits and the ``read`` scope as in
    the API. The login page and the stylesheet are open.
    """
    if request.path in (f"{PREFIX}/login",) or request.path.startswith(f"{PREFIX}/static/"):
        return None
    who = _session_principal()
    if who is None:
        session.pop("key_id", None)
        target = request.full_path.rstrip("?") if request.method == "GET" else ""
        query = "?" + urlencode({"next": target}) if _safe_next(target) else ""
        return redirect(f"{PREFIX}/login{query}")
    g.rev_principal = who
    decision = current_app.extensions["rev_ratelimit"].hit(who.key_id)
    if decision is not None:
        g.rev_ratelimit_headers = decision.headers()
        if not decision.allowed:
            return _page_error(429, "Too many requests", f"retry after {decision.retry_after} s")
    if not who.allows("read"):
        return _page_error(403, "Forbidden", "this key lacks the 'read' scope")
    return None


def _safe_next(target: str) -> bool:
    """Only a path of these pages: never another host (``//evil``) or the API."""
    return is_browser_path(target.split("?", 1)[0]) and not target.startswith("//")


@bp.after_request
def _headers(response: Response) -> Response:
    response.headers["Content-Security-Policy"] = CSP
    return response


def _context(**extra: Any) -> dict[str, Any]:
    return {
        "who": g.get("rev_principal"),
        "csrf_token": _csrf_token(),
        "static_url": f"{PREFIX}/static",
        "version": __version__,
        "generated": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S"),
        **extra,
    }


def _page_error(status: int, title: str, message: str) -> ResponseReturnValue:
    html = render("error.html", **_context(status=status, title=title, message=message))
    return Response(html, status=status, mimetype="text/html")


# ----------------------------------------------------------------------------- login
@bp.get("")
@bp.get("/")
def index() -> ResponseReturnValue:
    return redirect(f"{PREFIX}/jobs")


@bp.get("/login")
def login_form() -> ResponseReturnValue:
    target = request.args.get("next", "")
    return render("login.html", **_context(next=target if _safe_next(target) else "", message=None))


@bp.post("/login")
def login() -> ResponseReturnValue:
    target = request.form.get("next", "")
    target = target if _safe_next(target) else f"{PREFIX}/jobs"

    def refuse(message: str, status: int) -> ResponseReturnValue:
        html = render("login.html", **_context(next=target, message=message))
        return Response(html, status=status, mimetype="text/html")

    if not _csrf_ok():
        return refuse("The form expired (or cookies are blocked); please try again.", 400)
    token = request.form.get("api_key", "").strip()
    with session_scope() as s:
        row = apikeys.lookup(s, token)
        who = None if row is None else (row.id, row.scope_set)
    if who is None:
        return refuse("Invalid or revoked API key.", 401)
    key_id, scopes = who
    if not ({"read", "admin"} & scopes):
        return refuse("This key lacks the 'read' scope.", 403)
    session.clear()  # a fresh session: nothing from before the login survives (fixation)
    session.permanent = True
    session["key_id"] = key_id
    session["csrf"] = secrets.token_urlsafe(32)
    return redirect(target)


@bp.post("/logout")
def logout() -> ResponseReturnValue:
    if not _csrf_ok():
        return _page_error(400, "Bad request", "the logout form expired; reload the page")
    session.clear()
    return redirect(f"{PREFIX}/login")


# ----------------------------------------------------------------------------- pages
@bp.errorhandler(NotFound)
def _not_found(exc: NotFound) -> ResponseReturnValue:
    return _page_error(404, "Not found", exc.message)


@bp.get("/jobs")
def jobs_page() -> ResponseReturnValue:
    status = request.args.get("status", "")
    if status and status not in jobs.STATUSES:
        return _page_error(400, "Bad request", f"unknown status {status[:32]!r}")
    stmt = select(Job).order_by(Job.created_at.desc(), Job.id.desc())
    if not principal().is_admin:
        stmt = stmt.where(Job.tenant == principal().tenant)
    if status:
        stmt = stmt.where(Job.status == status)
    docs, next_cursor = page_of(stmt, request.args.get("cursor"), PAGE)
    next_query = urlencode({k: v for k, v in (("status", status), ("cursor", next_cursor)) if v})
    return render(
        "jobs.html",
        **_context(
            jobs=docs,
            status=status,
            filters=FILTERS,
            next_cursor=next_cursor,
            next_query=next_query,
        ),
    )


def _load(job_id: str) -> tuple[dict[str, Any], dict[str, Any] | None, str | None]:
    """(job document, transcript, certificate file text) for a job the caller may see."""
    with session_scope() as s:
        job = visible_job(s, job_id)  # another tenant's job: the same 404 as the API
        doc = services.job_document(job)
        tr = s.get(Transcript, job_id)
        # An identify job's evidence stays with its validators (its challenges stay unused).
        transcript = tr.document() if tr is not None and job.kind == "verify" else None
        certificate = attest.stored_certificate(s, job_id)
    return doc, transcript, certificate


def certificate_summary(text: str | None) -> dict[str, Any] | None:
    """What the report shows of a stored certificate: who signed it and its subject."""
    if not text:
        return None
    envelope = json.loads(text)
    statement = json.loads(base64.b64decode(envelope["payload"]))
    return {"keyid": envelope["signatures"][0]["keyid"], "subject": statement["subject"][0]}


def report_html(
    doc: dict[str, Any],
    transcript: dict[str, Any] | None,
    certificate: str | None,
    base_url: str,
    standalone: bool,
) -> str:
    """The report page, shared with ``rev report`` (``standalone``: one self-contained file)."""
    data = build_report(doc, transcript, certificate_summary(certificate), base_url=base_url)
    context = _file_context() if standalone else _context()
    return render("report.html", standalone=standalone, report=data, **context)


def _file_context() -> dict[str, Any]:
    return {
        "who": None,
        "csrf_token": "",
        "static_url": "",
        "version": __version__,
        "generated": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S"),
    }


@bp.get("/jobs/<job_id>")
def report(job_id: str) -> ResponseReturnValue:
    doc, transcript, certificate = _load(job_id)
    return report_html(doc, transcript, certificate, request.host_url, standalone=False)


@bp.get("/jobs/<job_id>/report.html")
def report_file(job_id: str) -> ResponseReturnValue:
    doc, transcript, certificate = _load(job_id)
    html = report_html(doc, transcript, certificate, request.host_url, standalone=True)
    return _download(html, f"report-{job_id[:8]}.html", "text/html")


@bp.get("/jobs/<job_id>/transcript.json")
def transcript_file(job_id: str) -> ResponseReturnValue:
    _doc, transcript, _cert = _load(job_id)
    if transcript is None:
        raise NotFound("this job has no transcript", code="transcript_not_found")
    body = json.dumps(transcript, separators=(",", ":"))
    return _download(body, f"transcript-{job_id[:8]}.json", "application/json")


@bp.get("/jobs/<job_id>/certificate.json")
def certificate_file(job_id: str) -> ResponseReturnValue:
    _doc, _transcript, certificate = _load(job_id)
    if certificate is None:
        raise NotFound("no certificate was issued for this job", code="certificate_not_found")
    return _download(certificate, f"certificate-{job_id[:8]}.json", "application/json")


def _download(body: str, name: str, mimetype: str) -> Response:
    resp = Response(body, mimetype=mimetype)
    resp.headers["Content-Disposition"] = f'attachment; filename="{name}"'
    return resp
