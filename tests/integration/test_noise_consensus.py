"""Consensus that float noise cannot fail and altered records cannot pass, on the real farm.

The validators re-execute both sides of two sampled records and allow each recorded side
``engine.reexecution_allowance`` bits of float noise (docs/statistics.md §11). These tests
run that on real workers with a 24-layer GPT-2 (random weights, real transformers code):

- genuine jobs, the inference worker on two torch threads and the validators on one, each
  job's inference in a fresh pool process (``--max-tasks-per-child 1``), six jobs: every
  SAME job is published with 5/5 votes;
- an inference worker whose records carry exactly the allowance in flipped bits per side
  (``REV_TEST_NOISY_RECORDS``) still gets SAME and DIFFERENT published 5/5; one bit more
  and every validator votes INVALID;
- an inference worker that records the reference's signatures as the candidate's on a
  DIFFERENT pair (``REV_TEST_COPY_REFERENCE_PATH``): five INVALID votes, the job fails
  with ``invalid_transcript`` and no verdict;
- a simulated device change (``REV_TEST_DEVICE_NOISE``: a relative error on every linear
  layer's output of the inference's models, 300 times CUDA-against-CPU fp32 rounding): the
  CPU validators publish its verdict. The real CUDA case is in tests/integration/test_gpu.py.

Thread counts come from the deployed rule (``cores // -c``, rev_tasks/celery.py) on
workers pinned to two CPUs: ``-c 1`` gives the inference child two threads, ``-c 2`` gives
each validator child one. ``OMP_WAIT_POLICY=PASSIVE`` keeps two spinning OpenMP threads
from stalling on this shared 2-core VM (a scheduling choice; the arithmetic is the same).
Run with ``-s`` to see the measured figures (bits per record side, votes, seconds).
"""

from __future__ import annotations

import base64
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from rev_tasks.queues import CONSENSUS_WORKER_QUEUES, INFERENCE_CPU, Task, inference_task_id
from rev_tasks.testing.harness import worker_argv
from rev_tasks.testing.variants import build_tiny_causal_lm, copy_model
from tests.integration.farm import (
    TEST_KEY,
    FarmWorker,
    assert_drained,
    farm_environment,
    purge,
    register,
    submit,
    wait_job,
)

pytestmark = [pytest.mark.integration, pytest.mark.faults]

LAYERS, HIDDEN = 24, 128
FRESH_PROCESSES = 6
INFERENCE_THREADS, VALIDATOR_THREADS = 2, 1
#: Relative error per linear layer output of the simulated device (CUDA fp32 ~ 1e-6).
DEVICE_EPS = 3e-4
_THREADS_LINE = re.compile(r"/ForkPoolWorker-(\d+)\] worker child (\d+): (\d+) torch thread\(s\)")


