"""Tokenising challenge batches exactly as the in-memory loader does, without transformers.

A streamed run must not import transformers (the package docstring says why), so for the
tokenizer classes it knows (BERT, GPT-2 and plain fast tokenizers) :class:`StreamTokenizer`
configures the ``tokenizers`` library on ``tokenizer.json`` the way transformers' fast
tokenizer configures it. Any other folder falls back to the loader's own tokenizer setup
(:func:`~rev_tasks.inference.loader.load_tokenizer`: correct, with the higher memory floor).
"""

from __future__ import annotations

import json
import threading
import weakref
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
    # LlamaTokenizerFast.__init__: its post-processor adds bos (and eos) itself, see
    # _llama_post_processor; add_prefix_space defaults to None there, not False.
    "LlamaTokenizer": {
        "unk_token": "<unk>",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "add_bos_token": True,
        "add_eos_token": False,
        "add_prefix_space": None,
        "model_input_names": ["input_ids", "attention_mask"],
    },
}
_NOT_TOKENS = ("model_input_names", "add_bos_token", "add_eos_token", "add_prefix_space")
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
        """The folder's tokenizer, shared with any live model of the same unchanged folder.

        A large vocabulary costs ~30 MiB resident in the backend (49,152 tokens and their
        merges); ``rev verify MODEL MODEL`` and a worker holding a model for both sides used
        to load it twice. Encoding never mutates the shared object (padding and truncation
        are fixed here), so sharing it changes no token.
        """
        key = _cache_key(folder, model_type)
        with _SHARED_LOCK:
            shared = _SHARED.get(key) if key is not None else None
        if shared is not None:
            return shared
        try:
            tok = cls._fast(folder, model_type)
        except _FastPathRefused as why:
            tok = cls._transformers(folder, str(why))
        if key is not None and tok.backend == "tokenizers":
            # only the fast backend: transformers' tokenizer re-sets padding and truncation on
            # every call, so two models' threads must not share one
            with _SHARED_LOCK:
                _SHARED[key] = tok
        return tok

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
            tok = Tokenizer.from_file(str(tj_path))
        except Exception as exc:  # noqa: BLE001 - OSError, ValueError, tokenizers errors
            raise ModelLoadError(f"cannot read the tokenizer in {folder}: {exc}") from exc
        tj = _backend_settings(tok)
        klass = cfg.get("tokenizer_class") or _MODEL_TYPE_TOKENIZER.get(model_type)
        klass = (klass or "").removesuffix("Fast")
        if klass not in _CLASS_DEFAULTS:
            raise _FastPathRefused(f"tokenizer class {klass or 'unknown'}")
        defaults = _CLASS_DEFAULTS[klass]
        llama = klass == "LlamaTokenizer"
        if cfg.get("split_special_tokens") or cfg.get("from_slow"):
            raise _FastPathRefused("tokenizer options that rewrite the backend")
        if not llama and (cfg.get("add_bos_token") or cfg.get("add_eos_token")):
            raise _FastPathRefused("tokenizer options that rewrite the backend")
        if llama and cfg.get("add_prefix_space") is not None:
            raise _FastPathRefused("LlamaTokenizerFast with add_prefix_space converts the slow one")
        # Which special tokens transformers ends up with (tokenizer_config wins; the legacy
        # special_tokens_map.json overrides it only when there is no added_tokens_decoder).
        values: dict[str, Any] = {k: v for k, v in defaults.items() if k not in _NOT_TOKENS}
        values.update({k: cfg[k] for k in _SPECIAL_KEYS_ALL if k in cfg})
        stm_path = folder / "special_tokens_map.json"
        if "added_tokens_decoder" not in cfg and stm_path.is_file():
            stm = json.loads(stm_path.read_text(encoding="utf-8"))
            values.update({k: stm[k] for k in _SPECIAL_KEYS_ALL if k in stm})
            if stm.get("additional_special_tokens"):
                raise _FastPathRefused("additional special tokens")
        if cfg.get("additional_special_tokens") or cfg.get("extra_special_tokens"):
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

        pad_id = tok.token_to_id(pad_text)
        if pad_id is None:
            raise _FastPathRefused(f"pad token {pad_text!r} not in the vocabulary")
        tok.encode_special_tokens = False
        # PreTrainedTokenizerFast.__init__: align the pre-tokenizer's add_prefix_space
        add_prefix_space = cfg.get("add_prefix_space", defaults.get("add_prefix_space", False))
        try:
            state = json.loads(tok.pre_tokenizer.__getstate__())
            if state.get("add_prefix_space", add_prefix_space) != add_prefix_space:
                pre_class = getattr(pre_tokenizers, state.pop("type"))
                state["add_prefix_space"] = add_prefix_space
                tok.pre_tokenizer = pre_class(**state)
        except Exception:  # noqa: BLE001, S110 - transformers ignores failures here too
            pass
        if llama:
            tok.post_processor = _llama_post_processor(
                tok,
                specials,
                bool(cfg.get("add_bos_token", defaults["add_bos_token"])),
                bool(cfg.get("add_eos_token", defaults["add_eos_token"])),
            )
        truncation = tj.get("truncation") or {}
        direction = cfg.get("truncation_side") or truncation.get("direction") or "right"
        tok.enable_truncation(
            max_length=MAX_TOKENS, stride=0, strategy="longest_first", direction=direction.lower()
        )
        pad_type_id = int(cfg.get("pad_token_type_id", padding.get("pad_type_id", 0)) or 0)
        tok.enable_padding(
            direction="right", pad_id=pad_id, pad_type_id=pad_type_id, pad_token=pad_text
        )
        names = cfg.get("model_input_names") or defaults["model_input_names"]
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


