"""Endpoint fingerprints (``rev-endpoint-fingerprint/1``): a reference without its weights.

A white-box fingerprint stores hidden-state signatures, which an endpoint never shows. This
one stores, for the key's challenges 0..n-1, what the endpoint evidence needs from the
reference (rev_tasks/endpoints/evidence.py): the top-K next-token log-probabilities (ids into
the stored piece table), the smallest log-probability, log p of the empty piece, and the
text-mode normalisers; once without and once with BOS, since the endpoint decides which
applies (:func:`rev_tasks.endpoints.reference.detect_bos`). The piece table (what each id
prints as, and which ids are not text-mode classes of their own) and the probe's token ids
come along, so verification needs neither torch nor the tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rev_tasks.core.challenges import Challenge, commitment, generate_challenges
from rev_tasks.core.keys import key_id
from rev_tasks.endpoints.evidence import TEMPERATURES, TopKRow, topk_row
from rev_tasks.endpoints.reference import PROBE

__all__ = [
    "ENDPOINT_FINGERPRINT_FORMAT",
    "DEFAULT_TOP_K",
    "FingerprintError",
    "FingerprintReference",
    "make_endpoint_fingerprint",
]

ENDPOINT_FINGERPRINT_FORMAT = "rev-endpoint-fingerprint/1"
DEFAULT_TOP_K = 128
_VARIANTS = ("no_bos", "bos")


class FingerprintError(ValueError):
    """A fingerprint that cannot serve this verification (one line, for the CLI)."""


def _j(x: float) -> float | str:
    """A float for strict JSON: infinities as strings (``float()`` reads them back)."""
    return x if math.isfinite(x) else ("inf" if x > 0 else "-inf")


def _row_doc(row: TopKRow) -> dict[str, Any]:
    return {
        "ids": list(row.ids),
        "logprobs": [_j(x) for x in row.logprobs],
        "floor": _j(row.floor),
        "empty": _j(row.empty),
        "log_norm": [_j(x) for x in row.log_norm],
        "other": [_j(x) for x in row.other],
    }


def _row_from(doc: dict[str, Any]) -> TopKRow:
    return TopKRow(
        ids=tuple(int(i) for i in doc["ids"]),
        logprobs=tuple(float(x) for x in doc["logprobs"]),
        floor=float(doc["floor"]),
        empty=float(doc["empty"]),
        log_norm=tuple(float(x) for x in doc["log_norm"]),
        other=tuple(float(x) for x in doc["other"]),
    )


def make_endpoint_fingerprint(
    reference: Any, key: bytes, n: int = 64, top_k: int = DEFAULT_TOP_K
) -> dict[str, Any]:
    """The endpoint fingerprint of a :class:`~rev_tasks.endpoints.reference.Reference`."""
    if not 1 <= n <= 4096:
        raise ValueError("an endpoint fingerprint needs 1..4096 challenges")
    if not 8 <= top_k <= 4096:
        raise ValueError("top_k must be in 8..4096")
    challenges = generate_challenges(key, n)
    prompts = [c.prompt for c in challenges]
    bos = reference.tokenizer.bos_token_id
    saved = reference.add_bos
    rows: dict[str, list[dict[str, Any]]] = {}
    try:
        for variant in _VARIANTS if bos is not None else _VARIANTS[:1]:
            reference.add_bos = variant == "bos"
            full = reference.next_logprobs(prompts)
            rows[variant] = [
                _row_doc(topk_row(r, top_k, reference.piece_logprob(r, ""), reference.other_ids))
                for r in full
            ]
    finally:
        reference.add_bos = saved
    return {
        "format": ENDPOINT_FINGERPRINT_FORMAT,
        "key_id": key_id(key),
        "challenge_commitment": commitment(challenges).hex(),
        "challenges": n,
        "top_k": top_k,
        "temperatures": list(TEMPERATURES),
        "descriptor": reference.descriptor(),
        "tokenizer": {
            "bos_token_id": bos,
            "probe": PROBE,
            "probe_ids": reference.probe_ids(PROBE),
            "pieces": list(reference.pieces),
            "other_ids": list(reference.other_ids),
        },
        "rows": rows,
    }


class FingerprintReference:
    """The reference side of verify_endpoint, read from an endpoint fingerprint."""

    def __init__(
        self, doc: dict[str, Any], path: str | Path | None = None, sha256: str | None = None
    ) -> None:
        problems = check_endpoint_fingerprint(doc)
        if problems:
            raise FingerprintError(f"{path or 'fingerprint'}: {problems[0]}")
        self.doc = doc
        self.path = None if path is None else Path(path)
        self.sha256 = sha256 or hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()
        tok = doc["tokenizer"]
        self.bos_token_id: int | None = tok["bos_token_id"]
        self.pieces: list[str] = list(tok["pieces"])
        self.vocab_size = len(self.pieces)
        self.other_ids = [int(i) for i in tok["other_ids"]]
        by_piece: dict[str, list[int]] = defaultdict(list)
        for i, piece in enumerate(self.pieces):
            by_piece[piece].append(i)
        self.ids_of_piece: dict[str, list[int]] = dict(by_piece)
        other = set(self.other_ids)
        self.single_piece = {p: i for i, p in enumerate(self.pieces) if i not in other}
        self.add_bos = False
        self.max_challenges = int(doc["challenges"])
        self._rows = {v: [_row_from(r) for r in rs] for v, rs in doc["rows"].items()}

    @classmethod
    def load(cls, path: str | Path) -> FingerprintReference:
        try:
            raw = Path(path).read_bytes()
            doc = json.loads(raw)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise FingerprintError(f"cannot read the fingerprint {path}: {exc}") from exc
        return cls(doc, path, hashlib.sha256(raw).hexdigest())

    def check_key(self, key: bytes) -> None:
        """Refuse a key other than the fingerprint's: its numbers are for other prompts."""
        if key_id(key) != self.doc["key_id"]:
            raise FingerprintError(
                f"the fingerprint was made with key {self.doc['key_id']}, this verification "
                f"uses key {key_id(key)}: make the fingerprint with the same --key-file"
            )
        challenges = generate_challenges(key, self.max_challenges)
        if commitment(challenges).hex() != self.doc["challenge_commitment"]:
            raise FingerprintError(
                "the fingerprint's challenge commitment does not match this key's challenges"
            )

    def probe_ids(self, probe: str) -> list[int]:
        tok = self.doc["tokenizer"]
        if probe != tok["probe"]:
            raise FingerprintError(f"the fingerprint holds the tokenization of {tok['probe']!r}")
        return [int(i) for i in tok["probe_ids"]]

    def rows(self, challenges: Sequence[Challenge]) -> list[TopKRow]:
        variant = "bos" if self.add_bos else "no_bos"
        if variant not in self._rows:
            raise FingerprintError("the fingerprint has no rows with BOS (no BOS token)")
        out = []
        for c in challenges:
            if not 0 <= c.index < self.max_challenges:
                raise FingerprintError(
                    f"challenge {c.index} is outside the fingerprint's {self.max_challenges}"
                )
            out.append(self._rows[variant][c.index])
        return out

    def piece_logprob(self, row: TopKRow, piece: str) -> float:
        if piece != "":
            raise ValueError("a fingerprint row keeps log p only for the empty piece")
        return row.empty

    def describe(self) -> dict[str, Any]:
        return {
            "fingerprint": None if self.path is None else str(self.path),
            "fingerprint_sha256": self.sha256,
            "descriptor": self.doc["descriptor"],
            "top_k": int(self.doc["top_k"]),
            "add_bos": self.add_bos,
            "vocab_size": self.vocab_size,
        }


