"""Every file, module and section a doc or a comment names exists in this repository.

A page that points a reader at ``rev_tasks/app.py`` or a section that was renamed sends
them looking for something that is not there, and nothing else notices when the code moves.
This test reads the prose of the repository:

* the Markdown pages (``README.md``, ``docs/*.md``, ``bench/*.md``, ``deploy/**/*.md``);
* the comments and docstrings of every Python file (``tokenize`` and ``ast``: string
  literals in code are data, not citations, and are left alone);
* the ``#`` comments of the build and deployment files (``pyproject.toml``, ``Makefile``,
  ``deploy/`` YAML, shell and Dockerfile, ``.ci/run``);

and checks three kinds of reference there:

* a path under one of the repository's top-level folders (``rev_tasks/jobs.py``,
  ``tests/unit/``, ``deploy/k8s/*.yaml``), or a top-level file (``celeryconfig.py``), must
  exist; a partial path or a bare file name (``streaming/arch_gpt2.py``, ``test_farm.py``)
  must be the end of some path that exists;
* a dotted module reference (``rev_tasks.jobs.fail``, ``bench.determinism``) must name a
  module, and what follows the module must be defined at its top level;
* a Markdown link or citation to a section (``docs/operations.md#backups``) must name a
  heading of that page.

It also checks that no file mentions the project's private design notes, which are not
part of the repository.
"""

from __future__ import annotations

import ast
import fnmatch
import io
import os
import re
import subprocess
import tokenize
from collections.abc import Iterable, Iterator
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

#: Top-level folders whose paths a doc may cite.
TOP_DIRS = ("rev_tasks", "web", "scripts", "docs", "tests", "deploy", "bench", "migrations")
#: Top-level files a doc may cite by bare name.
TOP_FILES = (
    "celeryconfig.py",
    "pyproject.toml",
    "setup.py",
    "alembic.ini",
    "Makefile",
    "README.md",
    "requirements.lock",
    ".env.example",
    ".env.k8s.example",
    ".dockerignore",
)
#: Packages whose dotted names a doc may cite (``rev_tasks.jobs``, ``bench.determinism``).
PACKAGES = ("rev_tasks", "web", "bench", "scripts", "tests", "celeryconfig")

#: Paths that do not exist in a checkout, on purpose. Each one is written at run time or by
#: the operator, never committed: a doc that names them is describing what will be there.
GENERATED = (
    # Benchmark output (``--json`` of the bench modules, bench/run_all.py); some are committed.
    "bench/results/*",
    # The operator's copy of deploy/k8s/secret.example.yaml, holding real secrets.
    "deploy/k8s/secret.yaml",
    # Keys and TLS certificates the operator makes (docs/operations.md, "Docker Compose";
    # deploy/nginx/make-self-signed-cert.sh) in folders whose .gitignore keeps them out.
    "deploy/secrets/*",
    "deploy/nginx/certs/*",
    # The farm's run-time folders (logs, pids, keys, the stack's state, the CLI's API key).
    "var/*",
    ".rev/*",
)
#: Text that looks like a repository path and is something else.
NOT_PATHS = (
    # kubectl's ``deploy/NAME`` names a Kubernetes Deployment, not a folder of this repository.
    "deploy/rev-*",
    # Named by tests/unit/test_image_context.py as a file that must NOT exist.
    "deploy/Dockerfile.dockerignore",
)
#: File names inside a user's model folder (what transformers reads), never repository files.
MODEL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")

#: Not the project's text: version control, environments, installed packages, caches and
#: run-time output.
PRUNED = {
    ".git",
    ".venv",
    "venv",
    "node_modules",
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    "build",
    "dist",
    "var",
    ".rev",
}