_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "tokenizer.model",
)
_SHARED: weakref.WeakValueDictionary[tuple[Any, ...], StreamTokenizer] = (
    weakref.WeakValueDictionary()
)
_SHARED_LOCK = threading.Lock()


def _cache_key(folder: Path, model_type: str) -> tuple[Any, ...] | None:
    """The folder and the size and mtime of each tokenizer file: a rewritten file is a miss."""
    try:
        root = folder.resolve()
        stats = []
        for name in _TOKENIZER_FILES:
            f = root / name
            if f.is_file():
                st = f.stat()
                stats.append((name, st.st_size, st.st_mtime_ns))
    except OSError:
        return None
    return (str(root), model_type, tuple(stats))


def _backend_settings(tok: Any) -> dict[str, Any]:
    """The parts of ``tokenizer.json`` the checks read, taken from the loaded backend.

    Parsing ``tokenizer.json`` a second time in Python (a 50k vocabulary and its merges as
    dicts and lists) left ~14 MiB of freed-but-resident heap behind for the process's life
    (issue 17): the backend already holds everything needed.
    """
    added = [
        {
            "id": int(i),
            "content": t.content,
            "single_word": t.single_word,
            "lstrip": t.lstrip,
            "rstrip": t.rstrip,
            "normalized": t.normalized,
            "special": t.special,
        }
        for i, t in tok.get_added_tokens_decoder().items()
    ]
    normalizer = json.loads(tok.normalizer.__getstate__()) if tok.normalizer else None
    return {
        "added_tokens": added,
        "padding": tok.padding,
        "truncation": tok.truncation,
        "normalizer": normalizer,
    }


def _llama_post_processor(
    tok: Any, specials: Mapping[str, str | None], add_bos: bool, add_eos: bool
) -> Any:
    """``LlamaTokenizerFast.update_post_processor``: bos/eos templates replace tokenizer.json's."""
    from tokenizers import processors

    bos, eos = specials.get("bos_token"), specials.get("eos_token")
    if add_bos and bos is None:
        raise ModelLoadError("add_bos_token = True but the tokenizer has no bos_token")
    if add_eos and eos is None:
        raise ModelLoadError("add_eos_token = True but the tokenizer has no eos_token")
    single = f"{(f'{bos}:0 ') if add_bos else ''}$A:0{(f' {eos}:0') if add_eos else ''}"
    pair = f"{single}{(f' {bos}:1') if add_bos else ''} $B:1{(f' {eos}:1') if add_eos else ''}"
    special_tokens = []
    if add_bos:
        special_tokens.append((bos, tok.token_to_id(bos)))
    if add_eos:
        special_tokens.append((eos, tok.token_to_id(eos)))
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=special_tokens)


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
