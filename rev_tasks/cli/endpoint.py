"""``rev verify REFERENCE --endpoint URL ...`` and ``rev identify --endpoint URL REF...``.

The candidate is a model behind an OpenAI-compatible endpoint (rev_tasks/endpoints). The
endpoint's API key is read from the environment variable named by ``--api-key-env``; it is
never printed, logged or written to a transcript.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rev_tasks.cli.common import UserError, positive_int
from rev_tasks.core.blackbox import ENDPOINT_TOLERANCES
from rev_tasks.core.keys import load_key

MODES = ("logprobs", "text")


def add_endpoint_options(p: argparse.ArgumentParser) -> None:
    """The options that turn the candidate into an endpoint (``rev verify`` and ``identify``)."""
    p.add_argument(
        "--endpoint", help="OpenAI-compatible base URL of the candidate, e.g. http://h:8000/v1"
    )
    p.add_argument("--endpoint-model", help="the model name the endpoint serves")
    p.add_argument("--mode", choices=MODES, default="logprobs", help="endpoint evidence")
    p.add_argument("--api-key-env", metavar="VAR", help="environment variable holding the API key")
    p.add_argument(
        "--endpoint-tolerance",
        choices=tuple(ENDPOINT_TOLERANCES),
        default="weights",
        help="logprobs mode: 'weights' (f32/f16 of the reference) or 'quantised'",
    )
    p.add_argument(
        "--max-queries", type=positive_int, help="budget (default 64 logprobs, 300 text)"
    )
    p.add_argument("--in-flight", type=positive_int, default=4, help="requests in flight at most")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per request")


def _client(args: argparse.Namespace) -> Any:
    from rev_tasks.endpoints.client import EndpointClient

    if not args.endpoint_model:
        raise UserError("--endpoint needs --endpoint-model NAME")
    key = None
    if args.api_key_env:
        key = os.environ.get(args.api_key_env)
        if not key:
            raise UserError(f"environment variable {args.api_key_env} is not set or empty")
    return EndpointClient(
        args.endpoint,
        args.endpoint_model,
        api_key=key,
        timeout_s=args.timeout,
        max_in_flight=args.in_flight,
    )


#: Format names, without importing the endpoint package (httpx) to tell files apart.
WHITEBOX_FINGERPRINT = "rev-fingerprint/1"
ENDPOINT_FINGERPRINT = "rev-endpoint-fingerprint/1"


def file_kind(path: str) -> str | None:
    """What a reference file is (from its JSON format field): "endpoint-fingerprint",
    "whitebox-fingerprint", or None for anything else (a folder, another file)."""
    p = Path(path)
    if not p.is_file():
        return None
    try:
        with p.open(encoding="utf-8") as fh:
            head = fh.read(200)
    except (OSError, UnicodeDecodeError):
        return None
    if ENDPOINT_FINGERPRINT in head:
        return "endpoint-fingerprint"
    if WHITEBOX_FINGERPRINT in head:
        return "whitebox-fingerprint"
    return None


def load_fingerprint_reference(path: str, key: bytes) -> Any:
    """An endpoint fingerprint checked against this key; a clear refusal otherwise."""
    from rev_tasks.endpoints.fingerprint import FingerprintError, FingerprintReference

    try:
        ref = FingerprintReference.load(path)
        ref.check_key(key)
    except FingerprintError as exc:
        raise UserError(str(exc)) from exc
    return ref


def _reference(path: str, key: bytes) -> Any:
    """A reference for an endpoint: a model folder or an endpoint fingerprint."""
    kind = file_kind(path)
    if kind == "endpoint-fingerprint":
        return load_fingerprint_reference(path, key)
    if kind == "whitebox-fingerprint":
        raise UserError(
            f"{path} is a white-box fingerprint (hidden-state signatures), which an endpoint "
            "cannot be compared with: make an endpoint fingerprint with "
            "`rev fingerprint MODEL -o FP.json --endpoint-evidence`"
        )
    if not Path(path).is_dir():
        raise UserError(
            "endpoint verification needs the reference's weights (a model folder) or an "
            f"endpoint fingerprint: {path}"
        )
    from rev_tasks.endpoints.reference import Reference

    return Reference(path)


def _params(args: argparse.Namespace) -> Any:
    from rev_tasks.endpoints.verify import EndpointParams

    return EndpointParams(
        mode=args.mode,
        tolerance=args.endpoint_tolerance,
        alpha=args.alpha,
        max_queries=args.max_queries,
        batch=args.in_flight,
    )


def _against_endpoint(
    args: argparse.Namespace, key: bytes, paths: list[str], run: Callable[[list[Any], Any], Any]
) -> Any:
    """``run(references, client)`` against the endpoint; None (after one line on stderr)
    when the endpoint failed.

    Fingerprint files are read first: cheap, and a bad one is refused before anything
    connects. The endpoint is asked for its model list before any reference folder loads.
    """
    from rev_tasks.endpoints.client import EndpointError
    from rev_tasks.endpoints.fingerprint import FingerprintError

    try:
        early = {p: _reference(p, key) for p in paths if file_kind(p) is not None}
    except FingerprintError as exc:
        raise UserError(str(exc)) from exc
    client = _client(args)
    try:
        client.check_model()  # fail fast, before loading a reference folder
        refs = [early[p] if p in early else _reference(p, key) for p in paths]
        return run(refs, client)
    except FingerprintError as exc:
        raise UserError(str(exc)) from exc
    except EndpointError as exc:
        print(f"rev: error: {exc}", file=sys.stderr)
        return None
    finally:
        client.close()


def cmd_verify_endpoint(args: argparse.Namespace) -> int:
    from rev_tasks.endpoints.verify import verify_endpoint

    if args.candidate:
        raise UserError("give either a candidate folder or --endpoint, not both")
    key = load_key(args.key_file)
    outcome = _against_endpoint(
        args, key, [args.reference], lambda refs, c: verify_endpoint(refs[0], c, key, _params(args))
    )
    if outcome is None:
        return 1
    result = dict(outcome.result)
    if args.transcript:
        Path(args.transcript).write_text(json.dumps(outcome.transcript, indent=1) + "\n")
        result["transcript"] = str(args.transcript)
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        c = result["cost"]
        print(f"verdict:     {result['verdict']}")
        print(f"reason:      {result['reason']}")
        print(
            f"queries:     {result['queries_used']} of {result['queries_max']} ({result['mode']} mode, alpha {result['alpha']})"
        )
        print(f"endpoint:    {result['endpoint']['url']} model {result['endpoint']['model']}")
        print(f"tokenizer:   {result['tokenization']}")
        print(
            f"cost:        {c['requests']} requests ({c['retries']} retries), "
            f"{c['prompt_tokens']} prompt + {c['completion_tokens']} completion tokens, {c['elapsed_s']} s"
        )
        print(f"transcript:  root {result['transcript_root']}")
    return 0


def cmd_identify(args: argparse.Namespace) -> int:
    from rev_tasks.endpoints.verify import identify_endpoint

    if not args.endpoint:
        raise UserError("identify needs --endpoint URL and --endpoint-model NAME")
    key = load_key(args.key_file)
    paths = list(args.references)
    out = _against_endpoint(
        args,
        key,
        paths,
        lambda refs, c: identify_endpoint(
            dict(zip(paths, refs, strict=True)), c, key, _params(args)
        ),
    )
    if out is None:
        return 1
    if args.json:
        print(json.dumps(out, sort_keys=True))
        return 0
    for i, row in enumerate(out["ranking"], 1):
        print(f"{i}. {row['verdict']:<9} {row['reference']} ({row['queries_used']} queries)")
    print(
        "match: none of these" if out["none_of_these"] else f"match: {out['match'] or 'undecided'}"
    )
    return 0


def add_commands(sub: Any) -> None:
    """Add ``identify`` (an endpoint against several references)."""
    i = sub.add_parser("identify", help="which of these references does an endpoint serve?")
    i.add_argument("references", nargs="+", help="reference model folders or endpoint fingerprints")
    i.add_argument("--alpha", type=float, default=0.01)
    i.add_argument("--key-file", help="secret challenge key (default: the public demo key)")
    i.add_argument("--json", action="store_true")
    add_endpoint_options(i)
    i.set_defaults(func=cmd_identify)
