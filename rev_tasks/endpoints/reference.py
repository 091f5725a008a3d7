"""The reference side of a black-box verification: next-token distributions from local weights.

An endpoint reports tokens as *text pieces* (``{"Paris": -0.1, ...}``), so the reference maps
every vocabulary id to the text piece a llama.cpp-style server prints for it (the token's
bytes decoded as UTF-8 with undecodable bytes dropped). Pieces shared by several ids (partial
UTF-8 byte tokens all print as ``""``) are ambiguous: logprobs mode ignores them, text mode sums
their probabilities (the probability of the printed text is exact either way).

Tokenization parity matters more than any serving difference: a BOS token the server does not
add moves the distribution by more than a 4-bit quantisation. The prompt is therefore
tokenized without special tokens unless the endpoint is seen to add BOS (its tokenizer route,
when it has one, is compared with ours: :func:`detect_bos`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["PROBE", "Reference", "detect_bos"]

#: The prompt whose tokenization is compared with the endpoint's (BOS or not).
PROBE = "The capital of France is"


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted (printable unicode char -> byte)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


class Reference:
    """A causal LM folder in fp32 torch, answering "what would the model say next"."""

    def __init__(self, folder: str | Path, *, threads: int | None = None) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if threads:
            torch.set_num_threads(threads)
        self.path = Path(folder)
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.model = AutoModelForCausalLM.from_pretrained(self.path, dtype=torch.float32)
        self.model.eval()
        self.add_bos = False
        self.max_challenges: int | None = None  # any challenge index (a fingerprint has n)
        self.bos_token_id: int | None = self.tokenizer.bos_token_id
        self.vocab_size = int(self.model.config.vocab_size)
        self.eos_ids = self._eos_ids()
        self.pieces = self._pieces()
        by_piece: dict[str, list[int]] = defaultdict(list)
        for i, piece in enumerate(self.pieces):
            by_piece[piece].append(i)
        self.ids_of_piece: dict[str, list[int]] = dict(by_piece)
        # Text mode's observation classes: a piece printed by exactly one token whose bytes
        # are complete UTF-8 is its own class; everything else (control tokens, partial
        # UTF-8 bytes that a server prints as "" or completes with later tokens, shared
        # pieces) is one class, OTHER.
        self.single_piece: dict[str, int] = {
            piece: ids[0]
            for piece, ids in self.ids_of_piece.items()
            if len(ids) == 1 and piece and self._complete[ids[0]]
        }
        single = set(self.single_piece.values())
        self.other_ids = [i for i in range(self.vocab_size) if i not in single]

    def _eos_ids(self) -> set[int]:
        ids = {self.tokenizer.eos_token_id}
        gen = getattr(self.model, "generation_config", None)
        extra = getattr(gen, "eos_token_id", None)
        if isinstance(extra, int):
            ids.add(extra)
        elif isinstance(extra, list):
            ids.update(extra)
        return {i for i in ids if isinstance(i, int)}

    def _pieces(self) -> list[str]:
        decoder = _byte_decoder()
        special = set(self.tokenizer.all_special_ids)
        pieces: list[str] = []
        self._complete: list[bool] = []
        tokens = self.tokenizer.convert_ids_to_tokens(list(range(self.vocab_size)))
        for i, tok in enumerate(tokens):
            if tok is None or i in special or i in self.eos_ids:
                # Control tokens print as nothing on a completion.
                pieces.append("")
                self._complete.append(False)
                continue
            if all(ch in decoder for ch in tok):
                raw = bytes(decoder[ch] for ch in tok)
                pieces.append(raw.decode("utf-8", errors="ignore"))
                try:
                    raw.decode("utf-8")
                    self._complete.append(True)
                except UnicodeDecodeError:
                    self._complete.append(False)
            else:
                pieces.append(self.tokenizer.convert_tokens_to_string([tok]))
                self._complete.append(True)
        return pieces

    def prompt_ids(self, prompt: str) -> list[int]:
        ids = list(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        bos = self.tokenizer.bos_token_id
        if self.add_bos and bos is not None:
            ids = [bos] + ids
        return ids

    def probe_ids(self, probe: str) -> list[int]:
        """The probe's ids without special tokens (compared with the endpoint's)."""
        return list(self.tokenizer(probe, add_special_tokens=False)["input_ids"])

    def rows(self, challenges: Sequence[Any]) -> np.ndarray:
        """The full next-token rows of these challenges (see :meth:`next_logprobs`)."""
        return self.next_logprobs([c.prompt for c in challenges])

    def descriptor(self) -> dict[str, Any]:
        """What the reference is, for an endpoint fingerprint: config facts and file hashes."""
        import hashlib

        cfg = self.model.config
        files = {}
        for f in sorted(self.path.glob("*.safetensors")) + sorted(self.path.glob("*.bin")):
            h = hashlib.sha256()
            with f.open("rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
            files[f.name] = h.hexdigest()
        return {
            "name": self.path.name,
            "architecture": (getattr(cfg, "architectures", None) or [type(self.model).__name__])[0],
            "num_layers": getattr(cfg, "num_hidden_layers", None),
            "hidden_size": getattr(cfg, "hidden_size", None),
            "vocab_size": self.vocab_size,
            "weights_sha256": files,
        }

    def next_logprobs(self, prompts: Sequence[str]) -> np.ndarray:
        """log p(next token | prompt) for each prompt: shape (len(prompts), vocab), float64."""
        import torch

        out = np.empty((len(prompts), self.vocab_size), dtype=np.float64)
        with torch.inference_mode():
            for row, prompt in enumerate(prompts):
                ids = torch.tensor([self.prompt_ids(prompt)])
                logits = self.model(input_ids=ids).logits[0, -1].double()
                out[row] = torch.log_softmax(logits, dim=-1).numpy()[: self.vocab_size]
        return out

    def piece_logprob(self, logprobs: np.ndarray, piece: str) -> float:
        """log of the total probability of the ids that print as ``piece`` (-inf if none)."""
        ids = self.ids_of_piece.get(piece)
        if not ids:
            return float("-inf")
        return float(np.logaddexp.reduce(logprobs[ids]))

    def describe(self) -> dict[str, Any]:
        return {"path": str(self.path), "add_bos": self.add_bos, "vocab_size": self.vocab_size}


def detect_bos(reference: Any, server_tokens: list[int] | None, probe: str) -> str:
    """Set ``reference.add_bos`` from the server's tokenization of ``probe``; say what was seen."""
    ours = reference.probe_ids(probe)
    bos = reference.bos_token_id
    if server_tokens is None:
        reference.add_bos = False
        return "endpoint has no tokenizer route; prompts are tokenized without BOS"
    if server_tokens == ours:
        reference.add_bos = False
        return "tokenization parity checked on the endpoint: no BOS"
    if bos is not None and server_tokens == [bos] + ours:
        reference.add_bos = True
        return "tokenization parity checked on the endpoint: BOS added"
    reference.add_bos = False
    return "the endpoint tokenizes differently from the reference (another tokenizer?)"