_TOP = "|".join(re.escape(d) for d in TOP_DIRS)
# A path under a top-level folder, not preceded by a path character (so that a URL's or an
# absolute path's inner ``/web/`` is not taken for the repository's ``web/``).
PATH_RE = re.compile(rf"(?<![\w./$<{{-])(?:{_TOP})/[\w.*/-]*")
_FILES = "|".join(re.escape(f) for f in TOP_FILES)
TOP_FILE_RE = re.compile(rf"(?<![\w./$<{{-])(?:{_FILES})(?![\w/-])")
# A file name or partial path in backticks: ``model.py``, ``streaming/arch_*.py``.
BARE_RE = re.compile(r"``?([\w*][\w.*/-]*\.(?:py|md|sh|yaml|yml|lua|json|toml|ini|c))``?")
_PKGS = "|".join(re.escape(p) for p in PACKAGES)
DOTTED_RE = re.compile(rf"(?<![\w./$<{{-])(?:{_PKGS})(?:\.[A-Za-z_]\w*)+")
# A section citation: a link ``(docs/operations.md#backups)``, a numbered section
# ``docs/operations.md, §3`` (``§3`` alone: this page's), a titled one ``docs/streaming.md,
# "In the farm"`` (the title may run on to the next line: its start must match a heading).
ANCHOR_RE = re.compile(r"((?:[\w./-]*/)?[\w.-]+\.md)?#([\w-]+)\)")
NUMBERED_RE = re.compile(r"(?:((?:[\w./-]*/)?[\w.-]+\.md),? ?)?§ ?(\d+)")
TITLED_RE = re.compile(r"((?:[\w./-]*/)?[\w.-]+\.md),? \(?[\"“]([^\"”]+)")


# ----------------------------------------------------------------------------- the files
@cache
def repo_files() -> tuple[str, ...]:
    """Every file of the working tree that git would track (POSIX paths from the root)."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        ).stdout.decode()
        files = [f for f in out.split("\0") if f and (ROOT / f).is_file()]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout (an sdist)
        files = []
        for dirpath, dirnames, filenames in os.walk(ROOT):
            dirnames[:] = [d for d in dirnames if d not in PRUNED and not d.endswith(".egg-info")]
            rel = Path(dirpath).relative_to(ROOT)
            files += [(rel / f).as_posix() for f in filenames]
    return tuple(sorted(f for f in files if not set(Path(f).parts) & PRUNED))


@cache
def repo_dirs() -> frozenset[str]:
    dirs = set()
    for f in repo_files():
        parts = f.split("/")[:-1]
        dirs.update("/".join(parts[: i + 1]) for i in range(len(parts)))
    return frozenset(dirs)


def markdown_pages() -> list[str]:
    return [
        f
        for f in repo_files()
        if f.endswith(".md")
        and (f == "README.md" or f.split("/")[0] in ("docs", "bench", "deploy"))
    ]


def python_prose(path: str) -> Iterator[tuple[int, str]]:
    """(line, text) of each comment and docstring of a Python file."""
    source = (ROOT / path).read_text(encoding="utf-8")
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            yield tok.start[0], tok.string
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            first = node.body[0] if node.body else None
            if (
                isinstance(first, ast.Expr)
                and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)
            ):
                yield first.lineno, first.value.value


def hash_comments(path: str) -> Iterator[tuple[int, str]]:
    """(line, text) of the ``#`` comments of a YAML, TOML, shell or Make file."""
    for n, line in enumerate((ROOT / path).read_text(encoding="utf-8").splitlines(), 1):
        stripped = line.lstrip()
        if stripped.startswith("#"):
            yield n, stripped
        elif " #" in line and path.endswith((".toml", ".yml", ".yaml")):
            yield n, line[line.index(" #") :]


def config_files() -> list[str]:
    return [
        f
        for f in repo_files()
        if f in ("pyproject.toml", "Makefile", ".ci/run", "deploy/Dockerfile")
        or (f.startswith("deploy/") and f.endswith((".yml", ".yaml", ".sh", ".conf")))
        or (f.startswith("scripts/") and f.endswith(".sh"))
    ]


def prose() -> Iterator[tuple[str, int, str]]:
    """(file, line, text) of every piece of prose that may cite the repository."""
    for page in markdown_pages():
        text = (ROOT / page).read_text(encoding="utf-8")
        for n, line in enumerate(text.splitlines(), 1):
            yield page, n, line
    for path in repo_files():
        if path.endswith(".py") and path != "tests/unit/test_doc_references.py":
            for n, text in python_prose(path):
                yield path, n, text
    for path in config_files():
        for n, text in hash_comments(path):
            yield path, n, text


