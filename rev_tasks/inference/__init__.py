"""Model loading and activation capture with transformers (torch; no celery)."""

from rev_tasks.inference.loader import (
    DTYPES,
    LoadedModel,
    ModelLoadError,
    default_sites,
    load_model,
)
from rev_tasks.inference.signatures import DEFAULT_BITS, projection, site_signatures

__all__ = [
    "DEFAULT_BITS",
    "DTYPES",
    "LoadedModel",
    "ModelLoadError",
    "default_sites",
    "load_model",
    "projection",
    "site_signatures",
]
