"""``rev verify``, ``rev fingerprint``, ``rev audit``: in-process, no broker or database.

torch and transformers load only when a command runs a model (the loaders import them then);
the streamed engine imports torch at once, so it is imported only for ``--memory-budget``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from rev_tasks.cli.common import UserError, positive_int
from rev_tasks.cli.endpoint import add_endpoint_options, cmd_verify_endpoint, file_kind
from rev_tasks.core.keys import load_key
from rev_tasks.core.transcript import audit, audit_challenges
from rev_tasks.engine import (
    Verification,
    VerifyParams,
    fingerprint_model,
    load_fingerprint,
    looks_like_fingerprint,
)
from rev_tasks.inference.budget import memory_budget_arg
from rev_tasks.inference.loader import DTYPES, load_model

# The endpoint transcript's format name, without importing httpx for white-box commands.
ENDPOINT_FORMAT = "rev-endpoint-transcript/1"


def _progress_printer(enabled: bool, label: str) -> Any:
    if not enabled:
        return None
    start = time.monotonic()

    def show(done: int, total: int) -> None:
        width = 24
        filled = int(width * done / max(total, 1))
        bar = "#" * filled + "." * (width - filled)
        elapsed = time.monotonic() - start
        sys.stderr.write(f"\r{label} [{bar}] {done}/{total} challenges  {elapsed:5.1f}s")
        sys.stderr.flush()

    return show


def _load(path: str, dtype: str, device: str) -> Any:
    return load_model(path, dtype=dtype, device=device)


def _read_key(path: str | None) -> bytes:
    try:
        return load_key(path)
    except FileNotFoundError as exc:
        raise UserError(f"key file not found: {path}") from exc


def cmd_verify(args: argparse.Namespace) -> int:
    if args.endpoint:
        return cmd_verify_endpoint(args)
    if not args.candidate:
        raise UserError("verify needs a candidate model folder, or --endpoint URL")
    if file_kind(args.reference) == "endpoint-fingerprint":
        raise UserError(
            f"{args.reference} is an endpoint fingerprint (next-token log-probabilities only): "
            "it verifies endpoints (--endpoint URL); white-box verification needs a model "
            "folder or a `rev fingerprint` made without --endpoint-evidence"
        )
    key = _read_key(args.key_file)
    params = VerifyParams(
        tolerance=args.tolerance,
        alpha=args.alpha,
        max_challenges=args.max_challenges,
        batch_size=args.batch_size,
        bits=args.bits,
    )
    budget_mb = args.memory_budget
    reference: Any
    if os.path.isfile(args.reference) and looks_like_fingerprint(args.reference):
        reference = load_fingerprint(args.reference)
    else:
        reference = _load_side(args.reference, args, budget_mb)
    candidate = _load_side(args.candidate, args, budget_mb)
    show = _progress_printer(not args.json and sys.stderr.isatty(), "verifying")
    outcome = Verification(reference, candidate, key, params, nonce=_nonce(args.nonce)).run(show)
    if show:
        sys.stderr.write("\n")
    if args.transcript:
        Path(args.transcript).write_text(json.dumps(outcome.transcript, indent=1) + "\n")
    result = dict(outcome.result)
    if args.transcript:
        result["transcript"] = str(args.transcript)
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        d = result["distances"]
        mean = "n/a" if d["mean"] is None else f"{d['mean']:.6f}"
        print(f"verdict:     {result['verdict']}")
        print(f"reason:      {result['reason']}")
        print(
            f"challenges:  {result['challenges_used']} of {result['challenges_max']} "
            f"(tolerance {result['tolerance']}, alpha {result['alpha']})"
        )
        print(f"distance:    mean {mean} over {d['count']} challenges; sites {result['sites']}")
        cal = result.get("calibration")
        if cal is not None:
            print(
                f"threshold:   delta {result['delta']:.6f} from the reference's own fp16/bf16 "
                f"casts on {cal['challenges']} calibration challenges (margin {cal['margin']})"
            )
        print(f"transcript:  root {result['transcript_root']}")
        for note in result["notes"]:
            print(f"note:        {note}")
    return 0


def _nonce(text: str | None) -> bytes | None:
    """``--nonce``: a farm job's challenge nonce (its transcript's ``challenge_nonce``)."""
    from rev_tasks.core.challenges import NONCE_BYTES

    if text is None:
        return None
    try:
        nonce = bytes.fromhex(text)
    except ValueError:
        nonce = b""
    if len(nonce) != NONCE_BYTES:
        raise UserError(f"--nonce must be {2 * NONCE_BYTES} hex digits")
    return nonce


def _load_side(path: str, args: argparse.Namespace, budget_mb: int | None) -> Any:
    if budget_mb:
        from rev_tasks.inference.streaming import load_streamed  # torch, at import

        return load_streamed(path, memory_budget_mb=budget_mb, dtype=args.dtype, device=args.device)
    return _load(path, args.dtype, args.device)


def cmd_fingerprint(args: argparse.Namespace) -> int:
    key = _read_key(args.key_file)
    if args.endpoint_evidence:
        return _endpoint_fingerprint(args, key)
    model = _load(args.model, args.dtype, args.device)
    show = _progress_printer(sys.stderr.isatty(), "fingerprinting")
    doc = fingerprint_model(model, key, n=args.challenges, bits=args.bits, progress=show)
    if show:
        sys.stderr.write("\n")
    Path(args.output).write_text(json.dumps(doc) + "\n")
    print(
        f"wrote {args.output}: {len(doc['signatures'])} challenges, sites {doc['sites']}, "
        f"commitment {doc['challenge_commitment']}"
    )
    return 0


def _endpoint_fingerprint(args: argparse.Namespace, key: bytes) -> int:
    """``rev fingerprint MODEL -o FP --endpoint-evidence``: what endpoint verification needs."""
    from rev_tasks.endpoints.fingerprint import make_endpoint_fingerprint
    from rev_tasks.endpoints.reference import Reference

    if not Path(args.model).is_dir():
        raise UserError(f"an endpoint fingerprint needs the model folder: {args.model}")
    reference = Reference(args.model)
    doc = make_endpoint_fingerprint(reference, key, n=args.challenges, top_k=args.top_k)
    Path(args.output).write_text(json.dumps(doc) + "\n")
    print(
        f"wrote {args.output}: endpoint evidence for {doc['challenges']} challenges, "
        f"top {doc['top_k']} tokens, BOS variants {', '.join(doc['rows'])}, "
        f"commitment {doc['challenge_commitment']}"
    )
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    try:
        doc = json.loads(Path(args.transcript).read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise UserError(f"transcript not found: {args.transcript}") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"transcript is not JSON: {args.transcript}: {exc}") from exc
    if isinstance(doc, dict) and doc.get("format") == ENDPOINT_FORMAT:
        from rev_tasks.endpoints.transcript import audit_endpoint

        problems = audit_endpoint(doc)
    else:
        problems = audit(doc)
        if args.key_file:  # with the farm key: the committed set is the one the job derives
            problems += audit_challenges(doc, _read_key(args.key_file))
    if args.json:
        print(json.dumps({"valid": not problems, "problems": problems}))
    elif problems:
        print(f"INVALID transcript {args.transcript}:")
        for p in problems:
            print(f"  - {p}")
    else:
        decision = doc.get("decision", {})
        used = decision.get("challenges_used", decision.get("queries_used"))
        print(
            f"valid transcript: root {doc.get('root')}, {len(doc.get('records', []))} records, "
            f"verdict {decision.get('verdict')} after {used} challenges"
        )
    return 1 if problems else 0


def _model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--key-file", help="secret challenge key (default: the public demo key)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="compute dtype")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--bits", type=positive_int, default=4096, help="signature bits per site")


def add_commands(sub: Any) -> None:
    """Add ``verify``, ``fingerprint`` and ``audit`` to the ``rev`` parser."""
    v = sub.add_parser("verify", help="compare two models in-process")
    v.add_argument("reference", help="reference model folder or fingerprint file")
    v.add_argument("candidate", nargs="?", help="candidate model folder (or --endpoint)")
    v.add_argument("--tolerance", choices=("exact", "precision"), default="exact")
    v.add_argument("--alpha", type=float, default=0.01)
    v.add_argument("--max-challenges", type=positive_int, default=64)
    v.add_argument("--batch-size", type=positive_int, default=8)
    v.add_argument(
        "--memory-budget", type=memory_budget_arg, help="stream layers within e.g. 512MB"
    )
    v.add_argument("--transcript", help="write the auditable transcript here")
    v.add_argument(
        "--nonce",
        help="challenge nonce (hex) of a farm job: re-run the job's own challenges",
    )
    v.add_argument("--json", action="store_true", help="one JSON object on stdout")
    _model_options(v)
    add_endpoint_options(v)
    v.set_defaults(func=cmd_verify)

    f = sub.add_parser("fingerprint", help="store a reference model's signatures")
    f.add_argument("model")
    f.add_argument("-o", "--output", required=True)
    f.add_argument("--challenges", type=positive_int, default=64)
    f.add_argument(
        "--endpoint-evidence",
        action="store_true",
        help="store the next-token evidence endpoint verification needs (rev verify FP "
        "--endpoint URL), instead of hidden-state signatures",
    )
    f.add_argument(
        "--top-k",
        type=positive_int,
        default=128,
        help="with --endpoint-evidence: reference tokens kept per challenge",
    )
    _model_options(f)
    f.set_defaults(func=cmd_fingerprint)

    a = sub.add_parser("audit", help="check a transcript: root, proofs, distances, decision")
    a.add_argument("transcript")
    a.add_argument("--json", action="store_true")
    a.add_argument(
        "--key-file",
        help="the farm key: also re-derive the job's challenges and its committed root",
    )
    a.set_defaults(func=cmd_audit)
