"""Thin Celery tasks: unpack ids, open a session, call the engine, persist, map errors.

Modules: ``verify`` (prepare → inference), ``consensus`` (validate ×5 → tally),
``registration`` (fingerprint a registered model), ``maintenance`` (beat housekeeping). Task
names come from :class:`rev_tasks.queues.Task` and are routed in ``celeryconfig``.
"""
