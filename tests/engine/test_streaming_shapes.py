"""The streamed path's signatures equal the in-memory ones for models of other shapes.

Issue 17: a figure measured on the benchmark's one model (24 × 1024 GPT-2, 512-token BPE)
said nothing about other vocabularies, tokenizer classes, depths or sequence lengths. Two
small models that differ in all of these, built by ``rev_tasks.testing.shapes``, must give
bit-identical signatures streamed and in memory (correctness only; memory ratios are
``bench/bench_streaming.py`` figures). The Llama uses SmolLM2's real ``LlamaTokenizerFast``
(49,152 tokens, bos added by its post-processor), which the streamed tokenizer now runs
without transformers; the GPT-2 uses MiniLM's WordPiece (30,522 tokens, token type ids).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from rev_tasks.core.challenges import generate_challenges
from rev_tasks.core.keys import load_key
from rev_tasks.inference.loader import load_model
from rev_tasks.inference.signatures import site_signatures
from rev_tasks.inference.streaming import load_streamed
from rev_tasks.testing.shapes import Shape, build_shape

KEY = load_key(None)
PROMPTS = [c.prompt for c in generate_challenges(KEY, 12)]
ODD = ["x", "def f(a, b):\n\treturn a + b  # code " * 30]  # 1 token; truncated at 128

SHAPES = {
    "llama-smollm2": Shape("llama", 5, 96, 4, "smollm2", intermediate=160, kv_heads=2),
    "gpt2-minilm": Shape("gpt2", 3, 64, 2, "minilm", intermediate=128, positions=512, seed=3),
}


@pytest.fixture(scope="module", params=sorted(SHAPES))
def shaped(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_shape(SHAPES[request.param], root=tmp_path_factory.mktemp("shapes"))


def test_streamed_signatures_equal_in_memory(shaped: Path) -> None:
    full = load_model(shaped)
    streamed = load_streamed(shaped, memory_budget_mb=64)
    assert streamed.tokenizer.backend == "tokenizers", streamed.tokenizer.reason
    # a second model of the same folder (the other side of `rev verify M M`) shares it
    assert load_streamed(shaped, memory_budget_mb=64).tokenizer is streamed.tokenizer
    assert streamed.sites == full.sites
    lengths = set()
    for batch in (PROMPTS[:8], PROMPTS[8:], ODD, ODD[:1]):
        enc = full.tokenize(batch)
        lengths.add(int(enc["input_ids"].shape[1]))
        a = full.pooled_states(batch, full.sites)
        b = streamed.pooled_states(batch, streamed.sites)
        for site in full.sites:
            assert np.array_equal(a[site], b[site]), f"site {site} of {shaped.name}"
        sa, sb = site_signatures(a, KEY), site_signatures(b, KEY)
        assert all(
            np.array_equal(x[s], y[s]) for x, y in zip(sa, sb, strict=True) for s in full.sites
        )
    assert len(lengths) >= 3  # several sequence lengths, including the 128-token truncation
    assert 128 in lengths
