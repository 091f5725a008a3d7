"""The layering rules of docs/architecture.md, enforced on the source and in a fresh process.

The REV core must stay importable (and auditable) without the farm: numpy and the standard
library only. Inference and the engine may use torch but never Celery, Flask or a database;
the coordinator never imports the task modules (it sends tasks by name).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FARM = ("celery", "kombu", "flask", "werkzeug", "sqlalchemy", "alembic", "redis", "psycopg")


def _imports(path: Path) -> set[str]:
    """Top-level names of every module ``path`` imports (absolute and relative)."""
    names: set[str] = set()
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                names.add(f"{base}.{node.module}" if node.module else base)
            elif node.module:
                names.add(node.module)
    return names


def _files(*parts: str) -> list[Path]:
    target = ROOT.joinpath(*parts)
    return [target] if target.is_file() else sorted(target.rglob("*.py"))


def _offences(files: list[Path], allowed: Callable[[str], bool]) -> list[str]:
    return [
        f"{f.relative_to(ROOT)} imports {name}"
        for f in files
        for name in sorted(_imports(f))
        if not allowed(name)
    ]


def test_core_imports_only_numpy_the_stdlib_and_itself() -> None:
    stdlib = sys.stdlib_module_names

    def allowed(name: str) -> bool:
        top = name.split(".")[0]
        return top in stdlib or top in {"numpy", "__future__"} or name.startswith("rev_tasks.core")

    assert _offences(_files("rev_tasks", "core"), allowed) == []


@pytest.mark.parametrize("part", [("rev_tasks", "inference"), ("rev_tasks", "engine.py")])
def test_inference_and_engine_use_no_farm_layer(part: tuple[str, ...]) -> None:
    def allowed(name: str) -> bool:
        return name.split(".")[0] not in FARM and not name.startswith(
            ("rev_tasks.tasks", "rev_tasks.db", "rev_tasks.jobs", "rev_tasks.celery", "web")
        )

    assert _offences(_files(*part), allowed) == []


def test_the_coordinator_never_imports_task_modules() -> None:
    assert _offences(_files("web"), lambda n: not n.startswith("rev_tasks.tasks")) == []


def test_the_checker_sees_an_offending_import() -> None:
    """The scan above can fail: a relative and an absolute farm import are both found."""
    bad = ROOT / "rev_tasks" / "core" / "_layering_probe.py"
    names = None
    try:
        bad.write_text("from ..db import tables\nimport celery\n", encoding="utf-8")
        names = _imports(bad)
    finally:
        bad.unlink(missing_ok=True)
    assert {"rev_tasks.db", "celery"} <= names


def test_the_core_runs_in_a_process_without_the_farm_or_torch() -> None:
    code = (
        "import sys, rev_tasks.core.challenges, rev_tasks.core.transcript, "
        "rev_tasks.core.decision, rev_tasks.core.hamming, rev_tasks.core.merkle\n"
        f"heavy = {FARM + ('torch', 'transformers')!r}\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"
