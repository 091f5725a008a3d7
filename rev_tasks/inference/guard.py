"""Checks on a model folder before anything reads it: confinement, size, file kinds.

The coordinator runs them at submit time (a clear 422 for the user) and the worker runs
them again right before loading (the folder may have changed in between: the worker's
check is the one that protects it). They only ``lstat``/``stat`` and never open a file.

* Every entry, followed through symlinks, must resolve under one of the model roots: a
  symlink inside a root that points outside it (``model.safetensors -> /etc/shadow``, or a
  whole folder) is rejected, not followed.
* Only regular files and folders: a FIFO or device named ``model.safetensors`` would hang
  or feed the loader.
* The folder's total size is capped (``REV_MAX_MODEL_BYTES``) and so is its entry count,
  so that one request cannot make a worker read terabytes or walk millions of files.
* The small JSON files every reader parses whole (``config.json``,
  ``generation_config.json``) are capped on their own (``REV_MAX_CONFIG_BYTES``): a sparse
  1 GiB ``config.json`` fits the total but would be read into memory in one piece.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rev_tasks.boundedjson import DEFAULT_MAX_CONFIG_BYTES
from rev_tasks.inference.loader import ModelLoadError

#: Files parsed whole as JSON by the coordinator and the loaders: capped one by one.
CONFIG_FILES = frozenset({"config.json", "generation_config.json"})


class PathOutsideRoots(ModelLoadError):
    """The folder, or something it links to, lies outside the model roots."""


class ModelTooLarge(ModelLoadError):
    """The folder holds more bytes or files than this farm accepts."""


class NotRegularFile(ModelLoadError):
    """The folder holds a FIFO, socket or device file."""


def within(path: Path, roots: Sequence[Path]) -> bool:
    """``path`` (already resolved) equals or lies under one of ``roots`` (resolved)."""
    return any(path == root or path.is_relative_to(root) for root in roots)


def _name(entry: Path, top: Path) -> str:
    try:
        return str(entry.relative_to(top))
    except ValueError:
        return str(entry)


def inspect_folder(
    path: str | os.PathLike[str],
    roots: Sequence[Path] | None,
    max_bytes: int,
    max_files: int = 10_000,
    max_config_bytes: int = DEFAULT_MAX_CONFIG_BYTES,
) -> int:
    """Walk the model folder; return its total size in bytes or raise a ModelLoadError.

    ``roots=None`` skips confinement (the CLI on the user's own files); the farm always
    passes its ``REV_MODEL_ROOTS``.
    """
    folder = Path(path)
    try:
        real = folder.resolve(strict=True)
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop
        raise ModelLoadError(f"model path does not exist: {folder}") from exc
    resolved_roots = [Path(r).resolve() for r in roots] if roots is not None else None
    if resolved_roots is not None and not within(real, resolved_roots):
        raise PathOutsideRoots(f"model path {folder} resolves outside the model roots")
    if not real.is_dir():
        raise ModelLoadError(f"model path is not a folder: {folder}")

    total = 0
    count = 0
    seen: set[Path] = set()
    stack = [real]
    while stack:
        current = stack.pop()
        if current in seen:  # a symlink cycle or two links to one folder
            continue
        seen.add(current)
        try:
            entries = list(os.scandir(current))
        except OSError as exc:
            raise ModelLoadError(f"cannot list {current}: {exc.strerror}") from exc
        for entry in entries:
            count += 1
            if count > max_files:
                raise ModelTooLarge(f"model folder {folder} has more than {max_files} entries")
            entry_path = Path(entry.path)
            if entry.is_symlink():
                try:
                    target = entry_path.resolve(strict=True)
                    st = target.stat()
                except (OSError, RuntimeError) as exc:
                    raise ModelLoadError(f"broken link in the model folder: {entry_path}") from exc
                if resolved_roots is not None and not within(target, resolved_roots):
                    raise PathOutsideRoots(
                        f"{_name(entry_path, real)} in {folder} links outside the model roots"
                    )
            else:
                # Not a link, in a folder that is already resolved: the path is its own
                # resolution and lies where its folder does, so one lstat does (resolving
                # every file was most of a submit's CPU). Swapped for a link since the
                # listing, it reads as a link here and is refused below.
                target = entry_path
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError as exc:
                    raise ModelLoadError(f"cannot stat {entry_path}: {exc.strerror}") from exc
            if stat.S_ISDIR(st.st_mode):
                stack.append(target)
            elif stat.S_ISREG(st.st_mode):
                if entry.name in CONFIG_FILES and st.st_size > max_config_bytes:
                    raise ModelTooLarge(
                        f"{_name(entry_path, real)} in {folder} is larger than "
                        f"REV_MAX_CONFIG_BYTES={max_config_bytes}"
                    )
                total += st.st_size
                if total > max_bytes:
                    raise ModelTooLarge(
                        f"model folder {folder} is larger than REV_MAX_MODEL_BYTES={max_bytes}"
                    )
            else:
                raise NotRegularFile(f"{_name(entry_path, real)} in {folder} is not a regular file")
    return total


def inspect_configured(path: str | os.PathLike[str], settings: Any) -> int:
    """``inspect_folder`` under the operator's configured roots and caps.

    The coordinator (at submit) and the worker (before loading) must apply the same limits;
    ``settings`` is a ``rev_tasks.settings.Settings``.
    """
    return inspect_folder(
        path,
        settings.model_roots,
        settings.max_model_bytes,
        settings.max_model_files,
        settings.max_config_bytes,
    )
