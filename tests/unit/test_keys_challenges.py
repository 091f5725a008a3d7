"""Keys, the KDF and the keyed challenge generator: determinism, coverage, commitment."""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest

from rev_tasks.core.challenges import (
    DOMAINS,
    FRAMES,
    NONCE_BYTES,
    TEMPLATES,
    Challenge,
    challenge_for,
    challenges_at,
    commitment,
    distinct_prompts,
    entropy_bits,
    generate_challenges,
    job_challenges,
    nonce_challenges,
    render,
)
from rev_tasks.core.keys import DEMO_KEY, derive, key_id, load_key
from rev_tasks.core.merkle import merkle_root

KEY_A = bytes(range(32))
KEY_B = hashlib.sha256(b"another key").digest()
REPO = Path(__file__).resolve().parents[2]

# ------------------------------------------------------------------------------ keys


def test_demo_key_and_key_id() -> None:
    assert hashlib.sha256(b"rev-farm demo key: not secret").digest() == DEMO_KEY
    kid = key_id(KEY_A)
    assert kid == hmac.new(KEY_A, b"rev/key-id", hashlib.sha256).digest()[:16].hex()
    assert len(kid) == 32
    assert key_id(KEY_B) != kid
    assert KEY_A.hex() not in kid


def test_derive_matches_definition() -> None:
    want = hmac.new(KEY_A, b"challenge\x00" + (5).to_bytes(8, "big"), hashlib.sha256).digest()
    assert derive(KEY_A, "challenge", 5) == want
    assert derive(KEY_A, "challenge", 5) != derive(KEY_A, "challenge", 6)
    assert derive(KEY_A, "challenge", 5) != derive(KEY_A, "projection", 5)
    assert derive(KEY_A, "challenge", 5) != derive(KEY_B, "challenge", 5)
    assert len(derive(KEY_A, "x", 2**64 - 1)) == 32


@pytest.mark.parametrize(
    "args",
    [(KEY_A, "challenge", -1), (KEY_A, "challenge", 2**64), (KEY_A, "challenge", True),
     (KEY_A, "challenge", 1.0), (KEY_A, "a\x00b", 0), (KEY_A, "", 0), (b"", "x", 0),
     ("key", "x", 0)],
)  # fmt: skip
def test_derive_validation(args: tuple) -> None:
    with pytest.raises(ValueError):
        derive(*args)


def test_load_key_variants(tmp_path: Path) -> None:
    assert load_key(None) == DEMO_KEY

    raw = bytes(range(200, 232))
    (tmp_path / "raw.key").write_bytes(raw)
    assert load_key(tmp_path / "raw.key") == raw
    assert load_key(str(tmp_path / "raw.key")) == raw

    (tmp_path / "hex.key").write_text(KEY_B.hex() + "\n")
    assert load_key(tmp_path / "hex.key") == KEY_B

    spaced = " ".join(KEY_B.hex().upper()[i : i + 8] for i in range(0, 64, 8))
    (tmp_path / "spaced.key").write_text(spaced + "\r\n")
    assert load_key(tmp_path / "spaced.key") == KEY_B

    # text that is not 64+ hex digits is a raw passphrase
    (tmp_path / "pass.key").write_text("correct horse battery staple")
    assert load_key(tmp_path / "pass.key") == b"correct horse battery staple"
    (tmp_path / "shorthex.key").write_text("ab" * 20)
    assert load_key(tmp_path / "shorthex.key") == b"ab" * 20


@pytest.mark.parametrize(
    "content,match",
    [(b"", "empty"), (b"short", "at least 16 bytes"), (b"a" * 65, "odd number"),
     (b"\x00" * 15, "at least 16 bytes")],
)  # fmt: skip
def test_load_key_errors(tmp_path: Path, content: bytes, match: str) -> None:
    p = tmp_path / "k"
    p.write_bytes(content)
    with pytest.raises(ValueError, match=match) as e:
        load_key(p)
    assert "\n" not in str(e.value)


