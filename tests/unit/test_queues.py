"""No source file outside ``rev_tasks/queues.py`` spells a queue or task name.

A queue name typed out in a second place is a job that can wait for ever on a queue nobody
consumes once the two drift apart. The check parses every Python file (``ast``, so comments
and docstrings may still mention the names) and flags a string literal that is

* a name no ordinary word collides with (``inference.cpu``, ``inference.cudaN``, the GPU
  prefix, also as the leading text of an f-string) or a task name, anywhere;
* a comma-separated list of queue names (``"consensus,maintenance"``, a ``-Q`` value);
* one of the names that are also plain words (``default``, ``consensus``, ...) where it is
  used as a queue: a ``queue=``/``queues=``/``routing_key=`` argument, the value of a
  ``"queue"`` key, a ``Queue(...)`` argument, assigned to or compared with something named
  ``*queue*``, after ``-Q`` in an argument list, or beside an unmistakable queue name in
  one collection literal.

The same words as a job stage, a tenant or a result key are not queue names and pass.
"""

from __future__ import annotations

import ast
import itertools
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from rev_tasks import queues
from rev_tasks.queues import Task

ROOT = Path(__file__).resolve().parents[2]
#: Not the project's sources: virtual environments, build and run-time output.
PRUNED = {"build", "dist", "var", "node_modules", "__pycache__"}
EXEMPT = {ROOT / "rev_tasks" / "queues.py", Path(__file__).resolve()}

GPU_PREFIX = queues.gpu_queue(0).removesuffix("0")
#: Names that also mean something else (a stage, a tenant, a metric label, a result key).
WORDS = frozenset({queues.DEFAULT, queues.CONSENSUS, queues.MAINTENANCE, queues.ENDPOINT})
QUEUE_NAMES = frozenset({*queues.BASE_QUEUES, queues.ENDPOINT})
TASK_NAMES = frozenset(
    value for key, value in vars(Task).items() if not key.startswith("_") and isinstance(value, str)
)
QUEUE_FLAGS = {"-Q", "--queues"}


def _distinct(text: str) -> bool:
    """A queue name that means nothing else."""
    return text == queues.INFERENCE_CPU or text == GPU_PREFIX or queues.is_gpu_queue(text)


def _is_queue_list(text: str) -> bool:
    parts = [p.strip() for p in text.split(",")]
    return len(parts) > 1 and all(p in QUEUE_NAMES or queues.is_gpu_queue(p) for p in parts)


def _queueish(name: str | None) -> bool:
    return name is not None and ("queue" in name.lower() or name == "routing_key")