def check_endpoint_fingerprint(doc: Any) -> list[str]:
    """Structural problems of an endpoint fingerprint (empty when it is usable)."""
    if not isinstance(doc, dict):
        return ["not a JSON object"]
    if doc.get("format") != ENDPOINT_FINGERPRINT_FORMAT:
        return [f"format is not {ENDPOINT_FINGERPRINT_FORMAT}"]
    need = ("key_id", "challenge_commitment", "challenges", "top_k", "tokenizer", "rows")
    missing = [k for k in need if k not in doc]
    if missing:
        return [f"missing fields: {', '.join(missing)}"]
    if [float(t) for t in doc.get("temperatures", [])] != list(TEMPERATURES):
        return ["made with other text-mode temperatures than this version uses"]
    try:
        n = int(doc["challenges"])
        tok = doc["tokenizer"]
        vocab = len(tok["pieces"])
        for variant, rows in doc["rows"].items():
            if variant not in _VARIANTS or len(rows) != n:
                return [f"rows {variant!r}: expected {n} rows of a known variant"]
            for r in rows:
                row = _row_from(r)
                if not row.ids or len(row.ids) != len(row.logprobs):
                    return ["a row's ids and logprobs differ in length"]
                if any(not 0 <= i < vocab for i in row.ids):
                    return ["a row names a token outside the piece table"]
                if list(row.logprobs) != sorted(row.logprobs, reverse=True):
                    return ["a row's top-K log-probabilities are not in descending order"]
                if not row.floor <= row.ceiling:
                    return ["a row's floor lies above its K-th log-probability"]
        if "no_bos" not in doc["rows"]:
            return ["no rows without BOS"]
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        return [f"malformed fingerprint: {exc}"]
    return []
