"""Thin Celery tasks: unpack ids, open a session, call the engine, persist, map errors.

Modules: ``verify`` (prepare → inference), ``consensus`` (validate ×5 → tally), ``models``
(fingerprint a registered model), ``maintenance`` (beat housekeeping). Task names are
``rev_tasks.tasks.<module>.<name>`` and routed in ``celeryconfig``.
"""
