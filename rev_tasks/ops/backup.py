"""Database backups and restores: PostgreSQL (``pg_dump -Fc``) and SQLite (online backup API).

No Celery import: ``rev backup now`` must work from a host with only the database client
tools, and the beat task (``rev_tasks.tasks.maintenance.backup``) is a one-line wrapper
around :func:`backup_from_env`.

Guarantees kept here, because an operator finds out they were missing on the worst day:

- A backup file exists only if it is complete: it is written to a hidden temporary name,
  fsynced and renamed. ``list_backups`` and the age metric therefore never see a torn dump.
- Pruning removes only files this module named (``rev-YYYYmmddTHHMMSSZ[-N].dump|.sqlite3``),
  and only after a new backup succeeded, so a failing job never eats the last good copy.
- Restores go into an empty database unless ``force`` is given: restoring over live
  tables is how a recovery turns into a second incident.
- Messages are one line and never contain the database password.

Settings come from the environment: ``DATABASE_URL`` (default: the farm's, i.e.
``sqlite:///var/rev.db`` under ``REV_VAR_DIR``), ``REV_BACKUP_DIR`` (``var/backups``),
``REV_BACKUP_KEEP`` (7), ``REV_BACKUP_SCHEDULE`` (crontab ``"m h dom mon dow"`` or seconds;
default ``"0 3 * * *"``, daily 03:00 UTC).

Import order matters: ``rev`` imports this module to build its parser, and ``rev worker``
must set ``PROMETHEUS_MULTIPROC_DIR`` before prometheus_client is first imported. So
``rev_tasks.metrics`` (and SQLAlchemy) are imported inside the functions that use them.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rev_tasks import queues
from rev_tasks.ops.backup_files import EXTENSIONS, list_backups, next_backup_path
from rev_tasks.queues import Task

if TYPE_CHECKING:  # pragma: no cover - typing only
    from sqlalchemy.engine import URL

# Used only when rev_tasks.settings is unavailable; normally the farm's own defaults apply
# (REV_VAR_DIR/rev.db and REV_VAR_DIR/backups, REV_VAR_DIR defaulting to ./var).
DEFAULT_DATABASE_URL = "sqlite:///var/rev.db"
DEFAULT_BACKUP_DIR = "var/backups"
DEFAULT_KEEP = 7
DEFAULT_SCHEDULE = "0 3 * * *"
#: How long one pg_dump/pg_restore may run before it is treated as hung.
DEFAULT_TIMEOUT_S = 3600.0

BACKUP_BEAT_NAME = "rev-backup-database"

_PG_MAGIC = b"PGDMP"
_SQLITE_MAGIC = b"SQLite format 3\x00"
#: Temporary files older than this are leftovers of a killed run and are removed on prune.
_STALE_TMP_S = 24 * 3600


class BackupError(RuntimeError):
    """A backup or restore failed; the message is one line, fit for a log or a terminal."""


class BackupInputError(BackupError, ValueError):
    """The request itself is wrong (bad URL, missing file, non-empty target): exit code 2."""


@dataclass(frozen=True)
class BackupSettings:
    """Backup settings resolved from the environment (see module docstring)."""

    database_url: str
    backup_dir: Path
    keep: int

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> BackupSettings:
        env = dict(os.environ) if env is None else env
        raw_keep = env.get("REV_BACKUP_KEEP", str(DEFAULT_KEEP))
        try:
            keep = int(raw_keep)
        except ValueError:
            raise BackupInputError(
                f"REV_BACKUP_KEEP must be an integer, got {raw_keep!r}"
            ) from None
        database_url, backup_dir = env.get("DATABASE_URL"), env.get("REV_BACKUP_DIR")
        if not database_url or not backup_dir:
            farm_db, farm_dir = _farm_defaults()
            database_url = database_url or farm_db
            backup_dir = backup_dir or farm_dir
        return cls(database_url=database_url, backup_dir=Path(backup_dir), keep=keep)


def _farm_defaults() -> tuple[str, str]:
    """The farm's default database and ``<var>/backups``, so CLI and workers agree."""
    try:
        from rev_tasks.settings import get_settings

        settings = get_settings()
    except (ImportError, ValueError):
        return DEFAULT_DATABASE_URL, DEFAULT_BACKUP_DIR
    return settings.database_url, str(Path(settings.var_dir) / "backups")


