"""Where the CLI finds the coordinator, and what `make up` tells about its own files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from rev_tasks.settings import api_url

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("env", "url"),
    [
        ({}, "http://127.0.0.1:8000"),
        ({"REV_PORT": "8123"}, "http://127.0.0.1:8123"),
        (
            {"REV_PORT": "8123", "REV_API_URL": "https://rev.example.com/"},
            "https://rev.example.com",
        ),
        ({"REV_API_URL": "http://10.0.0.5:8000"}, "http://10.0.0.5:8000"),
    ],
)
def test_the_cli_default_follows_rev_port(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], url: str
) -> None:
    for name in ("REV_PORT", "REV_API_URL"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert api_url() == url


def test_a_bad_rev_port_is_one_line_and_exit_2() -> None:
    env = {k: v for k, v in os.environ.items() if k != "REV_API_URL"}
    env["REV_PORT"] = "eighty"
    proc = subprocess.run(
        [sys.executable, "-m", "rev_tasks.cli", "status", "some-job"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip() == "rev: error: REV_PORT must be a port number, not 'eighty'"


_STACK = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("stack", "scripts/stack.py")
stack = importlib.util.module_from_spec(spec)
spec.loader.exec_module(stack)
stack.start("probe", [sys.executable, "-c", "pass"], {})
"""


@pytest.mark.parametrize("inside", [False, True], ids=["elsewhere", "in-repo"])
def test_stack_names_its_logs_under_rev_var_dir(tmp_path: Path, inside: bool) -> None:
    var = (ROOT / "var" / f"test-{os.getpid()}") if inside else tmp_path / "var"
    env = {**os.environ, "REV_VAR_DIR": str(var)}
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _STACK],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        shown = str(var / "log" / "probe.log")
        if inside:
            shown = str((var / "log" / "probe.log").relative_to(ROOT))
        assert f", log {shown})" in proc.stdout, proc.stdout
        assert (var / "log" / "probe.log").exists() and (var / "run" / "probe.pid").exists()
    finally:
        if inside:
            import shutil

            shutil.rmtree(var, ignore_errors=True)


def test_the_up_banner_names_rev_api_url_and_the_log_folder(tmp_path: Path) -> None:
    script = _STACK.replace(
        'stack.start("probe", [sys.executable, "-c", "pass"], {})',
        'state = {"api": "http://127.0.0.1:8123", "flower": "f", "env": {"REDIS_URL": "r"}}\n'
        'print("\\n".join(stack.banner(state)))',
    )
    env = {**os.environ, "REV_VAR_DIR": str(tmp_path / "var")}
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "rev commands in another shell: export REV_API_URL=http://127.0.0.1:8123" in lines
    assert f"logs in {tmp_path / 'var' / 'log'}, pid files in {tmp_path / 'var' / 'run'}" in lines
