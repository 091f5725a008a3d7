"""rev_tasks.testing.faults: every hook is inert without the enable flag and does its one
thing with it (the farm-level effects are in tests/integration/test_faults.py)."""

from __future__ import annotations

import ast
import copy
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from rev_tasks.testing import faults

ROOT = Path(__file__).resolve().parents[2]
ALL_FAULTS = {
    "REV_TEST_FAULTY_VALIDATORS": "0,1:random,2:crash",
    "REV_TEST_SLOW_BATCH_SECONDS": "0.3",
    "REV_TEST_SLOW_VALIDATION_SECONDS": "0.2",
    "REV_TEST_FORGE_INFERENCE_PATH": "forged",
    "REV_TEST_KILL_INFERENCE_PATH": "bomb",
    "REV_TEST_NOISY_RECORDS": "noisy:4,loud:5",
    "REV_TEST_COPY_REFERENCE_PATH": "copied",
    "REV_TEST_DEVICE_NOISE": "device:1e-3",
}


@pytest.fixture
def injected(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """Every fault variable set, the enable flag not yet; the cache reset around the test."""
    for name, value in ALL_FAULTS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv(faults.ENABLE, raising=False)
    faults.reset()
    yield monkeypatch
    faults.reset()


def _enable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(faults.ENABLE, "1")
    faults.reset()


def test_without_the_flag_every_hook_leaves_things_alone(injected: pytest.MonkeyPatch) -> None:
    assert faults.active() == faults.Faults()
    faults.before_inference("/models/bomb")  # would SIGKILL this test process
    reference, candidate = object(), object()
    assert faults.computed_candidate("/models/forged", reference, candidate) is candidate
    start = time.perf_counter()
    faults.after_batch()
    assert time.perf_counter() - start < 0.1
    faults.before_validation(2)
    assert time.perf_counter() - start < 0.1
    assert [faults.validator_verdict(v, "job", "SAME") for v in range(3)] == ["SAME"] * 3


def test_with_the_flag_each_hook_injects_its_fault(injected: pytest.MonkeyPatch) -> None:
    _enable(injected)
    reference, candidate = object(), object()
    assert faults.computed_candidate("/models/forged", reference, candidate) is reference
    assert faults.computed_candidate("/models/honest", reference, candidate) is candidate
    fingerprint = {"signatures": []}  # a registered reference cannot stand in for a model
    assert faults.computed_candidate("/models/forged", fingerprint, candidate) is candidate
    start = time.perf_counter()
    faults.after_batch()
    assert time.perf_counter() - start >= 0.3
    with pytest.raises(RuntimeError, match="validator 2 crashed"):
        faults.before_validation(2)
    start = time.perf_counter()
    faults.before_validation(0)  # a liar does not crash; every validator is slow
    assert time.perf_counter() - start >= 0.2
    assert faults.validator_verdict(0, "job", "SAME") == "DIFFERENT"
    assert faults.validator_verdict(0, "job", "INVALID") == "SAME"
    assert {faults.validator_verdict(1, "job", "SAME") for _ in range(200)} == set(faults.VERDICTS)
    assert faults.validator_verdict(3, "job", "UNDECIDED") == "UNDECIDED"


class _ConstantSide:
    """A side whose signatures are all ``value`` bytes (4 sites × 128 bits)."""

    def __init__(self, value: int, name: str) -> None:
        self.value, self.descriptor = value, {"name": name, "num_layers": 4}

    def signatures(self, challenges: Any, sites: Any, key: bytes, bits: int) -> list[Any]:
        return [{s: np.full(bits // 8, self.value, np.uint8) for s in sites} for _ in challenges]


def _sigs(side: Any, n: int = 3) -> tuple[list[Any], list[dict[int, Any]]]:
    from rev_tasks.core.challenges import job_challenges

    challenges = job_challenges(bytes(32), n)
    return challenges, side.signatures(challenges, [1, 2, 3, 4], bytes(32), 128)


def _bits(a: dict[int, Any], b: dict[int, Any]) -> int:
    return sum(int(np.unpackbits(a[s] ^ b[s]).sum()) for s in a)


def test_recorded_sides_and_device_noise_are_inert_without_the_flag(
    injected: pytest.MonkeyPatch,
) -> None:
    import torch

    ref, cand = _ConstantSide(0, "ref"), _ConstantSide(255, "cand")
    for path in ("/m/noisy", "/m/copied", "/m/loud"):
        assert faults.recorded_sides(path, ref, cand, bytes(32)) == (ref, cand)
    model = SimpleNamespace(model=torch.nn.Linear(4, 4))
    x = torch.ones(1, 4)
    before = model.model(x)
    with faults.device_noise("/m/device", [model]) as eps:
        assert eps == 0.0
        assert torch.equal(model.model(x), before)


def test_noisy_records_flip_n_bits_at_the_same_positions_on_both_sides(
    injected: pytest.MonkeyPatch,
) -> None:
    _enable(injected)
    ref, cand = _ConstantSide(0, "ref"), _ConstantSide(0, "cand")
    assert faults.recorded_sides("/m/honest", ref, cand, bytes(32)) == (ref, cand)
    for path, n in (("/m/noisy", 4), ("/m/loud", 5)):
        nref, ncand = faults.recorded_sides(path, ref, cand, bytes(32))
        assert ncand.descriptor == {"name": "cand", "num_layers": 4}
        _, truth = _sigs(ref)
        _, got_ref = _sigs(nref)
        challenges, got_cand = _sigs(ncand)
        for t, r, c in zip(truth, got_ref, got_cand, strict=True):
            assert _bits(t, r) == n and _bits(t, c) == n  # each side n bits off
            assert _bits(r, c) == 0  # the recorded distance is unchanged
        # Spread over the sites, different per challenge.
        spots = [faults.flip_positions(c.index, [1, 2, 3, 4], 128, n) for c in challenges]
        assert {site for site, _bit in spots[0]} == {1, 2, 3, 4}
        assert len({tuple(p) for p in spots}) == len(spots)


def test_copied_records_carry_the_reference_signatures(injected: pytest.MonkeyPatch) -> None:
    _enable(injected)
    ref, cand = _ConstantSide(0, "ref"), _ConstantSide(255, "cand")
    same_ref, copied = faults.recorded_sides("/m/copied-b", ref, cand, bytes(32))
    assert same_ref is ref and copied.descriptor["name"] == "cand"
    assert all(_bits(r, c) == 0 for r, c in zip(_sigs(ref)[1], _sigs(copied)[1], strict=True))
    assert all(_bits(r, c) == 512 for r, c in zip(_sigs(ref)[1], _sigs(cand)[1], strict=True))


def test_device_noise_perturbs_every_linear_layer_alike_and_unhooks(
    injected: pytest.MonkeyPatch,
) -> None:
    import torch

    _enable(injected)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8))
    twin = copy.deepcopy(net)
    a, b = SimpleNamespace(model=net), SimpleNamespace(model=twin)
    x = torch.randn(3, 8)
    clean, clean_first = net(x), net[0](x)
    with faults.device_noise("/m/honest", [a, b]) as eps:
        assert eps == 0.0 and torch.equal(net(x), clean)
    with faults.device_noise("/m/device-copy", [a, b]) as eps:
        assert eps == 1e-3
        noisy = net(x)
        assert torch.equal(noisy, twin(x))  # identical weights stay identical
        first = net[0](x)  # one layer alone: its output is off by eps·g relatively
        rel = ((first - clean_first) / clean_first).abs()
        assert 0 < rel.max().item() < 6 * eps and not torch.equal(noisy, clean)
    assert torch.equal(net(x), clean)  # the hooks are gone


def test_the_kill_hook_sigkills_only_a_marked_candidate() -> None:
    code = (
        "from rev_tasks.testing import faults\n"
        "faults.before_inference('/models/honest')\n"
        "print('survived', flush=True)\n"
        "faults.before_inference('/models/bomb')\n"
        "print('not reached')\n"
    )
    env = {**ALL_FAULTS, faults.ENABLE: "1"}
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert proc.stdout.split() == ["survived"]


def test_production_code_calls_one_hook_per_point_and_nothing_else() -> None:
    """The tasks reach fault injection only through the hooks, one call per hook point."""
    hooks = {"before_inference", "computed_candidate", "recorded_sides", "device_noise"}
    hooks |= {"after_batch", "endpoint_client"}
    hooks |= {"before_validation", "validator_verdict"}
    calls: list[str] = []
    for path in sorted((ROOT / "rev_tasks").rglob("*.py")):
        if "testing" in path.relative_to(ROOT).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and _is_faults(node.value):
                calls.append(node.attr)
            if isinstance(node, ast.ImportFrom) and node.module == "rev_tasks.testing.faults":
                calls.extend(f"import {a.name}" for a in node.names)
    assert sorted(calls) == sorted(hooks)


def _is_faults(node: ast.AST) -> bool:
    return isinstance(node, ast.Name) and node.id == "faults"


def test_malformed_faults_stop_the_importing_process_at_start() -> None:
    env = {**os.environ, faults.ENABLE: "1", "REV_TEST_FAULTY_VALIDATORS": "1:sleepy"}
    proc = subprocess.run(
        [sys.executable, "-c", "import rev_tasks.testing.faults"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode != 0 and "REV_TEST_FAULTY_VALIDATORS" in proc.stderr


@pytest.mark.parametrize(
    ("name", "value"),
    [("REV_TEST_NOISY_RECORDS", "noisy:lots"), ("REV_TEST_DEVICE_NOISE", ":1e-6")],
)
def test_malformed_marker_faults_stop_the_process(name: str, value: str) -> None:
    env = {**os.environ, faults.ENABLE: "1", name: value}
    proc = subprocess.run(
        [sys.executable, "-c", "import rev_tasks.testing.faults"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode != 0 and name in proc.stderr


def test_the_endpoint_forgery_moves_every_top_logprob_and_nothing_else() -> None:
    """What a forging endpoint worker records (REV_TEST_FORGE_ENDPOINT=1): each top-k value
    shifted by FORGE_SHIFT, the rest of the reply as it was; without the flag, nothing."""
    import json

    raw = json.dumps(
        {
            "id": "x",
            "choices": [
                {"text": " Paris", "logprobs": {"top_logprobs": [{" Paris": -0.1, " a": -3.0}]}}
            ],
            "usage": {"prompt_tokens": 5, "completion_tokens": 1},
        }
    ).encode()
    out = json.loads(faults.forged_reply(raw))
    top = out["choices"][0]["logprobs"]["top_logprobs"][0]
    assert top == {" Paris": -0.1 - faults.FORGE_SHIFT, " a": -3.0 - faults.FORGE_SHIFT}
    assert out["choices"][0]["text"] == " Paris" and out["usage"]["prompt_tokens"] == 5
    assert faults.forged_reply(b"not json") == b"not json"
    marker = object()
    assert faults.Faults.from_env({"REV_TEST_FORGE_ENDPOINT": "1"}).forge_endpoint is False
    assert faults.Faults.from_env(
        {faults.ENABLE: "1", "REV_TEST_FORGE_ENDPOINT": "1"}
    ).forge_endpoint
    faults.reset()
    assert faults.endpoint_client(marker) is marker  # this process: the flag is off
