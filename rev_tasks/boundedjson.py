"""JSON parsing with bounds on size and nesting, for documents an attacker may have written.

``json.loads`` recurses once per nesting level: a 200,000-deep ``[[[…]]]`` raises
``RecursionError`` (a 500 where it escapes a view), and reading a file with
``read_text()`` trusts its size (a sparse 1 GiB ``config.json`` took a worker to 2.2 GB).
Here the depth is measured first, without recursion, and files are read through a size
cap; every refusal is a :class:`JSONLimitError`, a ``ValueError``, so callers that already
turn malformed JSON into a 4xx refuse these the same way.

The depth check removes string literals (one regex), keeps only the brackets and takes the
running bracket balance with C-level iterators, a chunk at a time: linear in the size
(about 0.1 s per MiB of nothing but brackets on a loaded 2-core VM, milliseconds for a
real document) and a deep document is refused within its first chunk.
"""

from __future__ import annotations

import json
import operator
import os
import re
from collections.abc import Callable
from itertools import accumulate, count
from pathlib import Path
from typing import Any

#: Deeper than any request body or model config the farm reads (real configs: < 10).
DEFAULT_MAX_DEPTH = 64
#: A model's config.json, generation_config.json: real ones are a few KiB to a few hundred.
DEFAULT_MAX_CONFIG_BYTES = 4 << 20

_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_STEP = bytes.maketrans(b"[{]}", b"\x02\x02\x00\x00")
_CHUNK = 1 << 14


class JSONLimitError(ValueError):
    """The document is larger or deeper than the caller allows."""


def nesting_depth(text: str, max_depth: int = DEFAULT_MAX_DEPTH) -> int:
    """How deeply ``text`` nests arrays and objects; :class:`JSONLimitError` past ``max_depth``.

    Mismatched brackets (malformed JSON) are counted as they come: the parser that runs
    next reports them in its own words.
    """
    steps = _NOT_BRACKET.sub("", _STRING.sub("", text)).encode("ascii").translate(_STEP)
    deepest, level = 0, 0
    for start in range(0, len(steps), _CHUNK):  # chunks: a deep document stops early
        chunk = steps[start : start + _CHUNK]
        # running depth after each bracket = 2 * openers - brackets so far (openers map to 2)
        sums = list(accumulate(chunk, initial=level + start))[1:]
        peak = max(map(operator.sub, sums, count(start + 1)))
        deepest = max(deepest, peak)
        if deepest > max_depth:
            raise JSONLimitError(f"nested deeper than {max_depth} levels")
        level = sums[-1] - (start + len(chunk))
    return deepest


def loads(
    data: str | bytes | bytearray,
    *,
    max_depth: int = DEFAULT_MAX_DEPTH,
    max_bytes: int | None = None,
    object_pairs_hook: Callable[[list[tuple[str, Any]]], Any] | None = None,
    parse_constant: Callable[[str], Any] | None = None,
) -> Any:
    """``json.loads`` after the size and depth checks (both raise :class:`JSONLimitError`)."""
    if max_bytes is not None and len(data) > max_bytes:
        raise JSONLimitError(f"larger than {max_bytes} bytes")
    text = data.decode("utf-8") if isinstance(data, bytes | bytearray) else data
    nesting_depth(text, max_depth)
    try:
        return json.loads(text, object_pairs_hook=object_pairs_hook, parse_constant=parse_constant)
    except RecursionError as exc:  # belt and braces: the depth check should have caught it
        raise JSONLimitError("nested too deeply") from exc


def read_capped(path: str | os.PathLike[str], max_bytes: int) -> bytes:
    """The file's bytes, refusing (:class:`JSONLimitError`) one larger than ``max_bytes``.

    Reads at most ``max_bytes + 1`` bytes whatever the file claims, so a file that grows,
    or a FIFO, cannot make it read more.
    """
    with open(path, "rb") as fh:
        data = fh.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise JSONLimitError(f"{Path(path).name} is larger than {max_bytes} bytes")
    return data


def load_file(
    path: str | os.PathLike[str],
    *,
    max_bytes: int = DEFAULT_MAX_CONFIG_BYTES,
    max_depth: int = DEFAULT_MAX_DEPTH,
) -> Any:
    """A JSON file read through :func:`read_capped` and parsed by :func:`loads`."""
    return loads(read_capped(path, max_bytes), max_depth=max_depth)
