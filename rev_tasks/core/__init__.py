"""Pure REV maths: numpy and hashlib only (no torch, celery, flask or sqlalchemy).

The submodules are the contract in docs/architecture.md; the most used names are
re-exported here for convenience. The hamming functions are deliberately not re-exported:
a package attribute ``hamming`` would shadow the ``rev_tasks.core.hamming`` module.
"""

from rev_tasks.core.challenges import Challenge, commitment, generate_challenges
from rev_tasks.core.decision import TOLERANCES, Decision, SequentialTest, decide
from rev_tasks.core.keys import DEMO_KEY, derive, key_id, load_key
from rev_tasks.core.merkle import inclusion_proof, merkle_root, verify_inclusion
from rev_tasks.core.transcript import Record, audit, build_transcript

__all__ = [
    "DEMO_KEY",
    "TOLERANCES",
    "Challenge",
    "Decision",
    "Record",
    "SequentialTest",
    "audit",
    "build_transcript",
    "commitment",
    "decide",
    "derive",
    "generate_challenges",
    "inclusion_proof",
    "key_id",
    "load_key",
    "merkle_root",
    "verify_inclusion",
]