def _name_of(node: ast.AST) -> str | None:
    """The identifier an expression is known by: ``x``, ``a.x``, ``d["x"]``."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Subscript):
        key = node.slice
        if isinstance(key, ast.Constant) and isinstance(key.value, str):
            return key.value
    if isinstance(node, ast.Starred):
        return _name_of(node.value)
    return None


def _strings(node: ast.AST) -> Iterator[ast.Constant]:
    """String literals that ``node`` is, or holds as direct collection elements."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        yield node
    elif isinstance(node, ast.List | ast.Tuple | ast.Set):
        for elt in node.elts:
            yield from _strings(elt)


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of bare string statements (docstrings and string 'comments')."""
    return {
        id(node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Expr)
        and isinstance(node.value, ast.Constant)
        and isinstance(node.value.value, str)
    }


def offences(tree: ast.AST) -> Iterator[tuple[int, str, str]]:
    """(line, literal, why) for every queue or task name spelled in ``tree``."""
    skip = _docstrings(tree)
    skip |= {id(v) for n in ast.walk(tree) if isinstance(n, ast.JoinedStr) for v in n.values}
    used_as_queue: dict[int, str] = {}

    def mark(node: ast.AST, why: str) -> None:
        for const in _strings(node):
            if const.value in WORDS:
                used_as_queue.setdefault(id(const), why)

    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            for kw in node.keywords:
                if _queueish(kw.arg):
                    mark(kw.value, f"{kw.arg}= argument")
            if _name_of(node.func) == "Queue":
                for arg in node.args:
                    mark(arg, "Queue() argument")
        elif isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values, strict=True):
                if isinstance(key, ast.Constant) and _queueish(str(key.value)):
                    mark(value, "value of a queue key")
            keys = [k for k in node.keys if k is not None]
            if any(isinstance(k, ast.Constant) and _distinct(str(k.value)) for k in keys):
                for key in keys:
                    mark(key, "key beside a queue name")
        elif isinstance(node, ast.Assign | ast.AnnAssign | ast.AugAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if node.value is not None and any(_queueish(_name_of(t)) for t in targets):
                mark(node.value, "assigned to a queue name")
        elif isinstance(node, ast.For) and _queueish(_name_of(node.target)):
            mark(node.iter, "iterated as queues")
        elif isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if any(_queueish(_name_of(side)) for side in sides):
                for side in sides:
                    mark(side, "compared with a queue")
        elif isinstance(node, ast.arguments):
            positional = [*node.posonlyargs, *node.args]
            defaulted = positional[len(positional) - len(node.defaults) :]
            pairs = list(zip(defaulted, node.defaults, strict=True))
            pairs += [(a, d) for a, d in zip(node.kwonlyargs, node.kw_defaults, strict=True) if d]
            for arg, default in pairs:
                if _queueish(arg.arg):
                    mark(default, "default of a queue parameter")
        if isinstance(node, ast.List | ast.Tuple | ast.Set):
            elts = node.elts
            if any(isinstance(e, ast.Constant) and _distinct(str(e.value)) for e in elts):
                mark(node, "beside a queue name")
            for flag, value in itertools.pairwise(elts):
                if isinstance(flag, ast.Constant) and flag.value in QUEUE_FLAGS:
                    mark(value, f"after {flag.value}")

    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            head = node.values[0] if node.values else None
            if isinstance(head, ast.Constant) and str(head.value).startswith(GPU_PREFIX):
                yield node.lineno, f"f{head.value!r}…", "an f-string building a GPU queue name"
            continue
        if not isinstance(node, ast.Constant) or not isinstance(node.value, str):
            continue
        if id(node) in skip:
            continue
        text = node.value
        if text in TASK_NAMES:
            yield node.lineno, text, "a task name"
        elif _distinct(text):
            yield node.lineno, text, "a queue name"
        elif _is_queue_list(text):
            yield node.lineno, text, "a list of queue names"
        elif id(node) in used_as_queue:
            yield node.lineno, text, f"a queue name ({used_as_queue[id(node)]})"


def _sources() -> Iterator[Path]:
    """Every .py file of the repository (rev_tasks, web, scripts, bench, tests, ...)."""
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in PRUNED)
        for name in sorted(files):
            path = Path(folder, name)
            if name.endswith(".py") and path.resolve() not in EXEMPT:
                yield path


def test_no_source_file_outside_the_queues_module_spells_a_queue_or_task_name() -> None:
    found = []
    for path in _sources():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for line, text, why in sorted(offences(tree)):
            found.append(f"{path.relative_to(ROOT)}:{line}: {text!r} is {why}")
    assert not found, "import the name from rev_tasks.queues instead:\n" + "\n".join(found)


@pytest.mark.parametrize(
    "code",
    [
        'send(queue="inference.cpu")',
        'send(queue="consensus")',
        'sig.set(queue="maintenance")',
        'start(queues="consensus,maintenance")',
        'Queue("default")',
        'route = {"queue": "default"}',
        'CONSENSUS_QUEUES = ("consensus", "default")',
        'required_queues: tuple[str, ...] = ("consensus",)',
        'assert doc["queue"] == "consensus"',
        'cmd = ["celery", "worker", "-Q", "maintenance"]',
        'names = {"default", "inference.cpu"}',
        'counts = {"inference.cpu": 2, "consensus": 1}',
        'for queue in ("default",): pass',
        'def f(queue="default"): pass',
        'name = f"inference.cuda{i}"',
        'live = q.startswith("inference.cuda")',
        'app.send_task("rev_tasks.tasks.verify.prepare")',
    ],
)
def test_the_check_catches_a_spelled_queue_or_task_name(code: str) -> None:
    assert list(offences(ast.parse(code))), code


@pytest.mark.parametrize(
    "code",
    [
        '"""Runs on inference.cpu, then consensus."""',
        'job.stage = "consensus"',
        'tenant = "default"',
        'votes = doc["result"]["consensus"]',
        'labels = ["endpoint", "method", "status"]',
        'rope = cfg.get("type", "default")',
        'msg = f"only inference.cuda0..{n} are declared"',
        "send(queue=queues.CONSENSUS)",
    ],
)
def test_the_check_leaves_other_uses_of_the_same_words_alone(code: str) -> None:
    assert not list(offences(ast.parse(code))), code
