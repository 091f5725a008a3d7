"""Keeping a prefork worker's children small (measured in bench/bench_memory.py).

The main process imports torch and transformers before the pool forks, so the children
share those pages copy-on-write. Python's cyclic garbage collector writes into every
tracked object it visits, so the first collections in a child copy most of the parent's
module pages (~90 MB of a MiniLM child's 180 MB of private memory, measured).
:func:`freeze_preloaded` moves everything alive in the parent into the collector's
permanent generation (``gc.freeze()``, as the gc module's documentation advises before
``fork()``): the children never traverse it, and the pages stay shared.

:func:`lean_imports` keeps out of the main process what transformers imports at import
time but a worker never runs: ``torch._dynamo`` (PreTrainedModel's
``@torch._dynamo.allow_in_graph``, masking_utils' ``TransformGetItemToIndex``, flex
attention's ``torch.compiler.disable``) and ``torch.distributed.tensor`` (DTensor checks),
which between them pull sympy and ~750 modules: ~70 MB of the main process's ~335 MB
(bench/bench_memory.py, the "steps" rows). Both stay importable: the first real use of
dynamo imports it and replays the registrations made while it was deferred.

The allocator: glibc's malloc keeps the heap of a forward's freed activations and
fragments it as batch shapes vary (a SmolLM2 child grew by ~60-120 MB over batches of
mixed sizes, measured in bench/bench_memory.py); jemalloc returns freed pages to the kernel
over time. :func:`allocator_env` makes the workers that run models start with jemalloc
preloaded (``REV_WORKER_ALLOCATOR``: ``auto``, the default, uses it when
``libjemalloc.so.2`` is installed; ``jemalloc`` insists; ``glibc`` keeps the C library's).

``REV_WORKER_MEMORY_TUNING=0`` turns all three off (the benchmark's "as it was").
"""

from __future__ import annotations

import contextlib
import ctypes.util
import gc
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
import types
from collections.abc import Callable, Iterator, Mapping
from typing import Any

ALLOCATORS = ("auto", "jemalloc", "glibc")
JEMALLOC = "libjemalloc.so.2"


def enabled(environ: Mapping[str, str] | None = None) -> bool:
    env = os.environ if environ is None else environ
    return env.get("REV_WORKER_MEMORY_TUNING", "1").strip() != "0"


def find_jemalloc() -> str | None:
    """The soname of an installed jemalloc (Debian: libjemalloc2), or None."""
    name = ctypes.util.find_library("jemalloc")
    return name if name == JEMALLOC else None


