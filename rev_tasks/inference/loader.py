"""Load local Hugging Face model folders and read their hidden states at restriction sites.

Loading is offline (``local_files_only``), never runs remote code, and refuses pickle
checkpoints unless the caller allows them, because unpickling a checkpoint executes code.
Every failure becomes a :class:`ModelLoadError` whose message is one line, so the CLI and the
farm can show it to a user without a traceback.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

DTYPES = ("float32", "float16", "bfloat16", "auto")
MAX_TOKENS = 128  # challenges are short prompts; longer ones are truncated identically everywhere

_WEIGHT_FILES_SAFE = ("model.safetensors", "model.safetensors.index.json")
_WEIGHT_FILES_PICKLE = ("pytorch_model.bin", "pytorch_model.bin.index.json")
_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model", "spiece.model")


class ModelLoadError(Exception):
    """A model folder cannot be used; ``str(err)`` is a one-line reason for a human."""


class UnsafeWeightsError(ModelLoadError):
    """Only pickle checkpoints and pickle is not allowed (unpickling runs arbitrary code)."""


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(exc).__name__}: {first}"[:300]


def default_sites(num_layers: int, count: int = 4) -> list[int]:
    """Evenly spaced block boundaries, always including the last block.

    Site ``k`` is the output of block ``k`` (1-based), so site ``num_layers`` is the last
    block's output before any final norm. Spreading sites over depth catches modifications
    that only touch early or late layers (e.g. swapped blocks).
    """
    if num_layers < 1:
        raise ValueError("a model needs at least one layer")
    return sorted({max(1, math.ceil(num_layers * k / count)) for k in range(1, count + 1)})


def _torch_dtype(name: str) -> Any:
    import torch

    return {
        "float32": torch.float32,
        "float16": torch.float16,
        "bfloat16": torch.bfloat16,
    }.get(name)


def _find_blocks(model: Any, num_layers: int) -> Any:
    """The module list holding the transformer blocks: the first ModuleList of ``num_layers``."""
    import torch

    for _name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == num_layers:
            return module
    raise ModelLoadError(
        f"cannot find the {num_layers} transformer blocks of {type(model).__name__}"
    )


def check_model_folder(path: Path, allow_pickle: bool = False) -> None:
    """Cheap checks before transformers is touched, with messages a user can act on."""
    if not path.exists():
        raise ModelLoadError(f"model path does not exist: {path}")
    if not path.is_dir():
        raise ModelLoadError(f"model path is not a folder: {path}")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"not a model folder (no config.json): {path}")
    has_safe = any((path / f).is_file() for f in _WEIGHT_FILES_SAFE)
    has_pickle = any((path / f).is_file() for f in _WEIGHT_FILES_PICKLE)
    if not has_safe and not has_pickle:
        raise ModelLoadError(f"no weights (model.safetensors) in {path}")
    if not has_safe and has_pickle and not allow_pickle:
        raise UnsafeWeightsError(
            f"only pickle weights in {path}: pickle checkpoints run code when loaded; "
            "convert to safetensors or set REV_ALLOW_PICKLE=1"
        )
    if not any((path / f).is_file() for f in _TOKENIZER_FILES):
        raise ModelLoadError(f"no tokenizer in {path} (tokenizer.json, vocab files)")


def load_tokenizer(folder: Path) -> Any:
    """The folder's transformers tokenizer, set up the way every signature path tokenises.

    Padding goes on the right (causal models then see exactly the unpadded prefix) with the
    pad token, else eos, else unk. The streamed engine uses it for the tokenizers it cannot
    reproduce without transformers.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            folder, local_files_only=True, trust_remote_code=False
        )
    except Exception as exc:  # noqa: BLE001 - the user's folder
        raise ModelLoadError(f"cannot load the tokenizer in {folder}: {_one_line(exc)}") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if tokenizer.pad_token is None:
        raise ModelLoadError(f"tokenizer in {folder} has no pad, eos or unk token")
    tokenizer.padding_side = "right"
    return tokenizer


def tokenize_batch(tokenizer: Any, prompts: Sequence[str]) -> Any:
    """A right-padded batch of at most ``MAX_TOKENS`` tokens per prompt, as torch tensors."""
    return tokenizer(
        list(prompts),
        padding=True,
        truncation=True,
        max_length=MAX_TOKENS,
        return_tensors="pt",
    )


class SiteModel:
    """What the engine reads of any model, in memory or streamed: its sites and width."""

    descriptor: dict[str, Any]

    @property
    def sites(self) -> list[int]:
        return default_sites(self.descriptor["num_layers"])

    @property
    def hidden_size(self) -> int:
        return int(self.descriptor["hidden_size"])

    def check_sites(self, sites: Sequence[int]) -> None:
        """``ValueError`` for a site that is not a block boundary of this model."""
        bad = [s for s in sites if not 1 <= s <= self.descriptor["num_layers"]]
        if bad:
            raise ValueError(f"sites {bad} outside 1..{self.descriptor['num_layers']}")


