"""The image's build context holds no secret: computed by Docker's own .dockerignore rules.

There is no Docker engine on the development machines, so the context is computed the way
the engine computes it: ``docker.utils.build.exclude_paths`` from the Docker SDK for Python,
the matcher ``docker build`` uses when the SDK builds (a port of moby's patternmatcher:
patterns anchored at the context root, ``**`` across directories, ``!`` re-includes, last
match wins). ``pathspec`` was not used: it implements gitignore, where ``var/`` matches at
any depth and ``.env`` in any directory, which Docker does not. The matcher is pinned to
Docker's documented examples first, then run over a temporary copy of the checkout that an
operator has filled with secrets.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

build = pytest.importorskip("docker.utils.build", reason="docker SDK not installed (dev extra)")

ROOT = Path(__file__).resolve().parents[2]
DOCKERIGNORE = ROOT / ".dockerignore"
DOCKERFILE = "deploy/Dockerfile"

#: What an operator's checkout holds after following docs/operations.md and
#: deploy/k8s/README.md (and what `make up` leaves behind).
SECRETS = (
    "deploy/secrets/rev.key",
    "deploy/secrets/certificate.key",
    "deploy/secrets/session.key",
    ".env",
    ".env.k8s",
    "deploy/.env",
    ".rev/api-key",
    "var/secret.key",
    "var/certificate.key",
    "var/session.key",
    "certificate.key",
    "deploy/certificate.key",
    "var/rev.sqlite3",
    "deploy/nginx/certs/tls.key",
    "deploy/nginx/certs/tls.crt",
    "deploy/k8s/secret.yaml",
    "tls.key",
    "rev_tasks/server.pem",
)


def _patterns() -> list[str]:
    lines = DOCKERIGNORE.read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def _context(root: Path, patterns: list[str]) -> set[str]:
    return set(build.exclude_paths(str(root), patterns, dockerfile=DOCKERFILE))


def _tree(root: Path, files: list[str]) -> Path:
    for name in files:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    return root


@pytest.mark.parametrize(
    ("patterns", "excluded", "kept"),
    [
        # docs.docker.com, ".dockerignore file": the examples and what they are said to do
        (["*/temp*"], ["somedir/temporary.txt", "somedir/temp/x"], ["temp.txt", "a/b/temp"]),
        (["*/*/temp*"], ["somedir/subdir/temporary.txt"], ["somedir/temporary.txt"]),
        (["temp?"], ["tempa", "tempb"], ["temp", "tempab", "d/tempa"]),
        (["**/*.go"], ["a.go", "x/y/z.go"], ["a.gox"]),
        (
            ["*.md", "!README*.md", "README-secret.md"],
            ["CHANGES.md", "README-secret.md"],
            ["README.md", "README-x.md"],
        ),
        # anchoring, which gitignore semantics would get wrong
        (["var/"], ["var/a"], ["pkg/var/a"]),
        ([".env"], [".env"], ["deploy/.env"]),
        (["deploy/*", "!deploy/keep.sh"], ["deploy/x", "deploy/d/y"], ["deploy/keep.sh"]),
    ],
)
def test_matcher_follows_dockers_documented_rules(
    tmp_path: Path, patterns: list[str], excluded: list[str], kept: list[str]
) -> None:
    root = _tree(tmp_path, [*excluded, *kept])
    context = set(build.exclude_paths(str(root), patterns, dockerfile="Dockerfile"))
    assert not set(excluded) & context, set(excluded) & context
    assert set(kept) <= context, set(kept) - context


def _checkout_copy(dest: Path) -> list[str]:
    """The tracked files of this checkout, copied under dest (never the ignored ones)."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: the tracked file list is unknown")
    out = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=60
    )
    files = [f for f in out.stdout.decode().split("\0") if f and (ROOT / f).is_file()]
    for name in files:
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, dest / name)
    return files


def test_build_context_has_no_secret_and_everything_the_image_runs(tmp_path: Path) -> None:
    tracked = _checkout_copy(tmp_path)
    _tree(tmp_path, list(SECRETS))
    context = _context(tmp_path, _patterns())

    leaked = sorted(set(SECRETS) & context)
    assert not leaked, f"secrets in the build context: {leaked}"
    assert not {p for p in context if p.startswith(("deploy/secrets/", ".rev/", "var/"))}

    # What the Dockerfile copies and runs is still there (an ignore-everything file fails).
    needed = {
        "pyproject.toml", "requirements.lock", "setup.py", "alembic.ini", "celeryconfig.py",
        "deploy/entrypoint.sh", "deploy/gunicorn.conf.py", "rev_tasks/core/_popcount.c",
    }  # fmt: skip
    needed |= {f for f in tracked if f.startswith(("rev_tasks/", "web/", "migrations/"))}
    missing = sorted(needed - context)
    assert not missing, f"the image needs these: {missing}"


def test_no_dockerfile_specific_ignore_file_overrides_the_root_one() -> None:
    """BuildKit uses deploy/Dockerfile.dockerignore instead of .dockerignore when it exists;
    the classic builder reads only .dockerignore. One file keeps both builders the same."""
    assert DOCKERIGNORE.is_file()
    assert not (ROOT / "deploy" / "Dockerfile.dockerignore").exists()


@pytest.mark.parametrize(
    ("path", "ignored"),
    [
        (".env", True),
        (".env.k8s", True),
        ("deploy/.env", True),
        ("deploy/secrets/rev.key", True),
        ("deploy/nginx/certs/tls.key", True),
        (".rev/api-key", True),
        ("var/secret.key", True),
        ("deploy/k8s/secret.yaml", True),
        (".env.example", False),
        (".env.k8s.example", False),
    ],
)
def test_git_ignores_the_secret_files(path: str, ignored: bool) -> None:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    run = subprocess.run(
        ["git", "check-ignore", "--no-index", "-q", path], cwd=ROOT, capture_output=True
    )
    assert run.returncode == (0 if ignored else 1), (path, run.stderr)
