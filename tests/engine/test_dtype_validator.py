"""A validator re-executes in the job's dtype and says so: real models, a real SQLite farm
database, the consensus task's own check (``consensus._check``)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rev_tasks import jobs, modelcache
from rev_tasks.db import session as db
from rev_tasks.db.tables import Base, Transcript, pack_json
from rev_tasks.engine import Verification, VerifyParams
from rev_tasks.inference import load_model
from rev_tasks.queues import INFERENCE_CPU
from rev_tasks.settings import reset_settings
from rev_tasks.tasks.consensus import _check

NONCE = bytes(range(32, 64))


@pytest.fixture
def farm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_gpt2: dict[str, Path], key_file: Path
) -> Iterator[None]:
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path / 'farm.db'}")
    monkeypatch.setenv("REV_MODEL_ROOTS", str(tiny_gpt2["a"].parent))
    monkeypatch.setenv("REV_SECRET_KEY_FILE", str(key_file))
    reset_settings()
    db.dispose_engine()
    modelcache.reset()
    Base.metadata.create_all(db.get_engine())
    yield
    db.dispose_engine()
    modelcache.reset()
    monkeypatch.undo()
    reset_settings()


def _decided_job(paths: dict[str, Path], key: bytes, request: dict[str, Any]) -> str:
    """A fp16 verification of the tiny GPT-2 pair, stored as a decided job with ``request``."""
    ref, cand = (load_model(paths[k], dtype="float16") for k in ("a", "a_copy"))
    out = Verification(ref, cand, key, VerifyParams(max_challenges=8), nonce=NONCE).run()
    assert out.result["verdict"] == "SAME"
    job_id = str(uuid.uuid4())
    with db.session_scope() as s:
        s.add(
            jobs.new_job(
                id=job_id,
                tenant="t",
                kind="verify",
                request=request,
                device="cpu",
                queue=INFERENCE_CPU,
                reference_path=str(paths["a"]),
                candidate_path=str(paths["a_copy"]),
                commitment=out.transcript["committed_root"],
                challenge_nonce=NONCE.hex(),
            )
        )
        s.flush()
        s.add(
            Transcript(
                job_id=job_id,
                root=out.transcript["root"],
                verdict="SAME",
                outcome=out.result,
                doc=pack_json(out.transcript),
            )
        )
    return job_id


def test_the_validator_runs_the_jobs_dtype_and_refuses_another(
    farm: None, tiny_gpt2: dict[str, Path], key_file: Path
) -> None:
    key = key_file.read_bytes()
    genuine = _decided_job(tiny_gpt2, key, {"dtype": "float16"})
    executed: dict[str, Any] = {}
    verdict, _root, problems, drawn = _check(genuine, 0, executed)
    assert (verdict, problems, len(drawn)) == ("SAME", [], 2)
    assert executed == {"device": "cpu", "dtype": "float16"}
    # A transcript computed in fp16 for a job that asked for float32 (the default).
    other = _decided_job(tiny_gpt2, key, {})
    executed = {}
    _verdict, _root, problems, _drawn = _check(other, 1, executed)
    assert executed["dtype"] == "float32"
    assert (
        "re-execution: the transcript's candidate ran in float16, the job asks for float32"
        in problems
    ), problems
