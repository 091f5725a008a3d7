"""``rev credentials``: a tenant's named endpoint credentials, over the coordinator's API.

    rev credentials set NAME            # the value from stdin (a pipe) or a hidden prompt
    rev credentials list [--json]
    rev credentials delete NAME
    rev credentials keygen              # a new master key for REV_CREDENTIAL_KEY (local)
    rev credentials rekey               # operators: re-encrypt every row under the first key

The value is never a command-line argument (other users read those in ``ps``) and is never
printed back: the farm answers with the name and timestamps only. ``set``, ``list`` and
``delete`` act for the tenant of ``REV_API_KEY`` (rev_tasks/client.py); ``rekey`` runs on
``DATABASE_URL`` with the farm's ``REV_CREDENTIAL_KEY`` (docs/security.md, "Credentials").
"""

from __future__ import annotations

import argparse
import getpass
import json
import re
import sys
from typing import Any

from rev_tasks import credentials
from rev_tasks.cli.common import UserError, over_http
from rev_tasks.client import FarmClient

_NAME = re.compile(credentials.NAME_PATTERN)


def _name(text: str) -> str:
    if not _NAME.match(text):
        raise argparse.ArgumentTypeError(
            "a credential name is 1-64 letters, digits, '.', '_' or '-' (starting with a "
            "letter or digit)"
        )
    return text


def read_value(stdin: Any = None) -> str:
    """The secret from a pipe (one line; its newline dropped) or a prompt that does not echo."""
    stream = stdin if stdin is not None else sys.stdin
    if stream.isatty():
        value = getpass.getpass("credential value (not shown): ")
    else:
        value = stream.read()
        if value.endswith("\n"):
            value = value[:-1]
        if value.endswith("\r"):
            value = value[:-1]
    if not value:
        raise UserError("no credential value: pipe it on stdin or type it at the prompt")
    if "\n" in value or "\r" in value:
        raise UserError("a credential value is one line (it is sent as a request header)")
    return value


def cmd_set(args: argparse.Namespace, client: FarmClient) -> int:
    value = read_value()
    doc = client.set_credential(args.name, value)
    verb = "rotated" if doc.get("rotated_at") else "stored"
    print(f"{verb} credential {doc['name']}")
    return 0


def cmd_list(args: argparse.Namespace, client: FarmClient) -> int:
    rows = client.credentials()["credentials"]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        print(f"{r['name']}\tcreated {r['created_at']}\trotated {r['rotated_at'] or '-'}")
    return 0


def cmd_delete(args: argparse.Namespace, client: FarmClient) -> int:
    client.delete_credential(args.name)
    print(f"deleted credential {args.name}")
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    print(credentials.generate_key())
    print(
        "a new master key: put it first in REV_CREDENTIAL_KEY (comma-separated, old keys after "
        "it) on the coordinator and the endpoint workers, then run `rev credentials rekey`",
        file=sys.stderr,
    )
    return 0


def cmd_rekey(args: argparse.Namespace) -> int:
    from rev_tasks.db.session import session_scope

    try:
        with session_scope() as s:
            count = credentials.rekey(s)
    except credentials.CredentialError as exc:
        raise UserError(str(exc)) from None
    print(f"re-encrypted {count} credential(s) under the first key of REV_CREDENTIAL_KEY")
    return 0


def add_commands(subparsers: Any) -> None:
    """Add ``rev credentials …`` to the ``rev`` parser."""
    group = subparsers.add_parser(
        "credentials", help="store, list and delete endpoint credentials (values never shown)"
    )
    sub = group.add_subparsers(dest="credentials_command", metavar="ACTION")
    sub.required = True

    def remote(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--api-url", default=None, help="coordinator URL (default $REV_API_URL)")
        return p

    s = remote("set", "create or rotate NAME; the value is read from stdin or a prompt")
    s.add_argument("name", type=_name)
    s.set_defaults(func=over_http(cmd_set))

    ls = remote("list", "the tenant's credentials: names and timestamps")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=over_http(cmd_list))

    d = remote("delete", "delete NAME")
    d.add_argument("name", type=_name)
    d.set_defaults(func=over_http(cmd_delete))

    k = sub.add_parser("keygen", help="print a new master key for REV_CREDENTIAL_KEY")
    k.set_defaults(func=cmd_keygen)

    r = sub.add_parser(
        "rekey", help="re-encrypt every credential under the first master key (on DATABASE_URL)"
    )
    r.set_defaults(func=cmd_rekey)