# --------------------------------------------------------------------------- URLs
def _parse_url(database_url: str) -> URL:
    from sqlalchemy.engine import make_url  # local: keeps `rev` start-up light
    from sqlalchemy.exc import ArgumentError

    try:
        url = make_url(database_url)
    except (ArgumentError, ValueError):
        raise BackupInputError(f"not a database URL: {database_url!r}") from None
    backend = url.get_backend_name()
    if backend not in EXTENSIONS:
        raise BackupInputError(
            f"unsupported database {backend!r}: backups support postgresql and sqlite"
        )
    if backend == "sqlite" and (not url.database or url.database == ":memory:"):
        raise BackupInputError("an in-memory SQLite database cannot be backed up or restored")
    return url


def _redacted(url: URL) -> str:
    return url.render_as_string(hide_password=True)


def _pg_conninfo(url: URL) -> tuple[str, dict[str, str]]:
    """A libpq URI without the password, and an environment carrying it.

    The password travels in ``PGPASSWORD`` so that it shows in neither ``ps`` nor errors.
    """
    conninfo = url.set(drivername="postgresql", password=None).render_as_string(hide_password=False)
    env = dict(os.environ)
    env.setdefault("PGCONNECT_TIMEOUT", "10")
    if url.password is not None:
        env["PGPASSWORD"] = str(url.password)
    return conninfo, env


def _sqlite_path(url: URL) -> Path:
    assert url.database is not None
    return Path(url.database)


# --------------------------------------------------------------------------- helpers
def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise BackupError(f"{name} not found on PATH: install the PostgreSQL client tools")
    return path


def _run(cmd: list[str], env: dict[str, str], what: str, timeout: float) -> None:
    try:
        proc = subprocess.run(
            cmd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        raise BackupError(f"{what} did not finish within {timeout:.0f} s") from None
    if proc.returncode != 0:
        lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()]
        detail = lines[-1] if lines else "no error output"
        raise BackupError(f"{what} failed (exit {proc.returncode}): {detail}")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sniff(path: Path) -> str:
    with path.open("rb") as fh:
        head = fh.read(len(_SQLITE_MAGIC))
    if head.startswith(_PG_MAGIC):
        return "postgresql"
    if head.startswith(_SQLITE_MAGIC):
        return "sqlite"
    raise BackupInputError(
        f"{path} is not a backup this tool made (neither pg_dump custom format nor SQLite)"
    )


# --------------------------------------------------------------------------- backup
def _dump_postgres(url: URL, tmp: Path, timeout: float) -> None:
    conninfo, env = _pg_conninfo(url)
    cmd = [
        _tool("pg_dump"),
        "--format=custom",
        "--no-password",
        f"--file={tmp}",
        f"--dbname={conninfo}",
    ]
    _run(cmd, env, "pg_dump", timeout)


def _dump_sqlite(url: URL, tmp: Path) -> None:
    src_path = _sqlite_path(url).resolve()
    if not src_path.is_file():
        raise BackupInputError(f"SQLite database not found: {src_path}")
    try:
        src = sqlite3.connect(f"{src_path.as_uri()}?mode=ro", uri=True)
        try:
            dst = sqlite3.connect(tmp)
            try:
                # One step (pages=-1) holds a read lock for the whole copy: a consistent
                # snapshot even while workers write.
                src.backup(dst)
            finally:
                dst.close()
        finally:
            src.close()
    except sqlite3.Error as exc:
        raise BackupError(f"SQLite backup of {src_path} failed: {exc}") from None


