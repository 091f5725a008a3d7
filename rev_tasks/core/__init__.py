"""Pure REV maths: numpy and hashlib only (no torch, celery, flask or sqlalchemy)."""
