"""rev_tasks.boundedjson: depth and size bounds measured without recursion, typed refusals."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from rev_tasks import boundedjson
from rev_tasks.boundedjson import JSONLimitError


def _reference_depth(text: str) -> int:
    """Bracket balance char by char, outside strings (the slow, obvious way)."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def test_depth_of_real_documents() -> None:
    assert boundedjson.nesting_depth("1") == 0
    assert boundedjson.nesting_depth('{"a": [1, {"b": "[[[[ {{"}], "c": "\\"]]"}') == 3
    doc = {"kind": "verify", "candidate": {"path": "/m"}, "x": [[1], [2, [3]]]}
    assert boundedjson.nesting_depth(json.dumps(doc)) == 4


def test_depth_matches_a_char_by_char_count_across_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(boundedjson, "_CHUNK", 7)  # many chunk boundaries in short inputs
    rng = random.Random(13)
    # closed strings only (an unclosed one is malformed JSON, and json.loads says so)
    tokens = ["[", "]", "{", "}", "a", ",", '"[{"', '"\\"]"', '"\\\\"', '""']
    for _ in range(3000):
        doc = "".join(rng.choice(tokens) for _ in range(rng.randint(0, 80)))
        want = _reference_depth(doc)
        if want > 10:
            with pytest.raises(JSONLimitError):
                boundedjson.nesting_depth(doc, max_depth=10)
        else:
            assert boundedjson.nesting_depth(doc, max_depth=10) == want, doc


def test_deep_document_is_a_limit_error_not_recursion() -> None:
    deep = "[" * 200_000 + "]" * 200_000
    with pytest.raises(JSONLimitError, match="deeper than 64"):
        boundedjson.loads(deep)
    assert isinstance(JSONLimitError("x"), ValueError)  # callers' ValueError paths catch it
    assert boundedjson.loads("[" * 64 + "]" * 64) is not None


def test_size_cap_on_text_and_files(tmp_path: Path) -> None:
    with pytest.raises(JSONLimitError, match="larger than 10 bytes"):
        boundedjson.loads(b'{"a": "0123456789"}', max_bytes=10)
    small = tmp_path / "config.json"
    small.write_text('{"model_type": "gpt2"}')
    assert boundedjson.load_file(small) == {"model_type": "gpt2"}
    sparse = tmp_path / "big" / "config.json"
    sparse.parent.mkdir()
    with open(sparse, "wb") as fh:  # 1 GiB apparent size, no blocks: read must stop early
        fh.truncate(1 << 30)
    with pytest.raises(JSONLimitError, match="larger than"):
        boundedjson.load_file(sparse, max_bytes=4096)
    with pytest.raises(ValueError):
        boundedjson.loads(b"\xff\xfe")  # bad UTF-8 is a ValueError too
