"""Black-box REV: verify a model served behind an OpenAI-compatible endpoint (docs/endpoints.md)."""
