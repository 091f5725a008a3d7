"""``rev backup now|list`` and ``rev restore``: the database backups of :mod:`rev_tasks.ops.backup`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url

from rev_tasks.ops.backup import (
    BackupError,
    BackupInputError,
    BackupSettings,
    backup_now,
    list_backups,
    restore,
)


def _fail(prog: str, exc: BackupError) -> int:
    print(f"{prog}: error: {exc}", file=sys.stderr)
    return 2 if isinstance(exc, BackupInputError) else 1


def _cmd_backup_now(args: argparse.Namespace) -> int:
    try:
        settings = BackupSettings.from_env()
        path = backup_now(
            args.database_url or settings.database_url,
            args.dir or settings.backup_dir,
            settings.keep if args.keep is None else args.keep,
        )
    except BackupError as exc:
        return _fail("rev backup now", exc)
    print(f"backup written: {path} ({path.stat().st_size} bytes)")
    return 0


def _cmd_backup_list(args: argparse.Namespace) -> int:
    try:
        dest = Path(args.dir or BackupSettings.from_env().backup_dir)
    except BackupError as exc:
        return _fail("rev backup list", exc)
    backups = list_backups(dest)
    if not backups:
        print(f"no backups in {dest}")
        return 0
    width = max(len(str(info.path)) for info in backups)
    for info in reversed(backups):  # newest first: the one an operator wants
        stamp = info.created.strftime("%Y-%m-%d %H:%M:%SZ")
        print(f"{str(info.path):<{width}}  {stamp}  {info.size_bytes:>12} bytes  {info.kind}")
    return 0


def _cmd_restore(args: argparse.Namespace) -> int:
    try:
        url = args.database_url or BackupSettings.from_env().database_url
        restore(args.file, url, force=args.force)
        shown = make_url(url).render_as_string(hide_password=True)
    except BackupError as exc:
        return _fail("rev restore", exc)
    print(f"restored {args.file} into {shown}; now run: alembic upgrade head")
    return 0


def add_commands(subparsers: Any) -> None:
    """Add ``rev backup now|list`` and ``rev restore`` to the CLI's subparsers.

    Each sets ``func``: the CLI calls ``sys.exit(args.func(args))``. Exit codes: 0 ok,
    1 the operation failed, 2 bad input (argparse's own usage errors are 2 as well).
    """
    backup = subparsers.add_parser(
        "backup", help="back up the database", description="Back up the database."
    )
    actions = backup.add_subparsers(dest="backup_command", metavar="{now,list}", required=True)
    now = actions.add_parser("now", help="take a backup now and prune old ones")
    now.add_argument("--dir", help="backup directory (REV_BACKUP_DIR, default var/backups)")
    now.add_argument("--keep", type=int, help="backups to keep (REV_BACKUP_KEEP, default 7)")
    now.add_argument("--database-url", help="database to back up (DATABASE_URL)")
    now.set_defaults(func=_cmd_backup_now)
    lst = actions.add_parser("list", help="list backups, newest first")
    lst.add_argument("--dir", help="backup directory (REV_BACKUP_DIR, default var/backups)")
    lst.set_defaults(func=_cmd_backup_list)

    rst = subparsers.add_parser(
        "restore",
        help="restore a backup into an empty database",
        description="Restore a backup made by `rev backup now` into DATABASE_URL.",
    )
    rst.add_argument("file", help="a .dump (PostgreSQL) or .sqlite3 (SQLite) backup")
    rst.add_argument("--force", action="store_true", help="restore even if tables exist")
    rst.add_argument("--database-url", help="target database (DATABASE_URL)")
    rst.set_defaults(func=_cmd_restore)