# ----------------------------------------------------------------------------- the farm
@pytest.fixture(scope="module")
def deep(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two 24-layer GPT-2s (seeds 0, 1) and copies whose folder names mark them for faults."""
    root = tmp_path_factory.mktemp("deep-models")
    a = build_tiny_causal_lm(root / "deep-a", "gpt2", seed=0, layers=LAYERS, hidden=HIDDEN)
    b = build_tiny_causal_lm(root / "deep-b", "gpt2", seed=1, layers=LAYERS, hidden=HIDDEN)
    d = {"root": root, "deep-a": a, "deep-b": b}
    for name, src in [
        ("deep-a-copy", a),
        ("deep-a-within-allowance", a),
        ("deep-b-within-allowance", b),
        ("deep-a-past-allowance", a),
        ("deep-b-copied", b),
        ("deep-a-device", a),
    ]:
        d[name] = copy_model(src, root / name)
    return d


@pytest.fixture(scope="module")
def farm_env(
    redis_url: str, postgres_url: str, deep: dict[str, Path], tmp_path_factory: Any
) -> Iterator[dict[str, str]]:
    """The farm's environment with only the deep models under its model root."""
    dirs = {"root": deep["root"], "minilm": deep["root"]}
    with farm_environment(
        redis_url, postgres_url, dirs, tmp_path_factory, OMP_WAIT_POLICY="PASSIVE"
    ) as env:
        yield env


def _two_cpus() -> set[int]:
    cpus = sorted(os.sched_getaffinity(0))
    assert len(cpus) >= 2, f"this test needs two CPUs, the process may use {cpus}"
    return set(cpus[:2])


class Workers:
    """Inference and validator workers, each a real ``celery worker`` pinned to two CPUs."""

    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        self.env, self.log_dir = env, log_dir
        self.started: list[FarmWorker] = []
        self.validators: FarmWorker | None = None

    def start(self, queues: str, name: str, concurrency: int, *args: str, **env: str) -> FarmWorker:
        argv = worker_argv(queues, "unused", concurrency, *args)
        at = argv.index("-n")
        del argv[at : at + 2]  # FarmWorker adds its own node name
        cpus = _two_cpus()
        worker = FarmWorker(
            {**self.env, **env},
            self.log_dir,
            queues=queues,
            name=name,
            command=argv,
            preexec_fn=lambda: os.sched_setaffinity(0, cpus),
        )
        self.started.append(worker)
        return worker.start()

    def inference(self, name: str, *args: str, **env: str) -> FarmWorker:
        """``-c 1`` on two CPUs: its one child runs ``INFERENCE_THREADS`` torch threads."""
        return self.start(INFERENCE_CPU, name, 1, *args, **env)

    def stop_all(self) -> None:
        for worker in self.started:
            worker.stop()


@pytest.fixture(scope="module")
def workers(farm_env: dict[str, str], tmp_path_factory: Any) -> Iterator[Workers]:
    """The validators' worker (``-c 2`` on two CPUs: one torch thread per child) runs all
    module long; each test starts the inference workers it needs."""
    w = Workers(farm_env, tmp_path_factory.mktemp("noise-logs"))
    w.validators = w.start(",".join(CONSENSUS_WORKER_QUEUES), "validators", 2)
    yield w
    w.stop_all()
    purge(farm_env["REDIS_URL"])


def _threads(worker: FarmWorker) -> dict[int, int]:
    """Torch threads of each pool child the worker started (pid → threads), from its log."""
    return {int(p): int(t) for _n, p, t in _THREADS_LINE.findall(worker.log_tail(2_000_000))}


def _inference_children(worker: FarmWorker, job_ids: list[str]) -> dict[str, int]:
    """The pid of the pool child that ran each job's inference, from the worker's log.

    Celery names each child ``ForkPoolWorker-N`` (a new N for each replacement) on its log
    lines: the child's thread line gives its pid, the task's success line its job.
    """
    text = worker.log_tail(2_000_000)
    pids = {n: int(p) for n, p, _t in _THREADS_LINE.findall(text)}
    out = {}
    for job_id in job_ids:
        done = re.search(
            rf"/ForkPoolWorker-(\d+)\] Task {re.escape(Task.RUN_INFERENCE)}"
            rf"\[{re.escape(inference_task_id(job_id))}\] succeeded",
            text,
        )
        assert done is not None, f"no inference of {job_id} in the log"
        out[job_id] = pids[done.group(1)]
    return out


def _job(client: Any, reference: Any, candidate: Path, **extra: Any) -> dict[str, Any]:
    body = {
        "kind": "verify",
        "reference": reference,
        "candidate": {"path": str(candidate)},
        "device": "cpu",
        "max_challenges": 16,
        **extra,
    }
    return wait_job(client, submit(client, body), timeout=240)


def _published(doc: dict[str, Any], verdict: str) -> dict[str, Any]:
    """The job succeeded with ``verdict`` and five identical votes for it."""
    assert doc["status"] == "succeeded", doc
    assert doc["result"]["verdict"] == verdict, doc["result"]
    consensus = doc["result"]["consensus"]
    votes = consensus["votes"]
    assert consensus["agreed"] is True and consensus["agreeing"] == 5, consensus
    assert sorted(v["validator"] for v in votes) == [0, 1, 2, 3, 4]
    assert {v["verdict"] for v in votes} == {verdict} and len({v["digest"] for v in votes}) == 1
    return consensus


def _rejected(doc: dict[str, Any]) -> dict[str, Any]:
    """The farm's answer to an INVALID quorum: failed, ``invalid_transcript``, no verdict."""
    assert doc["status"] == "failed", doc
    assert doc["error"]["code"] == "invalid_transcript", doc["error"]
    assert doc["result"]["verdict"] is None
    consensus = doc["result"]["consensus"]
    assert consensus["verdict"] == "INVALID" and consensus["agreed"] is False
    assert [v["verdict"] for v in consensus["votes"]] == ["INVALID"] * 5
    return consensus


_SIDES: dict[Path, Any] = {}


def _record_noise(
    client: Any, job_id: str, reference: Path | None, candidate: Path
) -> list[tuple[int | None, int]]:
    """Per record of the stored transcript: (reference bits, candidate bits) by which the
    recorded signatures differ from this process's own computation (one more CPU validator).
    The reference is None when it is a fingerprint (read back exactly: not recomputed)."""
    from rev_tasks.core.challenges import challenge_for
    from rev_tasks.engine import ModelSide, differing_bits
    from rev_tasks.inference.loader import load_model

    resp = client.get(f"/v1/jobs/{job_id}/transcript")
    assert resp.status_code == 200, resp.get_json()
    doc = resp.get_json()
    sites = [int(s) for s in doc["sites"]]
    bits = int(doc["parameters"]["bits_per_site"])
    nonce = bytes.fromhex(doc["challenge_nonce"]) if doc.get("challenge_nonce") else None
    challenges = [challenge_for(TEST_KEY, int(r["index"]), nonce) for r in doc["records"]]

    def fresh(path: Path) -> list[dict[int, Any]]:
        side = _SIDES.get(path) or _SIDES.setdefault(path, ModelSide(load_model(str(path))))
        return side.signatures(challenges, sites, TEST_KEY, bits)

    def recorded(rec: dict[str, Any], label: str) -> dict[int, Any]:
        return {int(s): np.frombuffer(base64.b64decode(v), np.uint8) for s, v in rec[label].items()}

    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one more one-thread validator (and no spinning on 2 cores)
    try:
        cand = fresh(candidate)
        ref = fresh(reference) if reference is not None else [None] * len(cand)
    finally:
        torch.set_num_threads(threads)
    out: list[tuple[int | None, int]] = []
    for rec, r, c in zip(doc["records"], ref, cand, strict=True):
        rb = None if r is None else differing_bits(r, recorded(rec, "reference"), sites)
        out.append((rb, differing_bits(c, recorded(rec, "candidate"), sites)))
    return out


def _allowance(deep: dict[str, Path]) -> int:
    from rev_tasks.engine import reexecution_allowance
    from rev_tasks.inference.loader import default_sites
    from rev_tasks.inference.signatures import DEFAULT_BITS

    return reexecution_allowance(DEFAULT_BITS * len(default_sites(LAYERS)))


# ----------------------------------------------------------------------------- genuine jobs
def test_genuine_jobs_publish_5_of_5_over_fresh_two_thread_inference_processes(
    client: Any, workers: Workers, deep: dict[str, Path], farm_env: dict[str, str]
) -> None:
    """Each job's inference in a new pool child (``--max-tasks-per-child 1``), two threads;
    odd jobs against a registered fingerprint (made in yet another child), even ones
    against the reference folder (both sides recomputed by the validators)."""
    start = time.monotonic()
    worker = workers.inference("fresh", "--max-tasks-per-child", "1")
    try:
        model = register(client, "deep-a", deep["deep-a"], timeout=240)
        assert model["status"] == "ready", model
        docs = []
        for i in range(FRESH_PROCESSES):
            reference: Any = "deep-a" if i % 2 else {"path": str(deep["deep-a"])}
            docs.append(_job(client, reference, deep["deep-a-copy"]))
    finally:
        worker.stop()
    elapsed = time.monotonic() - start
    ran = _inference_children(worker, [d["id"] for d in docs])
    assert len(set(ran.values())) == FRESH_PROCESSES, ran  # one process per job
    threads = _threads(worker)
    assert {threads[pid] for pid in ran.values()} == {INFERENCE_THREADS}, (ran, threads)
    assert workers.validators is not None
    validator_threads = _threads(workers.validators)
    assert validator_threads and set(validator_threads.values()) == {VALIDATOR_THREADS}
    for doc in docs:
        _published(doc, "SAME")
    # What two threads in a fresh process put into the records, seen by a one-thread process.
    noise = [
        bits
        for i, doc in enumerate(docs)
        for pair in _record_noise(
            client, doc["id"], None if i % 2 else deep["deep-a"], deep["deep-a-copy"]
        )
        for bits in pair
        if bits is not None
    ]
    allow = _allowance(deep)
    assert max(noise) <= allow, noise
    print(
        f"\n{FRESH_PROCESSES} genuine SAME jobs, {INFERENCE_THREADS}-thread inference in "
        f"processes {sorted(ran.values())}, {VALIDATOR_THREADS}-thread validators: votes "
        f"{[d['result']['consensus']['agreeing'] for d in docs]} of 5, {elapsed:.0f} s; "
        f"{len(noise)} recorded sides differ from a 1-thread recomputation by at most "
        f"{max(noise)} bits (allowance {allow})"
    )
    assert_drained(farm_env["REDIS_URL"])


# ----------------------------------------------------------------------------- injected faults
@pytest.fixture(scope="module")
def faulty_inference(workers: Workers, deep: dict[str, Path]) -> Iterator[FarmWorker]:
    """One inference worker with every record fault of this module armed, by folder name."""
    allow = _allowance(deep)
    worker = workers.inference(
        "faulty",
        REV_ENABLE_FAULT_INJECTION="1",
        REV_TEST_NOISY_RECORDS=f"within-allowance:{allow},past-allowance:{allow + 1}",
        REV_TEST_COPY_REFERENCE_PATH="copied",
        REV_TEST_DEVICE_NOISE=f"device:{DEVICE_EPS}",
    )
    yield worker
    worker.stop()


@pytest.mark.parametrize(
    ("candidate", "verdict"),
    [("deep-a-within-allowance", "SAME"), ("deep-b-within-allowance", "DIFFERENT")],
)
def test_records_off_by_the_allowance_still_publish_5_of_5(
    client: Any,
    faulty_inference: FarmWorker,
    deep: dict[str, Path],
    candidate: str,
    verdict: str,
) -> None:
    allow = _allowance(deep)
    doc = _job(client, {"path": str(deep["deep-a"])}, deep[candidate])
    consensus = _published(doc, verdict)
    noise = _record_noise(client, doc["id"], deep["deep-a"], deep[candidate])
    # Every record side carries exactly the allowance in flipped bits (no float noise on top).
    assert noise and all(pair == (allow, allow) for pair in noise), noise
    print(
        f"\n{candidate}: {len(noise)} records, {allow} bits flipped per side (allowance "
        f"{allow}): {verdict} published, {consensus['agreeing']} of 5 votes"
    )


def test_one_bit_past_the_allowance_is_voted_invalid(
    client: Any, faulty_inference: FarmWorker, deep: dict[str, Path]
) -> None:
    allow = _allowance(deep)
    doc = _job(client, {"path": str(deep["deep-a"])}, deep["deep-a-past-allowance"])
    consensus = _rejected(doc)
    noise = _record_noise(client, doc["id"], deep["deep-a"], deep["deep-a-past-allowance"])
    assert all(pair == (allow + 1, allow + 1) for pair in noise), noise
    verdicts = [v["verdict"] for v in consensus["votes"]]
    print(f"\n{allow + 1} bits flipped per side (allowance {allow}): votes {verdicts}")


def test_copied_reference_signatures_on_a_different_pair_are_voted_invalid(
    client: Any, faulty_inference: FarmWorker, deep: dict[str, Path]
) -> None:
    """Against the registered fingerprint (a reference the forge mode cannot stand in for)."""
    model = register(client, "deep-a", deep["deep-a"], timeout=240)
    assert model["status"] == "ready", model
    doc = _job(client, "deep-a", deep["deep-b-copied"])
    _rejected(doc)
    transcript = client.get(f"/v1/jobs/{doc['id']}/transcript").get_json()
    # The stored records claim a copy: every distance 0, the transcript's own verdict SAME.
    assert transcript["decision"]["verdict"] == "SAME", transcript["decision"]
    assert all(r["differing_bits"] == 0 for r in transcript["records"])
    noise = _record_noise(client, doc["id"], None, deep["deep-b-copied"])
    assert min(c for _r, c in noise) > _allowance(deep)
    votes = doc["result"]["consensus"]["votes"]
    print(
        f"\ncopied records: candidate sides off by {min(c for _r, c in noise)}.."
        f"{max(c for _r, c in noise)} bits (allowance {_allowance(deep)}): "
        f"{[v['verdict'] for v in votes]}"
    )


def test_simulated_device_noise_is_published_by_cpu_validators(
    client: Any, faulty_inference: FarmWorker, deep: dict[str, Path], farm_env: dict[str, str]
) -> None:
    allow = _allowance(deep)
    doc = _job(client, {"path": str(deep["deep-a"])}, deep["deep-a-device"])
    assert doc["status"] == "succeeded", doc
    assert doc["result"]["verdict"] == "SAME"
    consensus = doc["result"]["consensus"]
    assert consensus["agreed"] is True
    noise = _record_noise(client, doc["id"], deep["deep-a"], deep["deep-a-device"])
    worst = max(max(r or 0, c) for r, c in noise)
    flipped = sum(1 for r, c in noise if (r or 0) + c)
    assert worst <= allow, noise
    assert "device noise" in faulty_inference.log_tail(2_000_000)
    print(
        f"\ndevice noise {DEVICE_EPS:g}: {flipped} of {len(noise)} records off the CPU "
        f"signatures, at most {worst} bits per side (allowance {allow}): SAME published, "
        f"{consensus['agreeing']} of 5 votes"
    )
    assert_drained(farm_env["REDIS_URL"])
