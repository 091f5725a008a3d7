"""Prepare ``PROMETHEUS_MULTIPROC_DIR`` before prometheus_client is imported.

prometheus_client decides at import time whether values live in per-process mmap files;
a worker started by hand (``rev worker``) must set the directory first, or task metrics
recorded in the pool children never reach the main process's ``/metrics``. This module
imports nothing from prometheus_client for exactly that reason. Containers do the same
in ``deploy/entrypoint.sh``.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path


def prepare_multiproc_dir(
    path: str | os.PathLike[str] | None = None, *, clean: bool = True
) -> Path:
    """Create the directory, wipe stale ``*.db`` files, and export the variable.

    ``path`` defaults to the current ``PROMETHEUS_MULTIPROC_DIR`` or a fresh temporary
    directory. Wiping matters: files of a previous run's pids would be summed into the
    new run's counters and live gauges. One directory per worker instance: two workers
    sharing one would wipe each other. Raises RuntimeError when prometheus_client was
    already imported without the variable (too late to switch modes).
    """
    if path is None:
        existing = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        path = existing or tempfile.mkdtemp(prefix="rev-prom-")
    target = Path(path)
    if "prometheus_client.values" in sys.modules and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        raise RuntimeError(
            "prometheus_client is already imported in single-process mode; "
            "call prepare_multiproc_dir() before importing rev_tasks.metrics"
        )
    target.mkdir(parents=True, exist_ok=True)
    if clean:
        for stale in target.glob("*.db"):
            stale.unlink(missing_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(target)
    return target