@dataclass
class LoadedModel(SiteModel):
    """A model ready for challenge batches: tokenizer, module, blocks and a descriptor."""

    path: str
    model: Any
    tokenizer: Any
    blocks: Any
    descriptor: dict[str, Any]
    device: str = "cpu"
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    device_pooling = True  # pooled_states(..., on_device=True): signatures.model_signatures

    def tokenize(self, prompts: Sequence[str]) -> dict[str, Any]:
        return tokenize_batch(self.tokenizer, prompts)

    def pooled_states(
        self, prompts: Sequence[str], sites: Sequence[int], on_device: bool = False
    ) -> dict[int, Any]:
        """Attention-masked mean of each site's hidden states, float64, shape (batch, hidden).

        Hooks on the blocks capture their outputs in one forward pass; the pooling runs in
        float64 so that it adds no rounding of its own. ``on_device=True`` pools on the
        model's device and returns float64 tensors there (the on-device signature path);
        otherwise numpy arrays pooled on the host.
        """
        import torch

        self.check_sites(sites)
        enc = self.tokenize(prompts)
        captured: dict[int, Any] = {}
        handles = []
        for site in sites:

            def hook(_module: Any, _inputs: Any, output: Any, site: int = site) -> None:
                captured[site] = output[0] if isinstance(output, tuple) else output

            handles.append(self.blocks[site - 1].register_forward_hook(hook))
        try:
            with self._lock, torch.inference_mode():
                inputs = {k: v.to(self.device) for k, v in enc.items()}
                if self.descriptor["family"] == "encoder-decoder":
                    self.model.get_encoder()(
                        input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
                    )
                else:
                    self.model(**inputs)
        finally:
            for h in handles:
                h.remove()
        mask = enc["attention_mask"].to(torch.float64).unsqueeze(-1)
        pool = pool_masked_on_device if on_device else pool_masked
        return {site: pool(captured[site], mask) for site in sites}


def pool_masked(hidden: Any, mask: Any) -> np.ndarray:
    """Masked mean over tokens in float64 on the host (shared with the streamed engine)."""
    import torch

    h = hidden.detach().to("cpu", torch.float64)
    summed = (h * mask).sum(dim=1)
    return (summed / mask.sum(dim=1).clamp(min=1.0)).numpy()


def pool_masked_on_device(hidden: Any, mask: Any) -> Any:
    """:func:`pool_masked` where ``hidden`` lies: a float64 tensor on its device.

    The same ops in the same order; on the CPU they are the host path's bits. On a GPU the
    sum over tokens may add in another order (ulp-level differences, docs/statistics.md).
    """
    import torch

    h = hidden.detach().to(torch.float64)
    m = mask.to(h.device)
    summed = (h * m).sum(dim=1)
    return summed / m.sum(dim=1).clamp(min=1.0)


def _family(config: Any) -> str:
    if getattr(config, "is_encoder_decoder", False):
        return "encoder-decoder"
    archs = " ".join(getattr(config, "architectures", None) or [])
    decoder_types = {"gpt2", "llama", "mistral", "qwen2", "gpt_neox", "opt", "gptj", "phi", "gemma"}
    if config.model_type in decoder_types or "CausalLM" in archs or "LMHead" in archs:
        return "decoder"
    return "encoder"


def describe(config: Any, dtype_name: str) -> dict[str, Any]:
    """What site-for-site comparison needs to know about a model."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    num_layers = getattr(text, "num_hidden_layers", None) or getattr(text, "num_layers", None)
    hidden = getattr(text, "hidden_size", None) or getattr(text, "d_model", None)
    if not num_layers or not hidden:
        raise ModelLoadError(f"unsupported architecture {config.model_type!r}: no layer count")
    return {
        "model_type": config.model_type,
        "family": _family(config),
        "num_layers": int(num_layers),
        "hidden_size": int(hidden),
        "dtype": dtype_name,
    }


def load_model(
    path: str | os.PathLike[str],
    dtype: str = "float32",
    device: str = "cpu",
    allow_pickle: bool | None = None,
) -> LoadedModel:
    """Load a local model folder for signature capture.

    ``dtype`` is the compute dtype: ``float32`` (default) upcasts stored fp16/bf16 weights so
    that a cast model differs from its source only by the rounding of its weights;
    ``auto`` keeps the stored dtype. Raises :class:`ModelLoadError` with a one-line reason.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    if allow_pickle is None:
        allow_pickle = os.environ.get("REV_ALLOW_PICKLE", "") == "1"
    folder = Path(path).expanduser()
    check_model_folder(folder, allow_pickle=allow_pickle)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    from transformers import AutoConfig, AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - every config failure is the user's folder
        raise ModelLoadError(f"invalid config.json in {folder}: {_one_line(exc)}") from exc
    tokenizer = load_tokenizer(folder)

    torch_dtype = _torch_dtype(dtype) if dtype != "auto" else "auto"
    try:
        model = AutoModel.from_pretrained(
            folder,
            config=config,
            local_files_only=True,
            trust_remote_code=False,
            use_safetensors=not allow_pickle or None,
            dtype=torch_dtype,
        )
    except Exception as exc:  # noqa: BLE001 - corrupt or truncated weights, wrong shapes
        raise ModelLoadError(f"cannot load the weights in {folder}: {_one_line(exc)}") from exc
    model.eval()
    model.requires_grad_(False)
    if device != "cpu":
        try:
            model.to(device)
        except Exception as exc:  # noqa: BLE001
            raise ModelLoadError(f"cannot move the model to {device}: {_one_line(exc)}") from exc
    actual = str(next(model.parameters()).dtype).removeprefix("torch.")
    descriptor = describe(config, actual)
    search_root = model.get_encoder() if descriptor["family"] == "encoder-decoder" else model
    blocks = _find_blocks(search_root, descriptor["num_layers"])
    return LoadedModel(
        path=str(folder.resolve()),
        model=model,
        tokenizer=tokenizer,
        blocks=blocks,
        descriptor=descriptor,
        device=device,
    )
