"""``rev keys``: create, list and revoke API keys directly on ``DATABASE_URL``.

Operators run these on a machine that can reach the farm's database; there is no HTTP
endpoint that mints keys, so a stolen API key cannot be used to create more keys.

    rev keys create --tenant acme --scopes submit,read [--name ci] [--json]
    rev keys list [--tenant acme] [--json]
    rev keys revoke KEY_ID
    rev keys ensure-dev --file .rev/api-key      # used by `make up`

The token is printed once by ``create`` and never again: only its SHA-256 is stored.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from rev_tasks import apikeys
from rev_tasks.db.session import session_scope


def _iso(ts: Any) -> str | None:
    return ts.isoformat() if ts is not None else None


def cmd_create(args: argparse.Namespace) -> int:
    with session_scope() as s:
        row, token = apikeys.create_key(s, args.tenant, args.scopes, args.name)
        doc = {"id": row.id, "tenant": row.tenant, "scopes": row.scopes.split(","), "token": token}
    if args.json:
        print(json.dumps(doc))
    else:
        print(token)
        print(
            f"key {doc['id']} for tenant {doc['tenant']} ({','.join(doc['scopes'])}); "
            "the token is shown only now: store it (e.g. REV_API_KEY) and keep it secret",
            file=sys.stderr,
        )
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    with session_scope() as s:
        rows = [
            {
                "id": r.id,
                "tenant": r.tenant,
                "scopes": r.scopes.split(","),
                "name": r.name,
                "created_at": _iso(r.created_at),
                "last_used_at": _iso(r.last_used_at),
                "revoked_at": _iso(r.revoked_at),
            }
            for r in apikeys.list_keys(s, args.tenant)
        ]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        state = "revoked" if r["revoked_at"] else "active"
        print(f"{r['id']}\t{r['tenant']}\t{','.join(r['scopes'])}\t{state}\t{r['name'] or ''}")
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    with session_scope() as s:
        done = apikeys.revoke(s, args.key_id)
    if not done:
        print(f"rev: no active key {args.key_id!r}", file=sys.stderr)
        return 1
    print(f"revoked {args.key_id}")
    return 0


def cmd_ensure_dev(args: argparse.Namespace) -> int:
    path = Path(args.file).expanduser()
    with session_scope() as s:
        key_id, created = apikeys.ensure_dev_key(s, path)
    print(f"{'created' if created else 'kept'} development key {key_id} in {path}")
    return 0


def add_commands(subparsers: Any) -> None:
    """Add ``rev keys …`` to the ``rev`` parser."""
    keys = subparsers.add_parser("keys", help="create, list and revoke API keys (on DATABASE_URL)")
    sub = keys.add_subparsers(dest="keys_command", metavar="ACTION")
    sub.required = True

    c = sub.add_parser("create", help="create a key; prints the token once")
    c.add_argument("--tenant", required=True, help="tenant the key acts for")
    c.add_argument("--scopes", required=True, help="comma-separated subset of submit,read,admin")
    c.add_argument("--name", default=None, help="a label (who or what uses the key)")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_create)

    ls = sub.add_parser("list", help="list keys (ids, tenants, scopes; never tokens)")
    ls.add_argument("--tenant", default=None)
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_list)

    r = sub.add_parser(
        "revoke",
        help="revoke a key by id (coordinators refuse it within REV_APIKEY_CACHE_SECONDS, 1 s)",
    )
    r.add_argument("key_id")
    r.set_defaults(func=cmd_revoke)

    d = sub.add_parser(
        "ensure-dev", help="create the local stack's admin key unless FILE holds one"
    )
    d.add_argument("--file", default=".rev/api-key")
    d.set_defaults(func=cmd_ensure_dev)