# ----------------------------------------------------------------------------- resolving
def _generated(path: str) -> bool:
    return any(
        fnmatch.fnmatchcase(path, g) or path == g.removesuffix("/*") for g in GENERATED + NOT_PATHS
    )


def path_exists(path: str) -> bool:
    """Whether ``path`` (a file, a folder, or a glob) names something in the repository."""
    path = path.rstrip(".,;:").rstrip("/")
    if not path or _generated(path):
        return True
    if any(c in path for c in "*?["):
        return any(fnmatch.fnmatchcase(f, path) for f in repo_files())
    return path in repo_files() or path in repo_dirs()


def suffix_exists(name: str) -> bool:
    """Whether some repository path ends with ``name`` (a bare file name or partial path)."""
    name = name.rstrip(".,;:").rstrip("/")
    pattern = name if any(c in name for c in "*?[") else None
    for f in repo_files():
        if pattern is not None:
            if fnmatch.fnmatchcase(f, pattern) or fnmatch.fnmatchcase(f, "*/" + pattern):
                return True
        elif f == name or f.endswith("/" + name):
            return True
    return _generated(name)


@cache
def _top_level_names(path: str) -> frozenset[str]:
    """Names a module defines or imports at its top level (and in ``if``/``try`` blocks)."""
    tree = ast.parse((ROOT / path).read_text(encoding="utf-8"))
    names: set[str] = set()

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names.add(node.name)
            elif isinstance(node, ast.Assign):
                for target in node.targets:
                    names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
            elif isinstance(node, ast.AnnAssign | ast.AugAssign) and isinstance(
                node.target, ast.Name
            ):
                names.add(node.target.id)
            elif isinstance(node, ast.Import | ast.ImportFrom):
                names.update((a.asname or a.name).split(".")[0] for a in node.names)
            elif isinstance(node, ast.If | ast.Try):
                visit(node.body)
                visit(node.orelse)
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)

    visit(tree.body)
    return frozenset(names)


def dotted_exists(ref: str) -> bool:
    """Whether ``rev_tasks.a.b.name`` is a module, or a name defined by one."""
    parts = ref.rstrip(".").split(".")
    for i in range(len(parts), 0, -1):
        base = "/".join(parts[:i])
        candidates = (f"{base}.py", f"{base}/__init__.py")
        module = next((m for m in candidates if m in repo_files()), None)
        if module is None and i == len(parts) and f"{base}.c" in repo_files():
            return True  # a C extension built from its source (rev_tasks/core/_popcount.c)
        if module is None:
            if base in repo_dirs():  # a namespace package (tests/, bench/ without __init__)
                return i == len(parts) or f"{base}/{parts[i]}.py" in repo_files()
            continue
        if i == len(parts):
            return True
        # What follows the module: a name it defines (attributes of that name are not checked).
        return parts[i] in _top_level_names(module)
    return False


#: Where a short dotted call (``jobs.fail(...)``, ``tasks.common.memory_budget(request)``)
#: may point. Only calls are checked: a short dotted name without one is as often a queue
#: (``inference.cpu``), a file (``model.safetensors``) or a column (``jobs.attempts``).
SOURCE_ROOTS = ("rev_tasks", "web", "bench", "scripts")
# Inside backticks: ``services.enqueue(job)``, ``repo.store_vote(...)``.
CODE_RE = re.compile(r"`+([^`]+)`+")
SHORT_RE = re.compile(r"(?<![\w./$<{-])([a-z_]\w*(?:\.[A-Za-z_]\w*)+)\(")
EXTENSIONS = {"py", "md", "json", "yaml", "yml", "toml", "sh", "lua", "txt", "c", "ini"}
EXTENSIONS |= {"html", "css", "svg", "lock", "key", "pid", "log", "conf", "example", "mako"}


