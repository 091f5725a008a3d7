"""Secret keys and the project's single key-derivation function.

Everything secret in a verification (which challenges are asked, which random projections
compress the activations) is derived from one key with HMAC-SHA256, so that a model owner
who does not hold the key cannot predict or tailor answers, and so that anyone who does hold
it regenerates byte-identical material on any machine. Python's ``hash()``, the clock and
global RNG state never enter.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from pathlib import Path

__all__ = ["DEMO_KEY", "MIN_KEY_BYTES", "derive", "key_id", "load_key"]

#: Public, well-known key used when no key file is given. INSECURE: anyone can derive the
#: demo challenges and projections, so a model could be tuned to pass them. Demos and tests
#: only; real verifications must use a secret key file.
DEMO_KEY: bytes = hashlib.sha256(b"rev-farm demo key: not secret").digest()

#: Shortest key accepted from a file (128 bits).
MIN_KEY_BYTES = 16

_HEX_TEXT = re.compile(rb"[0-9A-Fa-f\s]+")
_WS = re.compile(rb"\s+")


def load_key(path: str | Path | None) -> bytes:
    """Read a key file: raw bytes, or hex text (64+ hex digits, whitespace ignored).

    ``None`` returns :data:`DEMO_KEY`. Raises ``ValueError`` with a one-line message for an
    empty file, odd-length hex, or a key shorter than 16 bytes; ``OSError`` propagates for
    a missing or unreadable file.
    """
    if path is None:
        return DEMO_KEY
    data = Path(path).read_bytes()
    if not data:
        raise ValueError(f"key file {str(path)!r} is empty")
    if _HEX_TEXT.fullmatch(data):
        digits = _WS.sub(b"", data)
        if len(digits) >= 64:
            if len(digits) % 2:
                raise ValueError(
                    f"key file {str(path)!r} looks like hex but has an odd number of digits"
                )
            data = bytes.fromhex(digits.decode("ascii"))
    if len(data) < MIN_KEY_BYTES:
        raise ValueError(
            f"key file {str(path)!r} holds {len(data)} bytes; a key needs at least "
            f"{MIN_KEY_BYTES} bytes (or 64+ hex digits)"
        )
    return data


def _check_key(key: bytes) -> bytes:
    if not isinstance(key, bytes | bytearray):
        raise ValueError(f"key must be bytes, got {type(key).__name__}")
    if not key:
        raise ValueError("key must not be empty")
    return bytes(key)


def key_id(key: bytes) -> str:
    """Public name of a key: hex of HMAC-SHA256(key, b"rev/key-id") truncated to 16 bytes.

    Lets transcripts and fingerprints say which key they used without revealing it.
    """
    return hmac.new(_check_key(key), b"rev/key-id", hashlib.sha256).digest()[:16].hex()


def derive(key: bytes, label: str, index: int) -> bytes:
    """HMAC-SHA256(key, label || 0x00 || index as 8-byte big-endian): the only KDF.

    The 0x00 separator keeps labels prefix-free (labels must not contain NUL), and the
    fixed-width index keeps (label, index) pairs injective.
    """
    key = _check_key(key)
    if not isinstance(label, str) or not label or "\x00" in label:
        raise ValueError("label must be a non-empty str without NUL characters")
    if isinstance(index, bool) or not isinstance(index, int):
        raise ValueError(f"index must be an int, got {type(index).__name__}")
    if not 0 <= index < 1 << 64:
        raise ValueError(f"index must be in [0, 2**64), got {index}")
    msg = label.encode("utf-8") + b"\x00" + index.to_bytes(8, "big")
    return hmac.new(key, msg, hashlib.sha256).digest()
