"""Tokenising challenge batches exactly as the in-memory loader does, without transformers.

A streamed run must not import transformers (the package docstring says why), so for the
tokenizer classes it knows (BERT, GPT-2 and plain fast tokenizers) :class:`StreamTokenizer`
configures the ``tokenizers`` library on ``tokenizer.json`` the way transformers' fast
tokenizer configures it. Any other folder falls back to the loader's own tokenizer setup
(:func:`~rev_tasks.inference.loader.load_tokenizer`: correct, with the higher memory floor).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rev_tasks.inference.loader import MAX_TOKENS, ModelLoadError, load_tokenizer, tokenize_batch
from rev_tasks.inference.streaming.arch_common import TokenBatch

_SPECIAL_KEYS = ("unk_token", "bos_token", "eos_token", "pad_token", "cls_token", "sep_token")
_SPECIAL_KEYS_ALL = (*_SPECIAL_KEYS, "mask_token")
_CLASS_DEFAULTS: dict[str, dict[str, Any]] = {
    "PreTrainedTokenizer": {"model_input_names": ["input_ids", "token_type_ids", "attention_mask"]},
    "BertTokenizer": {
        "unk_token": "[UNK]",
        "sep_token": "[SEP]",
        "pad_token": "[PAD]",
        "cls_token": "[CLS]",
        "mask_token": "[MASK]",
        "model_input_names": ["input_ids", "token_type_ids", "attention_mask"],
    },
    "GPT2Tokenizer": {
        "unk_token": "<|endoftext|>",
        "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>",
        "model_input_names": ["input_ids", "attention_mask"],
    },
}
_MODEL_TYPE_TOKENIZER = {"bert": "BertTokenizer", "gpt2": "GPT2Tokenizer"}


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _added_key(entry: Mapping[str, Any]) -> tuple[Any, ...]:
    return tuple(
        entry.get(k, d)
        for k, d in (
            ("content", None),
            ("single_word", False),
            ("lstrip", False),
            ("rstrip", False),
            ("normalized", True),
            ("special", False),
        )
    )


class _FastPathRefused(Exception):
    """This tokenizer needs transformers' own initialisation to tokenise identically."""


