"""A non-editable ``pip install .`` is enough to start a worker, from any directory.

The fresh virtual environment borrows the dependencies (torch, celery, ...) of the one
running the tests through a ``.pth`` line instead of downloading them again. A path that a
``.pth`` file adds is not scanned for ``.pth`` files itself, so the borrowed environment's
editable-install finder never loads: ``rev_tasks`` and ``celeryconfig`` can only come from
what ``pip install`` put into the fresh environment. The worker runs from an unrelated
directory without ``PYTHONPATH``, and the bytecode it leaves behind shows which files it
imported.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import uuid
from pathlib import Path

import pytest

from rev_tasks import queues
from tests.integration.farm import ROOT

pytestmark = pytest.mark.integration

#: Not part of a source checkout: never copied into the build.
_IGNORED = shutil.ignore_patterns(
    ".git", ".venv", "var", "build", "dist", "__pycache__", "*.pyc", "*.so", "*.egg-info",
    ".pytest_cache", ".ruff_cache", ".rev",
)  # fmt: skip


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 300) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def _fresh_env(tmp: Path) -> tuple[Path, Path, dict[str, str]]:
    """(python, site-packages) of a new venv that sees this venv's packages, and its env."""
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(
        subprocess.check_output(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            text=True,
        ).strip()
    )
    borrowed = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "borrowed-dependencies.pth").write_text("".join(f"{p}\n" for p in sorted(borrowed)))
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "PYTHONHOME"}}
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # the worker's .pyc files are the evidence
    env.pop("VIRTUAL_ENV", None)
    return python, site, env


def test_a_non_editable_install_starts_a_worker_that_answers_ping(
    redis_url: str, tmp_path: Path
) -> None:
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=_IGNORED, symlinks=True)
    python, site, env = _fresh_env(tmp_path)
    _run(
        [
            str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
            "--ignore-installed", "--no-compile", "--disable-pip-version-check", str(source),
        ],
        cwd=tmp_path, env=env, timeout=600,
    )  # fmt: skip
    assert (site / "celeryconfig.py").is_file() and (site / "rev_tasks" / "celery.py").is_file()
    assert not (site / "rev_tasks" / "__pycache__").exists()  # nothing imported it yet

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    name = f"fresh-{uuid.uuid4().hex[:8]}@{os.uname().nodename}"
    env.update(
        REDIS_URL=redis_url,
        REV_VAR_DIR=str(elsewhere / "var"),
        REV_METRICS_PORT="0",
        REV_WORKER_PRELOAD="0",
    )
    celery = [str(python), "-m", "celery", "-A", "rev_tasks"]
    log_path = tmp_path / "worker.log"
    with log_path.open("wb") as log:
        worker = subprocess.Popen(
            [
                *celery, "worker", "-P", "solo", "-Q", queues.MAINTENANCE, "-n", name,
                "--without-gossip", "--without-mingle", "--without-heartbeat",
            ],
            cwd=elsewhere, env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        answer = None
        while time.monotonic() < deadline:
            assert worker.poll() is None, log_path.read_text(errors="replace")[-3000:]
            answer = subprocess.run(
                [*celery, "inspect", "ping", "-d", name, "-t", "2"],
                cwd=elsewhere, env=env, capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            if answer.returncode == 0:
                break
            time.sleep(1)
        assert answer is not None and answer.returncode == 0, (
            f"no pong:\n{answer and answer.stdout}\n{log_path.read_text(errors='replace')}"
        )
        assert "pong" in answer.stdout and name in answer.stdout, answer.stdout
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait(10)

    # The worker (and the ping client) imported the installed copy, not the checkout.
    tag = sys.implementation.cache_tag
    for module in ("celeryconfig", "rev_tasks/celery", "rev_tasks/tasks/verify"):
        folder, _, stem = f"{site}/{module}".rpartition("/")
        assert (Path(folder) / "__pycache__" / f"{stem}.{tag}.pyc").is_file(), module
    assert not list((source / "rev_tasks").rglob("*.pyc"))
