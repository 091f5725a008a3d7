"""The ``rev`` console script: one module per command group, each listed in ``COMMANDS``.

A command group is a module with ``add_commands(subparsers)``, which adds its sub-commands
and sets ``func`` on each (``func(args) -> exit status``). Adding a group is one new module
and one line in ``COMMANDS``. The modules are imported at the top on purpose: one that cannot
be imported stops ``rev`` with its own ImportError, instead of its commands vanishing into
"invalid choice". Every user error ends as one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from types import ModuleType

from rev_tasks.cli import (
    backup,
    credentials,
    endpoint,
    farm,
    health,
    keys,
    report,
    verify,
    worker,
)
from rev_tasks.cli.common import EXIT_USAGE, UserError
from rev_tasks.inference.loader import ModelLoadError

#: Command groups in the order ``rev --help`` lists them.
COMMANDS: tuple[ModuleType, ...] = (
    verify,  # verify (also --endpoint), fingerprint, audit (in-process)
    endpoint,  # identify (an OpenAI-compatible endpoint against local references)
    farm,  # submit, status, wait, cancel, jobs, models (HTTP client of the coordinator)
    report,  # report (over HTTP), certificate verify|issue|keygen
    keys,  # keys create|list|revoke|ensure-dev (on DATABASE_URL)
    credentials,  # credentials set|list|delete (over HTTP), keygen, rekey (on DATABASE_URL)
    worker,  # worker --cpu|--gpu N|--consensus
    backup,  # backup now|list, restore
    health,  # health
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rev", description="REV Farm: verify that a model is the model it claims to be."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for group in COMMANDS:
        group.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (UserError, ModelLoadError, ValueError, OSError) as exc:
        print(f"rev: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("rev: interrupted", file=sys.stderr)
        return 130
