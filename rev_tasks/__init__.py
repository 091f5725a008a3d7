"""REV Farm: behavioural model-identity verification.

The package root imports nothing heavy: ``rev_tasks.core`` stays usable without Celery,
Flask, torch or a database. The Celery app lives in ``rev_tasks.celery`` (so that
``celery -A rev_tasks`` finds it) and is imported only by processes that need it.
"""

__version__ = "0.1.0"
