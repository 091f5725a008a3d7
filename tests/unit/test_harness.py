"""The process harness stops whole process groups, even a leader that ignores SIGTERM."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from rev_tasks.testing.harness import (
    GroupProcess,
    applied_environment,
    pid_alive,
    stop_group,
)

# A leader that ignores SIGTERM, with a child that would outlive it: what a hung worker
# and its pool look like. It prints both pids so the test can check each one.
STUBBORN = """
import os, signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
print(os.getpid(), child.pid, flush=True)
time.sleep(60)
"""


def _pids(proc: GroupProcess, timeout: float = 20.0) -> tuple[int, int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        words = proc.output().split()
        if len(words) == 2:
            return int(words[0]), int(words[1])
        time.sleep(0.05)
    raise AssertionError(f"no pids printed: {proc.output()!r}")


def _gone(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.05)
    return False


def test_stop_kills_the_group_after_the_grace_period(tmp_path: Path) -> None:
    proc = GroupProcess(
        "stubborn", [sys.executable, "-c", STUBBORN], os.environ, tmp_path / "s.log"
    )
    leader, child = _pids(proc)
    assert leader == proc.pid and pid_alive(child)
    started = time.monotonic()
    proc.stop(grace=0.5)
    assert time.monotonic() - started >= 0.5  # SIGTERM was ignored: it waited the grace out
    assert not proc.alive() and proc.returncode == -9
    assert _gone(child), "the child outlived its process group"


def test_stop_group_by_pid_alone(tmp_path: Path) -> None:
    """``make down`` knows only the pid file: polling, then SIGKILL, does the same."""
    proc = GroupProcess(
        "stubborn", [sys.executable, "-c", STUBBORN], os.environ, tmp_path / "s.log"
    )
    leader, child = _pids(proc)
    stop_group(leader, grace=0.3)
    assert _gone(leader) and _gone(child)
    proc.popen.wait(5)


def test_a_cooperative_process_exits_on_sigterm_without_waiting(tmp_path: Path) -> None:
    argv = [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)"]
    proc = GroupProcess("sleeper", argv, os.environ, tmp_path / "c.log")
    deadline = time.monotonic() + 20
    while "up" not in proc.output() and time.monotonic() < deadline:
        time.sleep(0.05)
    started = time.monotonic()
    proc.stop(grace=30)
    assert time.monotonic() - started < 10
    assert proc.returncode == -15  # SIGTERM, not the SIGKILL fallback
    assert proc.tail(10) == "up\n"


def test_applied_environment_restores_what_was_there(monkeypatch) -> None:
    monkeypatch.setenv("REV_HARNESS_KEPT", "before")
    monkeypatch.delenv("REV_HARNESS_NEW", raising=False)
    with applied_environment({"REV_HARNESS_KEPT": "inside", "REV_HARNESS_NEW": "x"}):
        assert os.environ["REV_HARNESS_KEPT"] == "inside" and os.environ["REV_HARNESS_NEW"] == "x"
    assert os.environ["REV_HARNESS_KEPT"] == "before"
    assert "REV_HARNESS_NEW" not in os.environ
