"""Every queue and task name of the farm, spelled once.

Celery routes by these strings and workers subscribe to them, so a typo anywhere else is a
job that waits for ever on a queue nobody consumes. Other modules import the names from
here; ``tests/unit/test_queues.py`` checks that no other source file spells them.
"""

from __future__ import annotations

DEFAULT = "default"
INFERENCE_CPU = "inference.cpu"
CONSENSUS = "consensus"
MAINTENANCE = "maintenance"
# Black-box jobs: I/O-bound, consumed by a threads pool, never by a prefork inference child.
ENDPOINT = "endpoint"

_GPU_PREFIX = "inference.cuda"


def gpu_queue(index: int) -> str:
    """The queue of the GPU with host index ``index`` (one pinned worker consumes it)."""
    if index < 0:
        raise ValueError(f"GPU index must be >= 0, got {index}")
    return f"{_GPU_PREFIX}{index}"


def gpu_queues(count: int) -> list[str]:
    return [gpu_queue(i) for i in range(count)]


def is_gpu_queue(name: str) -> bool:
    return name.startswith(_GPU_PREFIX) and name[len(_GPU_PREFIX) :].isdigit()


def gpu_index(name: str) -> int:
    """The device index of a GPU queue name (``ValueError`` for any other name)."""
    if not is_gpu_queue(name):
        raise ValueError(f"{name!r} is not a GPU queue")
    return int(name[len(_GPU_PREFIX) :])


#: The queues every farm declares, whatever its GPUs (GPU queues come from REV_GPU_COUNT).
BASE_QUEUES: tuple[str, ...] = (DEFAULT, INFERENCE_CPU, CONSENSUS, MAINTENANCE)
#: What a single all-in-one worker consumes (tests, benchmarks, the local stack's CPU side),
#: and the queues that need a live consumer for a CPU job to finish (``REV_REQUIRED_QUEUES``).
CPU_WORKER_QUEUES: tuple[str, ...] = (INFERENCE_CPU, CONSENSUS, DEFAULT, MAINTENANCE)
#: What a validators worker consumes (``rev worker --consensus``, the local stack's second worker).
CONSENSUS_WORKER_QUEUES: tuple[str, ...] = (CONSENSUS, DEFAULT, MAINTENANCE)
#: What an endpoint worker consumes (``celery -A rev_tasks worker -Q endpoint -P threads``).
ENDPOINT_WORKER_QUEUES: tuple[str, ...] = (ENDPOINT,)


def declared_queues(gpu_count: int) -> list[str]:
    """Every queue a farm with ``gpu_count`` GPU queues declares, in ``celeryconfig`` order."""
    return [DEFAULT, INFERENCE_CPU, *gpu_queues(gpu_count), CONSENSUS, MAINTENANCE, ENDPOINT]


def prepare_task_id(job_id: str) -> str:
    """The ``prepare`` task's id, derived from the job (a cancel revokes it by this id)."""
    return f"prepare-{job_id}"


def inference_task_id(job_id: str) -> str:
    """The inference task's id, derived from the job: Flower and ``AsyncResult`` find it.

    A redelivered ``prepare`` sends the same id again, which is harmless: the task is
    idempotent and the result backend keeps one state per id.
    """
    return f"inference-{job_id}"


class Task:
    """Registered task names (``rev_tasks.<module>.<name>``).

    A name outlives a module rename: messages already queued under it must still find
    their task. ``FINGERPRINT`` is registered by ``rev_tasks.tasks.registration``.
    """

    PREPARE = "rev_tasks.tasks.verify.prepare"
    RUN_INFERENCE = "rev_tasks.tasks.verify.run_inference"
    #: An endpoint job's queries (verify or identify), on the ``endpoint`` queue.
    RUN_ENDPOINT = "rev_tasks.tasks.endpoint.run_endpoint"
    FINGERPRINT = "rev_tasks.tasks.models.fingerprint"
    VALIDATE = "rev_tasks.tasks.consensus.validate"
    TALLY = "rev_tasks.tasks.consensus.tally"
    CONSENSUS_FAILED = "rev_tasks.tasks.consensus.consensus_failed"
    CERTIFY = "rev_tasks.tasks.consensus.certify"
    WATCHDOG = "rev_tasks.tasks.maintenance.watchdog"
    BACKUP = "rev_tasks.tasks.maintenance.backup"
