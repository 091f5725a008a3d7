"""``rev report`` and ``rev certificate``: a job's report as one file, and its certificate.

``rev report JOB_ID [-o FILE]`` fetches the job, its transcript and its certificate over the
API (same key as ``rev status``) and writes the coordinator's report page as one
self-contained HTML file. ``rev certificate verify FILE --public-key KEY [--transcript T]``
checks a certificate offline: exit 0 valid, 1 invalid (the reason on stderr), 2 bad input.
``rev certificate issue`` signs published jobs that have none (needs ``DATABASE_URL`` and the
signing key); ``rev certificate keygen`` writes a new signing key.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from sqlalchemy import select

from rev_tasks import attest, jobs
from rev_tasks import certificates as C
from rev_tasks.cli.common import EXIT_USAGE, UserError
from rev_tasks.client import ClientError, FarmClient
from rev_tasks.db.session import session_scope
from rev_tasks.db.tables import Job
from rev_tasks.settings import get_settings

EXIT_OK, EXIT_INVALID = 0, 1


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError as exc:
        raise UserError(f"{what} not found: {path}") from exc
    except IsADirectoryError as exc:
        raise UserError(f"{what} is a folder: {path}") from exc


def cmd_report(args: argparse.Namespace) -> int:
    # Imported here: the coordinator's page modules (Flask, the blueprints) are only needed
    # by this command, and every other ``rev`` command would pay for loading them.
    from web.reports import report_html

    client = FarmClient(args.api_url)
    try:
        doc = client.job(args.job_id)
        transcript = _optional(client.transcript, args.job_id) if doc["kind"] == "verify" else None
        certificate = _optional(client.certificate, args.job_id)
    except ClientError as exc:
        print(f"rev: {exc}", file=sys.stderr)
        return EXIT_USAGE
    text = certificate.decode("utf-8") if certificate else None
    html = report_html(doc, transcript, text, client.base_url, standalone=True)
    if args.output in (None, "-"):
        sys.stdout.write(html)
    else:
        Path(args.output).write_text(html, encoding="utf-8")
        print(f"wrote {args.output} ({len(html.encode()) // 1024} KiB)", file=sys.stderr)
    return EXIT_OK


def _optional(fetch: Any, job_id: str) -> Any:
    """A transcript or certificate the job may not have (404/409 mean: not in the report)."""
    try:
        return fetch(job_id)
    except ClientError as exc:
        if str(exc).startswith(("404", "409")):
            return None
        raise


def cmd_verify(args: argparse.Namespace) -> int:
    raw = _read(args.certificate, "certificate")
    key = C.load_public_key(_read(args.public_key, "public key"))
    transcript = None
    if args.transcript:
        try:
            transcript = json.loads(_read(args.transcript, "transcript"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UserError(f"transcript is not JSON: {args.transcript}") from exc
    try:
        ok = C.verify(raw, key, transcript)
    except C.CertificateError as exc:
        print(f"rev: certificate INVALID: {exc}", file=sys.stderr)
        return EXIT_INVALID
    p = ok.predicate
    subject = ok.statement["subject"][0]
    if args.json:
        print(json.dumps({"valid": True, "keyid": ok.keyid, "statement": ok.statement}))
        return EXIT_OK
    print(f"valid certificate: job {p['job']['id']} {p['verdict']}")
    print(f"  subject     {subject['name']}  {json.dumps(subject['digest'])}")
    print(f"  signed by   {ok.keyid}")
    print(f"  tolerance   {p.get('tolerance')}, alpha {p.get('alpha')}, "
          f"{p['challenges'].get('used')} challenges")  # fmt: skip
    if p.get("transcript"):
        print(f"  transcript  {p['transcript']['root']}")
    print(f"  published   {p.get('published_at')}")
    if ok.checked_transcript:
        print("  the transcript audits and matches the certificate's root, verdict and votes")
    return EXIT_OK


def cmd_issue(args: argparse.Namespace) -> int:
    key = C.load_signing_key(args.key_file or get_settings().cert_key_file)
    failed = 0
    with session_scope() as s:
        ids = args.job_ids or list(
            s.scalars(select(Job.id).where(Job.status == jobs.SUCCEEDED).order_by(Job.created_at))
        )
    for job_id in ids:
        try:
            with session_scope() as s:
                attest.issue(s, job_id, key)
            print(f"{job_id} certified by {C.keyid(key)[:16]}")
        except (C.CertificateError, OSError) as exc:
            failed += 1
            print(f"rev: {job_id}: {exc}", file=sys.stderr)
    return EXIT_INVALID if failed else EXIT_OK


def cmd_keygen(args: argparse.Namespace) -> int:
    if Path(args.output).exists():
        raise UserError(f"{args.output} exists; a signing key is never overwritten")
    key = C.create_signing_key(args.output)
    print(f"wrote {args.output} (mode 0600), keyid {C.keyid(key)}")
    return EXIT_OK


def add_commands(subparsers: Any) -> None:
    """Add ``report`` and ``certificate`` to the ``rev`` CLI."""
    r = subparsers.add_parser("report", help="a farm job's report as one self-contained HTML file")
    r.add_argument("job_id")
    r.add_argument("-o", "--output", help="write here (default: stdout)")
    r.add_argument("--api-url", default=None, help="coordinator URL (default $REV_API_URL)")
    r.set_defaults(func=cmd_report)

    c = subparsers.add_parser("certificate", help="verify, issue or make signed certificates")
    sub = c.add_subparsers(dest="action", metavar="ACTION")
    sub.required = True
    v = sub.add_parser("verify", help="check a certificate's signature (and its transcript)")
    v.add_argument("certificate", help="the certificate file (GET /v1/jobs/ID/certificate)")
    v.add_argument("--public-key", required=True, help="the farm's public key (PEM)")
    v.add_argument("--transcript", help="the job's transcript: root, verdict and votes must match")
    v.add_argument("--json", action="store_true")
    v.set_defaults(func=cmd_verify)
    i = sub.add_parser("issue", help="sign published jobs that have no certificate (operators)")
    i.add_argument("job_ids", nargs="*", help="default: every succeeded job")
    i.add_argument("--key-file", help="signing key (default $REV_CERT_KEY_FILE)")
    i.set_defaults(func=cmd_issue)
    k = sub.add_parser("keygen", help="write a new Ed25519 signing key (mode 0600)")
    k.add_argument("output")
    k.set_defaults(func=cmd_keygen)
