"""What every ``rev`` command group shares: the user-error type, exit status and arg types."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

EXIT_USAGE = 2
#: The coordinator refused the request or could not be reached / a wait ran out.
EXIT_REQUEST, EXIT_TIMEOUT = 2, 3


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


def over_http(fn: Callable[[argparse.Namespace, Any], Any]) -> Callable[[argparse.Namespace], int]:
    """A sub-command that talks to the coordinator: given a ``FarmClient`` for ``--api-url``;
    a refused or failed request, or a wait that ran out, is one line on stderr and an exit
    status, never a traceback."""
    from rev_tasks.client import ClientError, FarmClient

    def wrapper(args: argparse.Namespace) -> int:
        try:
            return int(fn(args, FarmClient(args.api_url)) or 0)
        except ClientError as exc:
            print(f"rev: {exc}", file=sys.stderr)
            return EXIT_REQUEST
        except TimeoutError as exc:
            print(f"rev: {exc}", file=sys.stderr)
            return EXIT_TIMEOUT

    return wrapper
