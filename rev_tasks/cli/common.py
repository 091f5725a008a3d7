"""What every ``rev`` command group shares: the user-error type, exit status and arg types."""

from __future__ import annotations

import argparse

EXIT_USAGE = 2


class UserError(Exception):
    """Bad input from the user: printed as one line, exit status 2."""


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1, else a usage error naming the value."""
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from exc
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {value}")
    return value