def allocator_env(environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` for a process that runs models: jemalloc preloaded where it applies.

    It must be in the environment before the worker's interpreter starts (``LD_PRELOAD``),
    so ``rev worker`` applies it before it execs Celery. Raises ValueError for an unknown
    ``REV_WORKER_ALLOCATOR`` or for ``jemalloc`` when the library is not installed.
    """
    env = dict(environ)
    choice = env.get("REV_WORKER_ALLOCATOR", "auto").strip().lower() or "auto"
    if choice not in ALLOCATORS:
        raise ValueError(
            f"REV_WORKER_ALLOCATOR must be one of {', '.join(ALLOCATORS)}, not {choice!r}"
        )
    if choice == "glibc" or not enabled(env):
        return env
    lib = find_jemalloc()
    if lib is None:
        if choice == "jemalloc":
            raise ValueError(
                f"REV_WORKER_ALLOCATOR=jemalloc, but {JEMALLOC} is not installed "
                "(Debian/Ubuntu: apt-get install libjemalloc2)"
            )
        return env
    preload = [p for p in env.get("LD_PRELOAD", "").replace(" ", ":").split(":") if p]
    if not any(os.path.basename(p) == lib for p in preload):
        env["LD_PRELOAD"] = ":".join([lib, *preload])
    return env


def active_allocator(pid: int | str = "self") -> str:
    """``jemalloc`` if the process has it mapped, else ``glibc`` (Linux /proc)."""
    try:
        with open(f"/proc/{pid}/maps") as maps:
            return "jemalloc" if any("libjemalloc" in line for line in maps) else "glibc"
    except OSError:
        return "unknown"


def freeze_preloaded() -> bool:
    """Collect, then freeze what is alive, so that forked children do not copy it."""
    if not enabled():
        return False
    gc.collect()
    gc.freeze()
    return True


_DYNAMO = "torch._dynamo"
_TRACE_OP = "torch._dynamo._trace_wrapped_higher_order_op"
_allowed: list[Any] = []  # functions given to allow_in_graph while dynamo was deferred


def _real_dynamo() -> types.ModuleType:
    """Import the real ``torch._dynamo`` (the deferral's stand-ins removed first)."""
    mod = sys.modules.get(_DYNAMO)
    if mod is not None and not getattr(mod, "_rev_deferred", False):
        return mod
    _remove_stand_ins()
    return importlib.import_module(_DYNAMO)


def _remove_stand_ins() -> None:
    if getattr(sys.modules.get(_DYNAMO), "_rev_deferred", False):
        del sys.modules[_DYNAMO]
    torch = sys.modules.get("torch")
    if torch is not None and getattr(torch.__dict__.get("_dynamo"), "_rev_deferred", False):
        delattr(torch, "_dynamo")


class _ReplayFinder(importlib.abc.MetaPathFinder):
    """Replays deferred ``allow_in_graph`` calls when the real dynamo is imported, and
    imports it when a submodule the stand-in does not provide is asked for."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name == _DYNAMO:
            torch = sys.modules["torch"]
            spec = importlib.machinery.PathFinder.find_spec(name, torch.__path__)
            if spec is None or spec.loader is None:
                return None
            loader, run = spec.loader, spec.loader.exec_module  # type: ignore[union-attr]

            def exec_module(module: types.ModuleType) -> None:
                if _TRACE_OP in sys.modules:  # loaded alone while the package was deferred
                    module._trace_wrapped_higher_order_op = sys.modules[_TRACE_OP]  # type: ignore[attr-defined]
                run(module)
                with contextlib.suppress(ValueError):
                    sys.meta_path.remove(self)
                for fn in _allowed:
                    module.allow_in_graph(fn)
                _allowed.clear()

            loader.exec_module = exec_module  # type: ignore[method-assign]
            return spec
        if name.startswith(_DYNAMO + ".") and getattr(
            sys.modules.get(_DYNAMO), "_rev_deferred", False
        ):
            real = _real_dynamo()
            return importlib.machinery.PathFinder.find_spec(name, real.__path__)
        return None


def _deferred_disable(fn: Any = None, recursive: bool = True, *, reason: Any = None) -> Any:
    """``torch._dynamo.disable`` applied on the first call instead of at decoration."""
    if fn is None:
        return lambda f: _deferred_disable(f, recursive, reason=reason)
    real: list[Callable[..., Any]] = []

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not real:
            real.append(_real_dynamo().disable(fn, recursive, reason=reason))
        return real[0](*args, **kwargs)

    for attr in ("__module__", "__name__", "__qualname__", "__doc__", "__wrapped__"):
        with contextlib.suppress(AttributeError):
            setattr(wrapper, attr, getattr(fn, attr) if attr != "__wrapped__" else fn)
    return wrapper


def _deferred_allow_in_graph(fn: Any) -> Any:
    dynamo = sys.modules.get(_DYNAMO)
    if dynamo is not None and not getattr(dynamo, "_rev_deferred", False):
        return dynamo.allow_in_graph(fn)
    _allowed.append(fn)
    return fn


def _trace_op_alone() -> types.ModuleType:
    """The real ``torch._dynamo._trace_wrapped_higher_order_op``, without its package.

    transformers' masks run the mode it defines (``TransformGetItemToIndex``) whenever a
    batch is padded; the module itself needs nothing of dynamo, so it is executed from its
    file under its own name and the package, imported later, finds it in ``sys.modules``.
    """
    torch = sys.modules["torch"]
    path = os.path.join(torch.__path__[0], "_dynamo", "_trace_wrapped_higher_order_op.py")
    spec = importlib.util.spec_from_file_location(_TRACE_OP, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[_TRACE_OP] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[_TRACE_OP]
        raise
    return module


def _stand_ins() -> types.ModuleType:
    dynamo = types.ModuleType(_DYNAMO, "deferred torch._dynamo (rev_tasks.ops.memory)")
    dynamo.__path__ = []  # a package: its submodules go through _ReplayFinder
    dynamo._rev_deferred = True  # type: ignore[attr-defined]
    dynamo.allow_in_graph = _deferred_allow_in_graph  # type: ignore[attr-defined]
    dynamo.disable = _deferred_disable  # type: ignore[attr-defined]

    def forward(name: str, real: Callable[[], types.ModuleType]) -> Any:
        if name.startswith("__"):  # the import system's probes (__path__, __spec__ ...)
            raise AttributeError(name)
        return getattr(real(), name)

    dynamo.__getattr__ = lambda name: forward(name, _real_dynamo)  # type: ignore[attr-defined]
    return dynamo


@contextlib.contextmanager
def lean_imports() -> Iterator[bool]:
    """Import transformers inside this block without ``torch._dynamo`` and DTensor.

    Inside, ``torch._dynamo`` is a stand-in that records ``allow_in_graph`` and defers
    ``disable`` to the decorated function's first call, and ``torch.distributed
    .is_available()`` answers False, so transformers takes the path it takes with a torch
    built without distributed support (the worker never initialises a process group). On
    exit the stand-ins are removed: the next ``import torch._dynamo`` (torch.compile, or a
    stand-in's attribute other than those two) imports the real one and replays the
    recorded registrations. Yields whether the deferral is on (``REV_WORKER_MEMORY_TUNING``).
    """
    if not enabled() or _DYNAMO in sys.modules:
        yield False
        return
    import torch
    import torch.distributed

    dynamo = _stand_ins()
    finder = _ReplayFinder()
    sys.meta_path.insert(0, finder)
    sys.modules[_DYNAMO] = dynamo
    torch._dynamo = dynamo  # type: ignore[attr-defined]
    is_available = torch.distributed.is_available
    torch.distributed.is_available = lambda: False  # type: ignore[assignment]
    try:
        _trace_op_alone()
        yield True
    finally:
        torch.distributed.is_available = is_available  # type: ignore[assignment]
        _remove_stand_ins()
        if _DYNAMO in sys.modules:  # imported for real meanwhile: nothing left to defer
            with contextlib.suppress(ValueError):
                sys.meta_path.remove(finder)