@cache
def _modules_by_suffix() -> dict[str, list[str]]:
    """Each dotted suffix of each source module (``common``, ``tasks.common``) → its files."""
    table: dict[str, list[str]] = {}
    for f in repo_files():
        if f.split("/")[0] in SOURCE_ROOTS and f.endswith(".py"):
            parts = f.removesuffix(".py").removesuffix("/__init__").split("/")
            for i in range(1, len(parts)):
                table.setdefault(".".join(parts[i:]), []).append(f)
    return table


def short_dotted_exists(ref: str) -> bool | None:
    """Whether ``module.name`` resolves in a module whose path ends with ``module``.

    None when the first part names no module of the repository, or names an importable
    library (``celery.chord``, ``os.environ``): then it is not a citation of this repository.
    """
    parts = ref.split(".")
    if parts[-1] in EXTENSIONS or parts[0] in PACKAGES or _importable(parts[0]):
        return None
    table = _modules_by_suffix()
    for i in range(len(parts), 0, -1):
        files = table.get(".".join(parts[:i]))
        if not files:
            continue
        return i == len(parts) or any(parts[i] in _top_level_names(f) for f in files)
    return None


@cache
def _importable(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


@cache
def md_headings(page: str) -> tuple[str, ...]:
    """The headings of a Markdown page, lower case, without their ``#`` marks."""
    headings = []
    in_code = False
    for line in (ROOT / page).read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_code = not in_code
        if not in_code and line.startswith("#"):
            headings.append(line.lstrip("#").strip().lower())
    return tuple(headings)


def md_anchors(page: str) -> frozenset[str]:
    """GitHub's anchors of a Markdown page's headings."""
    return frozenset(re.sub(r"[^\w\- ]", "", h).replace(" ", "-") for h in md_headings(page))


def _page_of(citing: str, target: str | None) -> str | None:
    """The page a section citation in ``citing`` points at (relative links resolved)."""
    if target is None:
        return citing if citing.endswith(".md") else None
    if target in repo_files():
        return target
    joined = os.path.normpath(os.path.join(os.path.dirname(citing), target))
    return joined if joined in repo_files() else None


def problems(items: Iterable[tuple[str, int, str]] | None = None) -> list[str]:
    """One line per reference to something the repository does not have."""
    found = []
    for where, line, text in prose() if items is None else items:
        at = f"{where}:{line}"
        if "://" in text:  # URLs name other sites' paths
            text = re.sub(r"\w+://\S+", "", text)
        for m in PATH_RE.finditer(text):
            if not path_exists(m.group()):
                found.append(f"{at}: no such path {m.group().rstrip('.,;:')!r}")
        for m in TOP_FILE_RE.finditer(text):
            if not path_exists(m.group()):
                found.append(f"{at}: no such file {m.group()!r}")
        for m in BARE_RE.finditer(text):
            name = m.group(1)
            if name.split("/")[0] in TOP_DIRS or "/" not in name and name in TOP_FILES:
                continue  # checked from the root above
            if name in MODEL_FILES:
                continue
            if not suffix_exists(name):
                found.append(f"{at}: no file ends with {name!r}")
        for m in DOTTED_RE.finditer(text):
            if m.group().rsplit(".", 1)[-1] in EXTENSIONS:  # a file name: checked as a path
                continue
            if not dotted_exists(m.group()):
                found.append(f"{at}: no such module or name {m.group()!r}")
        for code in CODE_RE.finditer(text):
            for m in SHORT_RE.finditer(code.group(1)):
                if short_dotted_exists(m.group(1)) is False:
                    found.append(f"{at}: no module defines {m.group(1)!r}")
        for m in ANCHOR_RE.finditer(text):
            page = _page_of(where, m.group(1))
            if page is None:
                if m.group(1) is not None and not path_exists(m.group(1)):
                    found.append(f"{at}: no such page {m.group(1)!r}")
                continue
            if m.group(2).lower() not in md_anchors(page):
                found.append(f"{at}: {page} has no section #{m.group(2)}")
        for m in NUMBERED_RE.finditer(text):
            page = _page_of(where, m.group(1))
            if page is None and (m.group(1) is not None or where.endswith(".md")):
                found.append(f"{at}: no such page {m.group(1)!r}")
            elif page is not None and not any(
                h.startswith(m.group(2) + ".") for h in md_headings(page)
            ):
                found.append(f"{at}: {page} has no section §{m.group(2)}")
        for m in TITLED_RE.finditer(text):
            page = _page_of(where, m.group(1))
            title = m.group(2).strip().lower()
            if page is None:
                found.append(f"{at}: no such page {m.group(1)!r}")
            elif not any(
                h.startswith(title) or title.startswith(h)
                for h in md_headings(page)
                + tuple(re.sub(r"^\d+\. ", "", h) for h in md_headings(page))
            ):
                found.append(f"{at}: {page} has no section {m.group(2)!r}")
    return found


# ----------------------------------------------------------------------------- tests
def test_every_cited_file_module_and_section_exists() -> None:
    found = problems()
    assert not found, "stale references:\n" + "\n".join(found)


def test_the_check_sees_a_missing_file() -> None:
    """The checks above can fail: each kind of stale reference is reported."""
    assert path_exists("rev_tasks/jobs.py") and path_exists("deploy/k8s/*.yaml")
    assert not path_exists("rev_tasks/app.py")
    assert suffix_exists("streaming/arch_gpt2.py") and suffix_exists("arch_*.py")
    assert not suffix_exists("inference/streaming.py")
    assert dotted_exists("rev_tasks.jobs.fail") and dotted_exists("bench.determinism")
    assert not dotted_exists("rev_tasks.jobs.no_such_function")
    assert dotted_exists("celeryconfig.task_routes")
    assert not dotted_exists("celeryconfig.no_such_setting")
    assert "in-the-farm" in md_anchors("docs/streaming.md")

    stale = [
        ("docs/architecture.md", 1, "The app is `rev_tasks/app.py`; see docs/nowhere.md."),
        ("docs/architecture.md", 2, "Registered as `rev_tasks.tasks.models.fingerprint`."),
        ("docs/architecture.md", 3, "The model is `streaming.py` (see [here](#no-such-section))."),
        ("rev_tasks/jobs.py", 4, "# written by web/models.py, see [ops](../docs/api.md#nope)"),
        ("docs/performance.md", 5, "The view calls `services.enqueue(job)`, `jobs.fail(s, id)`."),
        ("README.md", 6, 'See docs/streaming.md, "In the farm" and docs/operations.md, §3.'),
        ("README.md", 7, 'Not docs/streaming.md, "In the cloud", docs/operations.md §9 or §2.'),
    ]
    found = problems(stale)
    for expected in (
        "docs/architecture.md:1: no such path 'rev_tasks/app.py'",
        "docs/architecture.md:1: no such path 'docs/nowhere.md'",
        "docs/architecture.md:2: no such module or name 'rev_tasks.tasks.models.fingerprint'",
        "docs/architecture.md:3: no file ends with 'streaming.py'",
        "docs/architecture.md:3: docs/architecture.md has no section #no-such-section",
        "rev_tasks/jobs.py:4: no such path 'web/models.py'",
        "rev_tasks/jobs.py:4: docs/api.md has no section #nope",
        "docs/performance.md:5: no module defines 'services.enqueue'",
        "README.md:7: docs/streaming.md has no section 'In the cloud'",
        "README.md:7: docs/operations.md has no section §9",
        "README.md:7: README.md has no section §2",
    ):
        assert expected in found, found
    assert len(found) == 11, found


def test_no_file_mentions_the_private_design_notes() -> None:
    """Design notes kept outside the repository are no reference for its readers."""
    needles = [("DESIGN" + ".md").encode(), ("shared" + "/" + "DESIGN").encode()]
    hits = []
    for f in repo_files():
        data = (ROOT / f).read_bytes()
        lowered = data.lower()
        hits += [f"{f}: {n.decode()}" for n in needles if n.lower() in lowered]
    assert not hits, "files mention the design notes:\n" + "\n".join(hits)
