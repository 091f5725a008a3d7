"""RFC 6962 Merkle tree: roots, inclusion proofs, verification and tampering."""

from __future__ import annotations

import hashlib

import pytest

from rev_tasks.core.merkle import (
    all_inclusion_proofs,
    inclusion_proof,
    leaf_hash,
    merkle_root,
    node_hash,
    verify_inclusion,
)


def _h(b: bytes) -> bytes:
    return hashlib.sha256(b).digest()


# Reference leaves and tree heads from RFC 6962's certificate-transparency test suite
# (merkle_tree_test.cc); the same vectors appear in many independent implementations.
CT_LEAVES = [
    b"",
    b"\x00",
    b"\x10",
    b"\x20\x21",
    b"\x30\x31",
    b"\x40\x41\x42\x43",
    bytes(range(0x50, 0x58)),
    bytes(range(0x60, 0x70)),
]
CT_ROOTS = [
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]


def test_hashes_are_domain_separated() -> None:
    assert leaf_hash(b"x") == _h(b"\x00x")
    assert node_hash(b"L" * 32, b"R" * 32) == _h(b"\x01" + b"L" * 32 + b"R" * 32)


def test_small_tree_by_hand() -> None:
    # Three leaves split at k=2: root = H(1 || H(1 || L(a) || L(b)) || L(c)).
    la, lb, lc = _h(b"\x00a"), _h(b"\x00b"), _h(b"\x00c")
    ab = _h(b"\x01" + la + lb)
    root = _h(b"\x01" + ab + lc)
    assert merkle_root([b"a", b"b", b"c"]) == root
    assert inclusion_proof([b"a", b"b", b"c"], 0) == [lb, lc]
    assert inclusion_proof([b"a", b"b", b"c"], 2) == [ab]
    # Five leaves split at k=4 (largest power of two below 5), not at 3.
    leaves = [b"a", b"b", b"c", b"d", b"e"]
    cd = _h(b"\x01" + lc + _h(b"\x00d"))
    left4 = _h(b"\x01" + ab + cd)
    assert merkle_root(leaves) == _h(b"\x01" + left4 + _h(b"\x00e"))


def test_empty_and_single() -> None:
    assert merkle_root([]) == _h(b"")
    assert merkle_root([b"only"]) == _h(b"\x00only")
    assert inclusion_proof([b"only"], 0) == []
    assert verify_inclusion(b"only", 0, 1, [], _h(b"\x00only"))


@pytest.mark.parametrize("n", range(0, 9))
def test_rfc6962_reference_roots(n: int) -> None:
    assert merkle_root(CT_LEAVES[:n]).hex() == CT_ROOTS[n]


def test_rfc6962_reference_inclusion_proof() -> None:
    proof = inclusion_proof(CT_LEAVES, 0)
    assert [p.hex() for p in proof] == [
        "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
    ]


@pytest.mark.parametrize("n", range(1, 34))
def test_every_index_proves_and_tampering_fails(n: int) -> None:
    leaves = [f"leaf-{i}".encode() for i in range(n)]
    root = merkle_root(leaves)
    all_root, all_proofs = all_inclusion_proofs(leaves)
    assert all_root == root
    for i in range(n):
        proof = inclusion_proof(leaves, i)
        assert proof == all_proofs[i]
        assert verify_inclusion(leaves[i], i, n, proof, root)
        # tampered leaf data
        assert not verify_inclusion(leaves[i] + b"!", i, n, proof, root)
        # tampered proof element (every position)
        for j in range(len(proof)):
            bad = list(proof)
            bad[j] = bytes([bad[j][0] ^ 1]) + bad[j][1:]
            assert not verify_inclusion(leaves[i], i, n, bad, root)
        # wrong index
        for other in (i - 1, i + 1):
            if 0 <= other < n:
                assert not verify_inclusion(leaves[i], other, n, proof, root)
        assert not verify_inclusion(leaves[i], n, n, proof, root)
        # a claimed size beyond the index's subtree changes the path shape
        if n > 1 and i == n - 1:
            assert not verify_inclusion(leaves[i], i, 2 * n, proof, root)
        # truncated / extended proof, wrong root
        if proof:
            assert not verify_inclusion(leaves[i], i, n, proof[:-1], root)
        assert not verify_inclusion(leaves[i], i, n, [*proof, root], root)
        assert not verify_inclusion(leaves[i], i, n, proof, _h(b"other"))


def test_wrong_size_cases() -> None:
    # RFC 9162 verification binds the size only through the path shape: a proof for the
    # leftmost leaf of a 3-tree also "verifies" as size 4 (the verifier cannot tell a leaf
    # hash from a node hash). Transcripts therefore recompute the root from all records.
    leaves = [b"a", b"b", b"c", b"d", b"e"]
    root = merkle_root(leaves)
    assert not verify_inclusion(b"e", 4, 8, inclusion_proof(leaves, 4), root)
    assert not verify_inclusion(b"e", 4, 6, inclusion_proof(leaves, 4), root)
    three = [b"a", b"b", b"c"]
    assert not verify_inclusion(b"c", 2, 4, inclusion_proof(three, 2), merkle_root(three))


def test_verify_never_raises_on_garbage() -> None:
    root = merkle_root([b"a", b"b"])
    proof = inclusion_proof([b"a", b"b"], 0)
    assert not verify_inclusion(b"a", -1, 2, proof, root)
    assert not verify_inclusion(b"a", 0, 0, proof, root)
    assert not verify_inclusion(b"a", True, 2, proof, root)  # type: ignore[arg-type]
    assert not verify_inclusion(b"a", 0, 2, ["zz"], root)  # type: ignore[list-item]
    assert not verify_inclusion(b"a", 0, 2, [b"short"], root)
    assert not verify_inclusion(b"a", "0", 2, proof, root)  # type: ignore[arg-type]


def test_inclusion_proof_index_out_of_range() -> None:
    with pytest.raises(ValueError, match="out of range"):
        inclusion_proof([b"a"], 1)
    with pytest.raises(ValueError, match="out of range"):
        inclusion_proof([], 0)
