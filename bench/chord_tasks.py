"""Trivial tasks for the consensus benchmark's baseline chord (loaded with ``celery -I``).

The baseline is a chord of five tasks that do nothing, into a body that does nothing, on
the same queue, worker and Redis backend as the real five-validator chord: what is left of
the real chord's time after subtracting it is the validators' own work.
"""

from __future__ import annotations

from rev_tasks.celery import app


@app.task(name="bench.chord_tasks.noop")
def noop(i: int = 0) -> int:
    """A header task: returns at once."""
    return i


@app.task(name="bench.chord_tasks.done")
def done() -> str:
    """The body (an immutable signature, like the real ``tally.si``)."""
    return "done"
