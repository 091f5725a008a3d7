"""Model loading and activation capture with transformers (torch; no celery)."""
