"""gc.freeze() before the pool forks: the children keep sharing the parent's objects.

Measured for real: a parent holding ~40 MB of Python objects forks, the child runs a full
garbage collection, and the parent reads how many of its pages became private again (the
ones the child copied). Linux only (/proc/self/smaps_rollup).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rev_tasks.testing.harness import ROOT

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/smaps_rollup").exists(), reason="needs Linux /proc/self/smaps_rollup"
)

SCRIPT = textwrap.dedent(
    """
    import gc, os, sys
    from rev_tasks.ops.memory import freeze_preloaded

    def private_dirty_mb():
        for line in open("/proc/self/smaps_rollup"):
            if line.startswith("Private_Dirty:"):
                return int(line.split()[1]) / 1024

    keep = [{"i": i, "s": [i, str(i)]} for i in range(250_000)]  # preloaded modules' stand-in
    frozen = freeze_preloaded()
    to_parent, to_child = os.pipe(), os.pipe()
    pid = os.fork()
    if pid == 0:
        gc.collect()  # what a pool child's collector does sooner or later
        os.write(to_parent[1], b"x")
        os.read(to_child[0], 1)
        os._exit(0)
    os.read(to_parent[0], 1)
    copied = private_dirty_mb()  # the parent's pages the child no longer shares
    os.write(to_child[1], b"x")
    os.waitpid(pid, 0)
    print(frozen, round(copied, 1), gc.get_freeze_count())
    """
)


def _run(tuning: str) -> tuple[bool, float, int]:
    env = {**os.environ, "REV_WORKER_MEMORY_TUNING": tuning, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    frozen, copied, count = out.stdout.split()
    return frozen == "True", float(copied), int(count)


def test_frozen_objects_stay_shared_after_fork() -> None:
    frozen, copied_frozen, count = _run("1")
    assert frozen and count > 250_000
    off, copied_plain, count_off = _run("0")
    assert not off and count_off == 0
    # unfrozen, the child's collection copies the pages of every object it visits
    assert copied_plain > 20, copied_plain
    assert copied_frozen < copied_plain / 3, (copied_frozen, copied_plain)
