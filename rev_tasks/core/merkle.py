"""RFC 6962 Merkle tree hash, inclusion proofs and their verification (RFC 9162 §2.1.3).

Leaves and interior nodes are domain-separated (0x00 / 0x01 prefixes) so a leaf can never
be passed off as a node, and the tree splits at the largest power of two below n so that
proofs are short and the shape is fixed by the size alone. Used to commit the challenge set
before any model sees it and to commit every signature in a transcript.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

__all__ = [
    "all_inclusion_proofs",
    "inclusion_proof",
    "leaf_hash",
    "merkle_root",
    "node_hash",
    "verify_inclusion",
]

_EMPTY_ROOT = hashlib.sha256(b"").digest()


def leaf_hash(data: bytes) -> bytes:
    """sha256(0x00 || data)."""
    return hashlib.sha256(b"\x00" + bytes(data)).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """sha256(0x01 || left || right)."""
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """Largest power of two strictly below n (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


def _root_of_hashes(hashes: Sequence[bytes], lo: int, hi: int) -> bytes:
    n = hi - lo
    if n == 1:
        return hashes[lo]
    k = _split(n)
    return node_hash(_root_of_hashes(hashes, lo, lo + k), _root_of_hashes(hashes, lo + k, hi))


def merkle_root(leaves: Sequence[bytes]) -> bytes:
    """Merkle tree hash MTH(D[n]) of raw leaf data; the empty tree is sha256(b"")."""
    if len(leaves) == 0:
        return _EMPTY_ROOT
    hashes = [leaf_hash(d) for d in leaves]
    return _root_of_hashes(hashes, 0, len(hashes))


def inclusion_proof(leaves: Sequence[bytes], index: int) -> list[bytes]:
    """Audit path PATH(index, D[n]) for leaf ``index``: sibling hashes, deepest first."""
    n = len(leaves)
    if not 0 <= index < n:
        raise ValueError(f"leaf index {index} out of range for a tree of {n} leaves")
    hashes = [leaf_hash(d) for d in leaves]
    path: list[bytes] = []
    lo, hi, m = 0, n, index
    # Walk from the root down, collecting the sibling subtree at each split, then reverse.
    while hi - lo > 1:
        k = _split(hi - lo)
        if m < k:
            path.append(_root_of_hashes(hashes, lo + k, hi))
            hi = lo + k
        else:
            path.append(_root_of_hashes(hashes, lo, lo + k))
            lo, m = lo + k, m - k
    path.reverse()
    return path


def all_inclusion_proofs(leaves: Sequence[bytes]) -> tuple[bytes, list[list[bytes]]]:
    """Root and the inclusion proof of every leaf, in O(n log n) hashes.

    Equivalent to ``[inclusion_proof(leaves, i) for i in range(n)]`` (which is O(n^2)).
    """
    n = len(leaves)
    if n == 0:
        return _EMPTY_ROOT, []
    hashes = [leaf_hash(d) for d in leaves]
    paths: list[list[bytes]] = [[] for _ in range(n)]

    def build(lo: int, hi: int) -> bytes:
        if hi - lo == 1:
            return hashes[lo]
        k = _split(hi - lo)
        left = build(lo, lo + k)
        right = build(lo + k, hi)
        for i in range(lo, lo + k):
            paths[i].append(right)
        for i in range(lo + k, hi):
            paths[i].append(left)
        return node_hash(left, right)

    # Recursion appends siblings bottom-up (children finish before parents), which is
    # exactly the RFC order: deepest sibling first.
    root = build(0, n)
    return root, paths


def verify_inclusion(
    data: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes
) -> bool:
    """True iff ``proof`` shows leaf ``data`` at ``index`` in the tree of ``size`` with ``root``.

    RFC 9162 §2.1.3.2. Never raises on malformed input; returns False instead.
    """
    try:
        if isinstance(index, bool) or isinstance(size, bool):
            return False
        if not (isinstance(index, int) and isinstance(size, int)) or not 0 <= index < size:
            return False
        fn, sn = index, size - 1
        r = leaf_hash(data)
        for p in proof:
            if not isinstance(p, bytes | bytearray) or len(p) != 32:
                return False
            if sn == 0:
                return False
            if fn & 1 or fn == sn:
                r = node_hash(bytes(p), r)
                if not fn & 1:
                    while fn and not fn & 1:
                        fn >>= 1
                        sn >>= 1
            else:
                r = node_hash(r, bytes(p))
            fn >>= 1
            sn >>= 1
        return sn == 0 and r == root
    except (TypeError, ValueError):
        return False
