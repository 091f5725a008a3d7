"""Backup files on disk: how :mod:`rev_tasks.ops.backup` names them and how they are listed.

Apart from the backup module because :mod:`rev_tasks.metrics` reads the age of the newest
backup from here, while the backup module records its own metrics: neither imports the other
both ways. Names are ``rev-YYYYmmddTHHMMSSZ[-N].dump|.sqlite3``; only such files count.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

#: The file extension of each database backend's backups (the backends we can back up).
EXTENSIONS = {"postgresql": "dump", "sqlite": "sqlite3"}
_KIND = {v: k for k, v in EXTENSIONS.items()}
_NAME_RE = re.compile(r"^rev-(?P<ts>\d{8}T\d{6}Z)(?:-(?P<seq>\d+))?\.(?P<ext>dump|sqlite3)$")
_TS_FORMAT = "%Y%m%dT%H%M%SZ"


@dataclass(frozen=True)
class BackupInfo:
    """One backup file, as listed by :func:`list_backups`."""

    path: Path
    created: datetime
    size_bytes: int
    kind: str  # "postgresql" | "sqlite"


def next_backup_path(dest: Path, when: datetime, backend: str) -> Path:
    """``rev-<UTC stamp>.<ext>``; a second backup within the same second gets ``-1``..."""
    stamp = when.strftime(_TS_FORMAT)
    ext = EXTENSIONS[backend]
    # Past the highest sequence used in this second, not the first free one: after a
    # prune freed the plain name, reusing it would sort the newest backup first.
    seqs = [
        int(m["seq"] or 0)
        for m in (_NAME_RE.match(p.name) for p in dest.iterdir())
        if m is not None and m["ts"] == stamp
    ]
    if not seqs:
        return dest / f"rev-{stamp}.{ext}"
    return dest / f"rev-{stamp}-{max(seqs) + 1}.{ext}"


def list_backups(dest_dir: str | os.PathLike[str]) -> list[BackupInfo]:
    """Backups in ``dest_dir``, oldest first (so ``[-1]`` is the newest); [] if none."""
    dest = Path(dest_dir)
    if not dest.is_dir():
        return []
    found: list[tuple[tuple[datetime, int], BackupInfo]] = []
    for entry in dest.iterdir():
        m = _NAME_RE.match(entry.name)
        if m is None or not entry.is_file():
            continue
        created = datetime.strptime(m["ts"], _TS_FORMAT).replace(tzinfo=UTC)
        info = BackupInfo(entry, created, entry.stat().st_size, _KIND[m["ext"]])
        found.append(((created, int(m["seq"] or 0)), info))
    found.sort(key=lambda pair: pair[0])
    return [info for _, info in found]
