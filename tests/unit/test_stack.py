"""The local stack's exposure (scripts/stack.py): loopback binds, owner-only files, Flower auth.

``_start_services`` runs with ``start`` recorded instead of spawned, so every member's
command line and environment is checked without starting a farm; the Flower it would
start is then started for real (on the test Redis) to show its API needs the credentials.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from rev_tasks.testing.harness import ROOT, GroupProcess, free_port, wait_http


@pytest.fixture()
def stack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    monkeypatch.setenv("REV_VAR_DIR", str(tmp_path / "var"))
    spec = importlib.util.spec_from_file_location("stack_under_test", ROOT / "scripts/stack.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "FLOWER_AUTH", tmp_path / "dot-rev" / "flower-auth")
    old_umask = os.umask(0o022)
    os.umask(old_umask)
    yield module
    os.umask(old_umask)  # make_private sets this process's umask


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_flower_credentials_are_created_once_owner_only(stack: ModuleType) -> None:
    auth = stack.ensure_flower_auth(stack.FLOWER_AUTH)
    user, _, password = auth.partition(":")
    assert user == "rev" and len(password) >= 24
    assert _mode(stack.FLOWER_AUTH) == 0o600
    assert stack.ensure_flower_auth(stack.FLOWER_AUTH) == auth  # kept, like the API key


def test_the_credential_master_key_is_created_once_owner_only(stack: ModuleType) -> None:
    """`make up` makes the Fernet key the stack's credentials are encrypted with: usable by
    rev_tasks.credentials, 0600, and never replaced (that would orphan every stored value)."""
    from rev_tasks import credentials

    path = stack.ensure_credential_key(stack.VAR / "credential.key")
    assert _mode(path) == 0o600
    first = path.read_text()
    assert stack.ensure_credential_key(path).read_text() == first
    keys = credentials.load_keys({"REV_CREDENTIAL_KEY_FILE": str(path)})
    assert keys.decrypt(keys.encrypt(b"sk-test")) == b"sk-test"


def test_files_the_stack_writes_are_owner_only(stack: ModuleType) -> None:
    var: Path = stack.VAR
    (var / "log").mkdir(parents=True)
    (var / "run").mkdir()
    for loose in (var / "rev.db", var / "log" / "web.log"):
        loose.write_text("x")
        loose.chmod(0o644)
    var.chmod(0o755)
    (var / "log").chmod(0o755)
    stack.make_private(var)
    assert _mode(var) == 0o700 and _mode(var / "log") == 0o700 and _mode(var / "run") == 0o700
    assert _mode(var / "rev.db") == 0o600 and _mode(var / "log" / "web.log") == 0o600
    # What members create from now on (SQLite's rev.db, logs, Redis files) is owner-only too:
    # they inherit the umask.
    stack.start("probe", [sys.executable, "-c", f"open({str(var / 'new.db')!r}, 'w')"], {})
    pid = int((var / "run" / "probe.pid").read_text())
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)
    assert _mode(var / "new.db") == 0o600
    assert _mode(var / "log" / "probe.log") == 0o600


@pytest.fixture()
def recorded(stack: ModuleType, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """``_start_services`` of a stack on ports 8123/5566: what it would start, by name."""
    started: dict[str, Any] = {}
    monkeypatch.setattr(stack, "start", lambda name, argv, env: started.update({name: (argv, env)}))
    stack.VAR.mkdir(parents=True, exist_ok=True)
    redis_url = os.environ.get("REV_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
    state = {
        "id": "t",
        "api": "http://127.0.0.1:8123",
        "flower": "http://127.0.0.1:5566",
        "env": {"REDIS_URL": redis_url, "REV_VAR_DIR": str(stack.VAR)},
    }
    stack._start_services(state, 8123, 5566)
    return started


def test_every_member_binds_loopback(recorded: dict[str, Any]) -> None:
    argv, env = recorded["web"]
    assert env["GUNICORN_BIND"] == "127.0.0.1:8123"
    # the shipped config, unchanged: no -b/-w/--timeout/-k on the command line
    assert argv[-3:] == ["-c", str(ROOT / "deploy" / "gunicorn.conf.py"), "web.wsgi:app"]
    assert not {"-b", "-w", "--timeout", "-k", "--bind"} & set(argv)
    for name in ("worker-cpu", "worker-consensus"):
        assert recorded[name][1]["REV_METRICS_ADDR"] == "127.0.0.1", name
    flower_argv, flower_env = recorded["flower"]
    assert "--address=127.0.0.1" in flower_argv
    assert "FLOWER_UNAUTHENTICATED_API" not in flower_env


def test_the_stacks_flower_needs_its_credentials(
    stack: ModuleType, recorded: dict[str, Any], tmp_path: Path
) -> None:
    """The Flower the stack starts, started for real (port moved): 401 without, 200 with."""
    import requests

    argv, env = recorded["flower"]
    port = free_port()
    argv = [a if not a.startswith("--port=") else f"--port={port}" for a in argv]
    auth = stack.FLOWER_AUTH.read_text().strip()
    assert env["FLOWER_BASIC_AUTH"] == auth
    env = {**env, "FLOWER_UNAUTHENTICATED_API": ""}  # the test's own environment must not open it
    proc = GroupProcess("flower", [*argv, "--persistent=False"], env, tmp_path / "flower.log")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/healthcheck", timeout=90, proc=proc)
        assert requests.get(f"{url}/api/workers", timeout=10).status_code == 401
        assert (
            requests.get(f"{url}/api/workers", auth=("rev", "wrong"), timeout=10).status_code == 401
        )
        user, _, password = auth.partition(":")
        assert (
            requests.get(f"{url}/api/workers", auth=(user, password), timeout=10).status_code == 200
        )
        stack.wait_flower(url, 10, auth)  # what `make up` waits for
    finally:
        proc.stop(10)


def test_worker_metrics_default_to_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    """Outside the image (which sets REV_METRICS_ADDR=0.0.0.0) nothing listens beyond loopback."""
    monkeypatch.delenv("REV_METRICS_ADDR", raising=False)
    code = (
        "from rev_tasks import metrics;"
        "server, _ = metrics.start_worker_metrics_server(0);"
        "print(server.server_address[0])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "127.0.0.1"