def backup_now(
    database_url: str,
    dest_dir: str | os.PathLike[str],
    keep: int = DEFAULT_KEEP,
    *,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> Path:
    """Back up the database into ``dest_dir`` and keep the newest ``keep`` backups.

    PostgreSQL: ``pg_dump -Fc`` (restorable with pg_restore, compressed, table-selectable)
    to ``rev-YYYYmmddTHHMMSSZ.dump``. SQLite: a consistent online copy to ``.sqlite3``.
    Returns the new file. Raises :class:`BackupError` (and counts
    ``rev_backup_failures_total``) on any failure.
    """
    from rev_tasks import metrics  # local: see the module docstring on import order

    started = time.monotonic()
    try:
        if keep < 1:
            raise BackupInputError(f"keep must be at least 1, got {keep}")
        url = _parse_url(database_url)
        backend = url.get_backend_name()
        dest = Path(dest_dir)
        try:
            dest.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BackupError(f"cannot create backup directory {dest}: {exc.strerror}") from None
        final = next_backup_path(dest, datetime.now(UTC), backend)
        tmp = dest / f".{final.name}.tmp-{os.getpid()}"
        try:
            if backend == "postgresql":
                _dump_postgres(url, tmp, timeout)
            else:
                _dump_sqlite(url, tmp)
            _fsync(tmp)
            os.replace(tmp, final)
            _fsync(dest)
        except OSError as exc:
            raise BackupError(f"writing backup into {dest} failed: {exc}") from None
        finally:
            tmp.unlink(missing_ok=True)
        prune(dest, keep)
    except BackupError:
        metrics.record_backup_failure()
        raise
    metrics.record_backup_success(time.monotonic() - started)
    return final


def backup_from_env() -> Path:
    """Run :func:`backup_now` with settings from the environment (the beat task's body)."""
    settings = BackupSettings.from_env()
    return backup_now(settings.database_url, settings.backup_dir, settings.keep)


def prune(dest_dir: str | os.PathLike[str], keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` backups (and day-old temporaries); return them."""
    if keep < 1:
        raise BackupInputError(f"keep must be at least 1, got {keep}")
    dest = Path(dest_dir)
    backups = list_backups(dest)
    removed = [info.path for info in backups[: max(0, len(backups) - keep)]]
    for path in removed:
        path.unlink(missing_ok=True)
    now = time.time()
    for tmp in dest.glob(".rev-*.tmp-*"):
        if now - tmp.stat().st_mtime > _STALE_TMP_S:
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


# --------------------------------------------------------------------------- restore
def _pg_tables(url: URL) -> list[str]:
    import psycopg  # local: SQLite-only installs need no PostgreSQL driver

    conninfo, _ = _pg_conninfo(url)
    try:
        with psycopg.connect(
            conninfo, password=url.password, connect_timeout=10, autocommit=True
        ) as conn:
            rows = conn.execute(
                """
                SELECT n.nspname || '.' || c.relname
                FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f')
                  AND n.nspname NOT IN ('pg_catalog', 'information_schema')
                  AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp%'
                ORDER BY 1
                """
            ).fetchall()
    except psycopg.Error as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BackupError(f"cannot inspect {_redacted(url)}: {first}") from None
    return [r[0] for r in rows]


def _sqlite_tables(path: Path) -> list[str]:
    if not path.exists():
        return []
    try:
        con = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            rows = con.execute(
                "SELECT name FROM sqlite_master WHERE type IN ('table', 'view') "
                "AND name NOT LIKE 'sqlite_%' ORDER BY name"
            ).fetchall()
        finally:
            con.close()
    except sqlite3.Error as exc:
        raise BackupError(f"cannot inspect SQLite database {path}: {exc}") from None
    return [r[0] for r in rows]


def _refuse_if_not_empty(tables: list[str], target: str) -> None:
    if tables:
        shown = ", ".join(tables[:5]) + (", ..." if len(tables) > 5 else "")
        raise BackupInputError(
            f"refusing to restore: {target} is not empty ({len(tables)} tables: {shown}); "
            "restore into an empty database or pass --force"
        )


def _restore_sqlite(path: Path, target: Path) -> None:
    try:
        src = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            check = src.execute("PRAGMA quick_check").fetchone()
            if not check or check[0] != "ok":
                raise BackupError(f"{path} failed SQLite's integrity check: {check}")
            target.parent.mkdir(parents=True, exist_ok=True)
            dst = sqlite3.connect(target)
            try:
                src.backup(dst)  # replaces the target's pages wholesale, under its lock
            finally:
                dst.close()
        finally:
            src.close()
    except sqlite3.Error as exc:
        raise BackupError(f"SQLite restore into {target} failed: {exc}") from None


def restore(
    file: str | os.PathLike[str],
    database_url: str,
    *,
    force: bool = False,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> None:
    """Restore a backup made by :func:`backup_now` into ``database_url``.

    The target must be empty (no tables) unless ``force``: PostgreSQL then drops the
    dumped objects first (``pg_restore --clean --if-exists``; tables the dump lacks
    stay), SQLite is overwritten whole. PostgreSQL restores run in one transaction, so a
    failure leaves the target as it was. Afterwards run ``alembic upgrade head`` to bring
    an older backup up to the current schema.
    """
    path = Path(file)
    if not path.is_file():
        raise BackupInputError(f"no such backup file: {path}")
    url = _parse_url(database_url)
    backend = url.get_backend_name()
    kind = _sniff(path)
    if kind != backend:
        raise BackupInputError(f"{path.name} is a {kind} backup but the target is {backend}")
    if backend == "postgresql":
        if not force:
            _refuse_if_not_empty(_pg_tables(url), f"database {url.database!r}")
        conninfo, env = _pg_conninfo(url)
        cmd = [
            _tool("pg_restore"),
            "--no-owner",
            "--exit-on-error",
            "--single-transaction",
            "--no-password",
            f"--dbname={conninfo}",
        ]
        if force:
            cmd += ["--clean", "--if-exists"]
        _run([*cmd, str(path)], env, "pg_restore", timeout)
    else:
        target = _sqlite_path(url)
        if not force:
            _refuse_if_not_empty(_sqlite_tables(target), f"SQLite database {target}")
        _restore_sqlite(path, target)


# --------------------------------------------------------------------------- beat
def parse_schedule(text: str) -> float | tuple[str, str, str, str, str]:
    """``"3600"`` → 3600.0 seconds; ``"0 3 * * *"`` → the five crontab fields.

    Raises ValueError with the accepted forms, so a typo fails at beat start, not at 03:00.
    """
    stripped = text.strip()
    try:
        seconds = float(stripped)
    except ValueError:
        fields = stripped.split()
        if len(fields) != 5:
            raise ValueError(
                f"REV_BACKUP_SCHEDULE must be seconds or a 5-field crontab "
                f"('minute hour day-of-month month day-of-week'), got {text!r}"
            ) from None
        return (fields[0], fields[1], fields[2], fields[3], fields[4])
    if not seconds > 0:
        raise ValueError(f"REV_BACKUP_SCHEDULE in seconds must be positive, got {text!r}")
    return seconds


def beat_schedule_entry(schedule: str | None = None) -> dict[str, Any]:
    """The beat entry for the backup task; put it under :data:`BACKUP_BEAT_NAME`.

    ``celeryconfig.beat_schedule = {BACKUP_BEAT_NAME: beat_schedule_entry()}``. Crontab
    times are in the Celery app's timezone (UTC with Celery's defaults). ``expires``
    drops a backup that waited too long (beat down, queue jammed) instead of running a
    pile of them late: one interval for a seconds schedule, one hour for a crontab.
    """
    raw = schedule or os.environ.get("REV_BACKUP_SCHEDULE") or DEFAULT_SCHEDULE
    parsed = parse_schedule(raw)
    if isinstance(parsed, float):
        sched: Any = parsed
        expires = parsed
    else:
        from celery.schedules import crontab  # local: only beat's config needs Celery

        minute, hour, dom, month, dow = parsed
        sched = crontab(
            minute=minute, hour=hour, day_of_month=dom, month_of_year=month, day_of_week=dow
        )
        expires = 3600.0
    return {
        "task": Task.BACKUP,
        "schedule": sched,
        "options": {"queue": queues.MAINTENANCE, "expires": expires},
    }