@dataclass
class StreamTokenizer:
    """Tokenises challenge batches exactly as ``LoadedModel.tokenize`` does.

    ``backend`` is ``"tokenizers"`` (``tokenizer.json`` through the Rust library; no transformers
    import) or ``"transformers"`` (fallback for tokenizers whose transformers class rewrites the
    backend in ways not reproduced here; ``reason`` says why).
    """

    backend: str
    reason: str = ""
    _tok: Any = field(default=None, repr=False)
    _return_types: bool = False

    @classmethod
    def load(cls, folder: Path, model_type: str) -> StreamTokenizer:
        try:
            return cls._fast(folder, model_type)
        except _FastPathRefused as why:
            return cls._transformers(folder, str(why))

    @classmethod
    def _fast(cls, folder: Path, model_type: str) -> StreamTokenizer:
        from tokenizers import Tokenizer, pre_tokenizers

        tj_path = folder / "tokenizer.json"
        if not tj_path.is_file():
            raise _FastPathRefused("no tokenizer.json")
        if (folder / "added_tokens.json").is_file():
            raise _FastPathRefused("legacy added_tokens.json")
        cfg_path = folder / "tokenizer_config.json"
        try:
            cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
            tj = json.loads(tj_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot read the tokenizer in {folder}: {exc}") from exc
        klass = cfg.get("tokenizer_class") or _MODEL_TYPE_TOKENIZER.get(model_type)
        klass = (klass or "").removesuffix("Fast")
        if klass not in _CLASS_DEFAULTS:
            raise _FastPathRefused(f"tokenizer class {klass or 'unknown'}")
        if cfg.get("split_special_tokens") or cfg.get("from_slow") or cfg.get("add_bos_token"):
            raise _FastPathRefused("tokenizer options that rewrite the backend")
        # Which special tokens transformers ends up with (tokenizer_config wins; the legacy
        # special_tokens_map.json overrides it only when there is no added_tokens_decoder).
        values: dict[str, Any] = {
            k: v for k, v in _CLASS_DEFAULTS[klass].items() if k != "model_input_names"
        }
        values.update({k: cfg[k] for k in _SPECIAL_KEYS_ALL if k in cfg})
        stm_path = folder / "special_tokens_map.json"
        if "added_tokens_decoder" not in cfg and stm_path.is_file():
            stm = json.loads(stm_path.read_text(encoding="utf-8"))
            values.update({k: stm[k] for k in _SPECIAL_KEYS_ALL if k in stm})
            if stm.get("additional_special_tokens"):
                raise _FastPathRefused("additional special tokens")
        if cfg.get("additional_special_tokens"):
            raise _FastPathRefused("additional special tokens")
        added = {int(t["id"]): t for t in tj.get("added_tokens", [])}
        added_contents = {t.get("content") for t in added.values()}
        for idx, entry in (cfg.get("added_tokens_decoder") or {}).items():
            have = added.get(int(idx))
            if have is None or _added_key(have) != _added_key(entry):
                raise _FastPathRefused("added_tokens_decoder differs from tokenizer.json")
        specials = {k: _token_text(v) for k, v in values.items()}
        for key, text in specials.items():
            if text is not None and text not in added_contents:
                raise _FastPathRefused(f"{key} {text!r} is not an added token of tokenizer.json")
        padding = tj.get("padding") or {}
        pad_text = specials.get("pad_token") or padding.get("pad_token")
        pad_text = pad_text or specials.get("eos_token") or specials.get("unk_token")
        if pad_text is None:
            raise ModelLoadError(f"tokenizer in {folder} has no pad, eos or unk token")
        if pad_text not in added_contents:  # transformers would add it as a new token
            raise _FastPathRefused(f"pad token {pad_text!r} is not an added token")
        if klass == "BertTokenizer" and not _bert_normalizer_matches(tj, cfg):
            raise _FastPathRefused("BERT normalizer options differ from tokenizer_config")

        tok = Tokenizer.from_file(str(tj_path))
        pad_id = tok.token_to_id(pad_text)
        if pad_id is None:
            raise _FastPathRefused(f"pad token {pad_text!r} not in the vocabulary")
        tok.encode_special_tokens = False
        # PreTrainedTokenizerFast.__init__: align the pre-tokenizer's add_prefix_space
        add_prefix_space = cfg.get("add_prefix_space", False)
        try:
            state = json.loads(tok.pre_tokenizer.__getstate__())
            if state.get("add_prefix_space", add_prefix_space) != add_prefix_space:
                pre_class = getattr(pre_tokenizers, state.pop("type"))
                state["add_prefix_space"] = add_prefix_space
                tok.pre_tokenizer = pre_class(**state)
        except Exception:  # noqa: BLE001, S110 - transformers ignores failures here too
            pass
        truncation = tj.get("truncation") or {}
        direction = cfg.get("truncation_side") or truncation.get("direction") or "right"
        tok.enable_truncation(
            max_length=MAX_TOKENS, stride=0, strategy="longest_first", direction=direction.lower()
        )
        pad_type_id = int(cfg.get("pad_token_type_id", padding.get("pad_type_id", 0)) or 0)
        tok.enable_padding(
            direction="right", pad_id=pad_id, pad_type_id=pad_type_id, pad_token=pad_text
        )
        names = cfg.get("model_input_names") or _CLASS_DEFAULTS[klass]["model_input_names"]
        return cls(
            backend="tokenizers",
            _tok=tok,
            _return_types="token_type_ids" in names,
        )

    @classmethod
    def _transformers(cls, folder: Path, reason: str) -> StreamTokenizer:
        return cls(backend="transformers", reason=reason, _tok=load_tokenizer(folder))

    def __call__(self, prompts: Sequence[str]) -> TokenBatch:
        if self.backend == "transformers":
            enc = tokenize_batch(self._tok, prompts)
            return TokenBatch(enc["input_ids"], enc["attention_mask"], enc.get("token_type_ids"))
        encodings = self._tok.encode_batch(list(prompts), add_special_tokens=True)
        ids = torch.tensor([e.ids for e in encodings], dtype=torch.long)
        mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.long)
        types = (
            torch.tensor([e.type_ids for e in encodings], dtype=torch.long)
            if self._return_types
            else None
        )
        return TokenBatch(ids, mask, types)


def _bert_normalizer_matches(tj: Mapping[str, Any], cfg: Mapping[str, Any]) -> bool:
    """BertTokenizerFast rebuilds the normalizer when tokenizer_config disagrees with it."""
    state = tj.get("normalizer") or {}
    if state.get("type") != "BertNormalizer":
        return True
    want = {
        "lowercase": cfg.get("do_lower_case", True),
        "strip_accents": cfg.get("strip_accents"),
        "handle_chinese_chars": cfg.get("tokenize_chinese_chars", True),
    }
    return all(state.get(k, v) == v for k, v in want.items())