def test_load_key_missing_file(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        load_key(tmp_path / "nope")


# ------------------------------------------------------------------------ templates


def test_template_catalogue() -> None:
    assert len(TEMPLATES) >= 24
    assert len({t.id for t in TEMPLATES}) == len(TEMPLATES)
    by_domain = {d: [t for t in TEMPLATES if t.domain == d] for d in DOMAINS}
    assert set(by_domain) == {
        "facts", "reasoning", "code", "instructions", "languages", "adversarial",
    }  # fmt: skip
    assert all(len(ts) >= 4 for ts in by_domain.values()), {d: len(t) for d, t in by_domain.items()}
    ids = {t.id for t in by_domain["languages"]}
    assert {"languages.de", "languages.fr", "languages.es"} <= ids
    scripts = {
        unicodedata.name(ch).split()[0]
        for t in by_domain["languages"]
        for ch in t.text + "".join(v for _, vs in t.slots for v in vs)
        if ch.isalpha()
    }
    assert {"CYRILLIC", "CJK"} & scripts, scripts  # at least one non-Latin script
    for t in TEMPLATES:
        assert all(len(vs) >= 3 for _, vs in t.slots), t.id
    # Bias bound claimed in the module docstring: every draw uses < 2**48 of the 2**256 range.
    assert max(len(TEMPLATES) * distinct_prompts(t) for t in TEMPLATES) < 2**48
    assert distinct_prompts(TEMPLATES[0]) == math.prod(
        len(v) for _, v in TEMPLATES[0].slots
    ) * math.prod(len(f) for f in FRAMES)


def test_render_keeps_other_braces() -> None:
    t = TEMPLATES[0]
    name = t.slots[0][0]
    assert render(t, {name: "X"}).count("X") >= 1
    from rev_tasks.core.challenges import Template

    tt = Template("x", "code", "f({a}) {not a slot} {{}}", (("a", ("1", "2", "3")),))
    assert render(tt, {"a": "2"}) == "f(2) {not a slot} {{}}"


# ----------------------------------------------------------------------- challenges


def test_canonical_bytes_exact() -> None:
    c = Challenge(1, "t.x", "facts", 'Grüße "quoted" 富士山')
    assert (
        c.canonical_bytes()
        == (
            '{"domain":"facts","index":1,"prompt":"Grüße \\"quoted\\" 富士山","template_id":"t.x"}'
        ).encode()
    )
    assert c.digest() == hashlib.sha256(c.canonical_bytes()).digest()


def test_challenge_is_the_documented_function_of_the_hmac() -> None:
    for i in (0, 1, 17, 4095):
        x = int.from_bytes(derive(KEY_A, "challenge", i), "big")
        x, t = divmod(x, len(TEMPLATES))
        tmpl = TEMPLATES[t]
        values = {}
        for name, vocab in tmpl.slots:
            x, v = divmod(x, len(vocab))
            values[name] = vocab[v]
        parts = []
        for vocab in FRAMES:
            x, f = divmod(x, len(vocab))
            parts.append(vocab[f])
        body = render(tmpl, values)
        tail = "".join(parts[1:])
        if tail and "\n" in body:
            tail = "\n\n" + tail.lstrip()
        (c,) = generate_challenges(KEY_A, 1, start=i)
        assert c == Challenge(i, tmpl.id, tmpl.domain, parts[0] + body + tail)
        assert challenge_for(KEY_A, i) == c == challenges_at(KEY_A, [i])[0]


def test_all_domains_appear_in_200() -> None:
    for key in (DEMO_KEY, KEY_A, KEY_B):
        cs = generate_challenges(key, 200)
        assert {c.domain for c in cs} == set(DOMAINS)
        assert [c.index for c in cs] == list(range(200))
        assert len({c.prompt for c in cs}) > 150  # mostly distinct prompts


def test_keys_give_different_sets() -> None:
    a, b = generate_challenges(KEY_A, 64), generate_challenges(KEY_B, 64)
    assert commitment(a) != commitment(b)
    assert sum(x.prompt != y.prompt for x, y in zip(a, b, strict=True)) > 48


def test_prefix_property() -> None:
    full = generate_challenges(KEY_A, 100)
    assert generate_challenges(KEY_A, 50) == full[:50]
    assert generate_challenges(KEY_A, 40, start=10) == full[10:50]
    assert generate_challenges(KEY_A, 0) == []


def test_commitment_is_merkle_root_of_digests() -> None:
    cs = generate_challenges(KEY_A, 20)
    assert commitment(cs) == merkle_root([c.digest() for c in cs])
    swapped = [cs[1], cs[0], *cs[2:]]
    assert commitment(swapped) != commitment(cs)
    changed = [Challenge(0, cs[0].template_id, cs[0].domain, cs[0].prompt + " "), *cs[1:]]
    assert commitment(changed) != commitment(cs)


@pytest.mark.parametrize("bad", [(-1, 0), (1, -1), (True, 0), (1.5, 0)])
def test_generate_validation(bad: tuple) -> None:
    with pytest.raises(ValueError):
        generate_challenges(KEY_A, *bad)


_CHILD = """
import json
from rev_tasks.core.challenges import commitment, generate_challenges
cs = generate_challenges(bytes(range(32)), 120)
print(json.dumps({"root": commitment(cs).hex(), "prompts": [c.prompt for c in cs],
                  "hashes": [c.digest().hex() for c in cs]}, ensure_ascii=True))
"""


def test_deterministic_across_processes_and_hash_seeds() -> None:
    cs = generate_challenges(KEY_A, 120)
    want = {
        "root": commitment(cs).hex(),
        "prompts": [c.prompt for c in cs],
        "hashes": [c.digest().hex() for c in cs],
    }
    for seed in ("0", "1", "4242"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(REPO)}
        out = subprocess.run(
            [sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, check=True
        )
        assert json.loads(out.stdout) == want, f"PYTHONHASHSEED={seed}"


def test_golden_commitment() -> None:
    # TEMPLATES and the decoding rule are part of the protocol: any change re-keys every
    # challenge set and orphans stored fingerprints. Update this value only on purpose
    # (last: the prompt frames that took the catalogue from 10 to 26 bits).
    cs = generate_challenges(DEMO_KEY, 64)
    assert (
        commitment(cs).hex() == "26a822cdcb75c43356bbcaf0e25c545b2be90c2f6ff8a8ecc1ddd900429d1c17"
    )


# ------------------------------------------------------------------ per-job challenges

NONCE_1, NONCE_2 = b"\x01" * NONCE_BYTES, hashlib.sha256(b"nonce 2").digest()


def test_nonce_challenges_are_the_documented_function_of_the_hmac() -> None:
    label = "job-challenge/" + NONCE_1.hex()
    for i in (0, 5, 63):
        x = int.from_bytes(derive(KEY_A, label, i), "big")
        assert (
            TEMPLATES[x % len(TEMPLATES)].id
            == nonce_challenges(KEY_A, NONCE_1, 1, i)[0].template_id
        )
    cs = nonce_challenges(KEY_A, NONCE_1, 64)
    assert [c.index for c in cs] == list(range(64))
    assert nonce_challenges(KEY_A, NONCE_1, 10, start=20) == cs[20:30]
    assert challenge_for(KEY_A, 17, NONCE_1) == cs[17]
    assert job_challenges(KEY_A, 64, nonce=NONCE_1) == cs


def test_two_nonces_share_no_prompt() -> None:
    """Two jobs on one pair under one key: disjoint prompts, different commitments."""
    a = nonce_challenges(KEY_A, NONCE_1, 256)
    b = nonce_challenges(KEY_A, NONCE_2, 256)
    key_seq = generate_challenges(KEY_A, 256)
    assert commitment(a[:64]) != commitment(b[:64]) != commitment(key_seq[:64])
    assert not {c.prompt for c in a} & {c.prompt for c in b}
    assert not {c.prompt for c in a} & {c.prompt for c in key_seq}
    assert len({c.prompt for c in a}) == 256  # no repeat within a job either
    assert {c.domain for c in a} == set(DOMAINS)


def test_nonce_is_checked() -> None:
    for bad in (b"", b"x" * 31, b"x" * 33, "ab" * 32):
        with pytest.raises(ValueError, match="nonce"):
            nonce_challenges(KEY_A, bad, 1)  # type: ignore[arg-type]


def test_pool_draw_is_the_key_sequence_at_those_indices() -> None:
    full = generate_challenges(KEY_A, 100)
    drawn = [57, 3, 99, 12]
    assert challenges_at(KEY_A, drawn) == [full[i] for i in drawn]
    assert job_challenges(KEY_A, 3, indices=drawn) == [full[57], full[3], full[99]]
    assert job_challenges(KEY_A, 5) == full[:5]
    with pytest.raises(ValueError):
        challenges_at(KEY_A, [-1])


def test_catalogue_entropy_is_above_twenty_bits() -> None:
    e = entropy_bits()
    assert e["shannon_bits"] > 24 and e["log2_distinct"] > 25 and e["min_template_bits"] >= 18
    assert e["log2_distinct"] == pytest.approx(
        math.log2(sum(distinct_prompts(t) for t in TEMPLATES))
    )
