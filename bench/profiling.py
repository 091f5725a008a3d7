"""Sampling profiles of farm processes with py-spy, summarised for the result documents.

``with PySpy(pid, out) as prof: ...`` records every process of the group under ``pid``
(``--subprocesses``: Celery prefork children, gunicorn workers) while the block runs, in
py-spy's collapsed-stack format; :func:`summarise` turns that into the lines a report needs:
the share of samples whose stack passes through each of our functions (inclusive), and the
leaf functions where the samples land (self). py-spy comes from PyPI (``pip install
py-spy``); without it, or without ptrace rights, profiling is skipped and says so.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

# Frames worth naming in a summary: the project's code and the libraries it drives.
_OURS = re.compile(r"(rev_tasks|web|bench)/")
_FRAME = re.compile(r"^(?P<func>[^ ]+) \((?P<file>[^:]+)(?::(?P<line>\d+))?\)$")


def py_spy() -> str | None:
    exe = Path(sys.executable).with_name("py-spy")
    return str(exe) if exe.exists() else shutil.which("py-spy")


class PySpy:
    """Record ``pid`` and its children at ``rate`` Hz into ``out`` (collapsed stacks)."""

    def __init__(self, pid: int, out: Path, rate: int = 250, idle: bool = False) -> None:
        self.pid = pid
        self.out = out
        self.rate = rate
        self.idle = idle
        self.proc: subprocess.Popen[bytes] | None = None
        self.error: str | None = None

    def __enter__(self) -> PySpy:
        exe = py_spy()
        if exe is None:
            self.error = "py-spy not installed (pip install py-spy)"
            return self
        self.out.parent.mkdir(parents=True, exist_ok=True)
        argv = [
            exe, "record", "--pid", str(self.pid), "--subprocesses", "--format", "raw",
            "--rate", str(self.rate), "--output", str(self.out), "--nonblocking",
        ]  # fmt: skip
        if self.idle:
            argv.append("--idle")
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        time.sleep(0.5)  # attach before the measured work starts
        if self.proc.poll() is not None:
            out = self.proc.stdout.read().decode(errors="replace") if self.proc.stdout else ""
            self.error = f"py-spy failed: {out.strip()[:300]}"
            self.proc = None
        return self

    def __exit__(self, *_: object) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGINT)  # py-spy writes its output on SIGINT
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.error = "py-spy did not stop"


def _label(frame: str) -> str:
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    path = m.group("file")
    short = path.split("site-packages/")[-1]
    for root in ("/rev_tasks/", "/web/", "/bench/"):
        if root in path:
            short = root.strip("/") + "/" + path.split(root, 1)[1]
    return f"{m.group('func')} ({short})"


def summarise(path: Path, top: int = 12, focus: str | None = None) -> dict[str, Any]:
    """Inclusive shares of our functions and self shares of leaf functions.

    ``focus`` keeps only stacks that pass through a frame containing that text (e.g.
    ``"validate"``), so idle pool processes and the Celery main loop do not dilute it.
    """
    if not path.exists():
        return {"samples": 0, "error": "no profile written"}
    inclusive: Counter[str] = Counter()
    leaf: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        frames = stack.split(";")
        if focus and not any(focus in f for f in frames):
            continue
        n = int(count_s)
        total += n
        labels = [_label(f) for f in frames]
        for lab in set(labels):
            if _OURS.search(lab):
                inclusive[lab] += n
        leaf[labels[-1]] += n
    if total == 0:
        return {"samples": 0, "focus": focus}

    def share(c: Counter[str]) -> list[list[Any]]:
        return [[name, round(100.0 * n / total, 1)] for name, n in c.most_common(top)]

    return {
        "samples": total,
        "focus": focus,
        "inclusive_pct": share(inclusive),
        "self_pct": share(leaf),
    }
