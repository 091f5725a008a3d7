"""How unpredictable one challenge is: the template catalogue's entropy, measured.

``python -m bench.challenge_entropy [--draws N] [--json]`` prints, per template, the number
of distinct prompts it renders (frames included) and its bits, then the catalogue's figures:
Shannon entropy of one challenge (templates and slots are drawn uniformly), log2 of all
distinct prompts, the chance that two 64-challenge jobs share a prompt (exact, from the
collision probability), and a sampled check: N nonce challenges under a random key, how many
distinct prompts they gave against what the exact distribution predicts.
"""

from __future__ import annotations

import argparse
import json
import math
import secrets
from typing import Any

from rev_tasks.core.challenges import (
    FRAMES,
    NONCE_BYTES,
    TEMPLATES,
    distinct_prompts,
    entropy_bits,
    nonce_challenges,
)


def collision_probability() -> float:
    """P(two independent challenges have the same prompt), prompts of different templates
    being different (each template's text differs from every other's)."""
    t = len(TEMPLATES)
    return sum((1 / t) ** 2 / distinct_prompts(tm) for tm in TEMPLATES)


def measure(draws: int) -> dict[str, Any]:
    e = entropy_bits()
    q = collision_probability()
    key = secrets.token_bytes(32)
    prompts = {c.prompt for c in nonce_challenges(key, secrets.token_bytes(NONCE_BYTES), draws)}
    # Expected distinct values among `draws` samples: sum over prompts of 1 - (1 - p)^draws.
    expected = sum(
        (1 - (1 - 1 / (len(TEMPLATES) * distinct_prompts(tm))) ** draws) * distinct_prompts(tm)
        for tm in TEMPLATES
    )
    return {
        "templates": {
            tm.id: {
                "prompts": distinct_prompts(tm),
                "bits": round(math.log2(distinct_prompts(tm)), 2),
            }
            for tm in TEMPLATES
        },
        "frame_bits": round(sum(math.log2(len(f)) for f in FRAMES), 2),
        # The catalogue as it was before the frames (templates and slots only).
        "without_frames": sum(math.prod(len(v) for _, v in tm.slots) for tm in TEMPLATES),
        "templates_count": len(TEMPLATES),
        "distinct_prompts": sum(distinct_prompts(tm) for tm in TEMPLATES),
        "log2_distinct": round(e["log2_distinct"], 2),
        "shannon_bits_per_challenge": round(e["shannon_bits"], 2),
        "min_template_bits": round(e["min_template_bits"], 2),
        "collision_bits": round(-math.log2(q), 2),
        "p_two_64_jobs_share_a_prompt": 64 * 64 * q,
        "sampled": {"draws": draws, "distinct": len(prompts), "expected": round(expected, 1)},
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--draws", type=int, default=100_000)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    out = measure(args.draws)
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    for tid, t in out["templates"].items():
        print(f"{tid:32s} {t['prompts']:>12,d} prompts  {t['bits']:6.2f} bits")
    print(f"frames (opener, format, closer, sign-off): {out['frame_bits']} bits on every template")
    w = out["without_frames"]
    print(f"without the frames: {w:,d} distinct prompts = {math.log2(w):.2f} bits")
    print(
        f"catalogue: {out['templates_count']} templates, {out['distinct_prompts']:,d} distinct "
        f"prompts = {out['log2_distinct']} bits; Shannon entropy of one challenge "
        f"{out['shannon_bits_per_challenge']} bits (smallest template {out['min_template_bits']})"
    )
    print(
        f"collision entropy {out['collision_bits']} bits: two 64-challenge jobs share a prompt "
        f"with probability {out['p_two_64_jobs_share_a_prompt']:.2e}"
    )
    s = out["sampled"]
    print(
        f"sampled: {s['draws']:,d} challenges gave {s['distinct']:,d} distinct prompts "
        f"(expected {s['expected']:,.1f})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
