"""Operations: backups, health checks, metrics-process plumbing.

Nothing here imports Celery, Flask or torch at module level, so ``rev backup`` and
``rev health`` start fast and work on a host that only has the database client tools.
"""
