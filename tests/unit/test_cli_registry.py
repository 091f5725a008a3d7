"""The ``rev`` command groups are registered explicitly, and a broken one fails loudly.

The old dispatcher imported its command modules in a loop that swallowed ``ImportError``, so
an import bug in one module turned ``rev backup now`` into "invalid choice: 'backup'". Here
a ``sitecustomize`` on ``PYTHONPATH`` makes one module raise a real ``ImportError`` in a fresh
``rev`` process, through both ``python -m rev_tasks.cli`` and the installed console script.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import rev_tasks.cli as cli

EXPECTED_COMMANDS = {
    "verify", "fingerprint", "audit", "identify",
    "submit", "status", "wait", "cancel", "jobs", "models", "report", "certificate",
    "keys", "credentials", "worker", "backup", "restore", "health",
}  # fmt: skip

BREAKER = """
import importlib.abc
import sys

BROKEN = {broken!r}


class _Broken(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname == BROKEN:
            raise ImportError(f"rev-test: {{fullname}} is broken on purpose")
        return None


sys.meta_path.insert(0, _Broken())
"""


def _rev_with_broken(module: str, tmp_path: Path, *argv: str, script: bool = False):
    (tmp_path / "sitecustomize.py").write_text(BREAKER.format(broken=module))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(tmp_path), env.get("PYTHONPATH")) if p)
    command = (
        [str(Path(sys.executable).parent / "rev")]
        if script
        else [sys.executable, "-m", "rev_tasks.cli"]
    )
    return subprocess.run(
        [*command, *argv], capture_output=True, text=True, env=env, timeout=120, check=False
    )


def test_every_command_group_is_registered() -> None:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(sub.choices) == EXPECTED_COMMANDS
    assert all(hasattr(group, "add_commands") for group in cli.COMMANDS)
    names = [group.__name__ for group in cli.COMMANDS]
    assert len(set(names)) == len(names) and all(n.startswith("rev_tasks.cli.") for n in names)


@pytest.mark.parametrize("module", [group.__name__ for group in cli.COMMANDS])
def test_an_unimportable_command_module_stops_rev_with_its_import_error(
    module: str, tmp_path: Path
) -> None:
    proc = _rev_with_broken(module, tmp_path, "backup", "now", "--dir", str(tmp_path / "b"))
    assert proc.returncode != 0
    assert f"ImportError: rev-test: {module} is broken on purpose" in proc.stderr, proc.stderr
    assert "invalid choice" not in proc.stderr


def test_a_broken_dependency_is_named_not_hidden(tmp_path: Path) -> None:
    """The issue's case: ``rev backup now`` when the module behind it cannot be imported."""
    proc = _rev_with_broken("rev_tasks.ops.backup", tmp_path, "backup", "now")
    assert proc.returncode != 0
    assert "ImportError: rev-test: rev_tasks.ops.backup is broken on purpose" in proc.stderr
    assert "invalid choice" not in proc.stderr


def test_the_console_script_fails_the_same_way(tmp_path: Path) -> None:
    if not (Path(sys.executable).parent / "rev").is_file():
        pytest.fail("the rev console script is not installed next to this interpreter")
    proc = _rev_with_broken("rev_tasks.cli.health", tmp_path, "health", script=True)
    assert proc.returncode != 0
    assert "ImportError: rev-test: rev_tasks.cli.health is broken on purpose" in proc.stderr


def test_the_breaker_itself_leaves_a_healthy_rev_alone(tmp_path: Path) -> None:
    """Control: with a module name nothing imports, ``rev`` parses and runs as usual."""
    proc = _rev_with_broken("no_such_module_for_rev", tmp_path, "backup", "list", "--dir",
                            str(tmp_path / "none"))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "no backups in" in proc.stdout
