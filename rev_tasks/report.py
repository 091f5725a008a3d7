"""A job's report: the data a person reads and its charts as inline SVG.

Pure: a job document (as ``GET /v1/jobs/<id>`` returns it), its transcript and, when there
is one, its certificate in; plain dicts and SVG strings out. The coordinator's report page
and ``rev report -o FILE`` render the same data with the same template. The sequential
statistic is recomputed from the transcript's records with the decision module itself, so
the chart shows the path the verdict rests on, not a copy of it.

Colours are the Okabe–Ito palette (distinguishable with the common colour-vision
deficiencies); every series also differs by shape or dash, and every chart has a table.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Mapping, Sequence
from datetime import datetime
from html import escape
from typing import Any

import numpy as np

from rev_tasks.core.decision import TOLERANCES, SequentialTest, ToleranceSpec
from rev_tasks.core.hamming import hamming

# Okabe & Ito (2008), "Color Universal Design".
BLUE, VERMILLION, GREEN, ORANGE, SKY, PURPLE, GREY = (
    "#0072B2",
    "#D55E00",
    "#009E73",
    "#E69F00",
    "#56B4E9",
    "#CC79A7",
    "#555555",
)
# Result fields an endpoint (black-box) job reports; shown whenever a result has them.
ENDPOINT_FIELDS = ("endpoint", "queries", "tokens", "usage", "cost")

W, H = 760, 300
ML, MR, MT, MB = 72, 150, 18, 52  # margins: the right one holds the threshold labels


# ----------------------------------------------------------------------------- numbers
def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values covering [lo, hi] (1, 2, 2.5, 5 × 10^k steps)."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / max(1, count)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step + 1e-9) * step
    ticks = []
    t = start
    while t <= hi + step * 1e-6:
        ticks.append(round(t, 12))
        t += step
    return ticks


def _decimals(ticks: Sequence[float]) -> int:
    """Fewest decimals that print every tick exactly."""
    for d in range(7):
        if all(abs(round(t, d) - t) < 1e-9 for t in ticks):
            return d
    return 6


def _fmt(v: float, decimals: int) -> str:
    return f"{v:.{decimals}f}".replace("-", "\u2212")


def _duration(a: str | None, b: str | None) -> str | None:
    if not a or not b:
        return None
    try:
        t0 = datetime.fromisoformat(a.replace("Z", "+00:00"))
        t1 = datetime.fromisoformat(b.replace("Z", "+00:00"))
    except ValueError:
        return None
    s = (t1 - t0).total_seconds()
    if s < 0:
        return None
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min"


# ----------------------------------------------------------------------------- charts
class _Plot:
    """One x/y chart: linear axes, ticks, gridlines and labels; series are added as SVG."""

    def __init__(
        self,
        xr: tuple[float, float],
        yr: tuple[float, float],
        title: str,
        xlabel: str,
        ylabel: str,
        css: str,
        xticks: Sequence[float] | None = None,
    ) -> None:
        self.x0, self.x1 = xr
        self.y0, self.y1 = yr
        self.parts: list[str] = []
        self.title, self.css = title, css
        pw, ph = W - ML - MR, H - MT - MB
        self.pw, self.ph = pw, ph
        ax = [f'<g class="axes" font-size="12" fill="{GREY}">']
        yt = [t for t in nice_ticks(self.y0, self.y1) if self.y0 - 1e-12 <= t <= self.y1 + 1e-12]
        yd = _decimals(yt)
        for t in yt:
            y = self.y(t)
            ax.append(
                f'<line x1="{ML}" x2="{ML + pw}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>'
                f'<text x="{ML - 8}" y="{y + 4:.1f}" text-anchor="end">'
                f"{_fmt(t, yd)}</text>"
            )
        xt = list(xticks) if xticks is not None else nice_ticks(self.x0, self.x1, 8)
        xd = _decimals(xt)
        for t in xt:
            if not self.x0 - 1e-9 <= t <= self.x1 + 1e-9:
                continue
            x = self.x(t)
            ax.append(
                f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{MT + ph}" y2="{MT + ph + 5}" stroke="{GREY}"/>'
                f'<text x="{x:.1f}" y="{MT + ph + 19}" text-anchor="middle">'
                f"{_fmt(t, xd)}</text>"
            )
        ax.append(
            f'<rect x="{ML}" y="{MT}" width="{pw}" height="{ph}" fill="none" stroke="{GREY}"/>'
            f'<text class="xlabel" x="{ML + pw / 2:.1f}" y="{H - 10}" text-anchor="middle" '
            f'font-size="13" fill="#222">{escape(xlabel)}</text>'
            f'<text class="ylabel" transform="translate(16 {MT + ph / 2:.1f}) rotate(-90)" '
            f'text-anchor="middle" font-size="13" fill="#222">{escape(ylabel)}</text></g>'
        )
        self.parts.extend(ax)

    def x(self, v: float) -> float:
        span = (self.x1 - self.x0) or 1.0
        return ML + (v - self.x0) / span * self.pw

    def y(self, v: float) -> float:
        span = (self.y1 - self.y0) or 1.0
        return MT + self.ph - (v - self.y0) / span * self.ph

    def hline(self, value: float, colour: str, dash: str, label: str, css: str) -> None:
        y = self.y(value)
        self.parts.append(
            f'<g class="{css}" data-value="{value:.6g}">'
            f'<line class="threshold {css}" x1="{ML}" x2="{ML + self.pw}" y1="{y:.1f}" '
            f'y2="{y:.1f}" stroke="{colour}" stroke-width="2" stroke-dasharray="{dash}"/>'
            f'<text x="{ML + self.pw + 6}" y="{y + 4:.1f}" font-size="12" fill="{colour}" '
            f'font-weight="600">{escape(label)}</text></g>'
        )

    def svg(self, desc: str) -> str:
        t = escape(self.title)
        return (
            f'<svg class="chart {self.css}" role="img" viewBox="0 0 {W} {H}" '
            f'width="100%" preserveAspectRatio="xMidYMid meet" '
            f'xmlns="http://www.w3.org/2000/svg" font-family="sans-serif">'
            f"<title>{t}</title><desc>{escape(desc)}</desc>" + "".join(self.parts) + "</svg>"
        )


def _marker(shape: str, x: float, y: float, r: float, colour: str, attrs: str) -> str:
    if shape == "square":
        return (
            f'<rect {attrs} x="{x - r:.1f}" y="{y - r:.1f}" width="{2 * r:.1f}" '
            f'height="{2 * r:.1f}" fill="{colour}"/>'
        )
    return f'<circle {attrs} cx="{x:.1f}" cy="{y:.1f}" r="{r:.1f}" fill="{colour}"/>'


def _radius(n: int) -> float:
    return max(1.6, min(4.5, 260.0 / max(n, 1)))


def _xticks(n: int) -> list[float]:
    return [t for t in nice_ticks(1, max(n, 2), 8) if float(t).is_integer() and t >= 1] or [1.0]


def sprt_chart(path: Sequence[float], lower: float, upper: float, verdict: str | None) -> str:
    """The log-likelihood ratio after each challenge, with the SAME and DIFFERENT thresholds."""
    n = len(path)
    lo = min([lower, *path]) * 1.12
    hi = max([upper, *path]) * 1.12
    p = _Plot(
        (0.5, max(n, 1) + 0.5),
        (lo, hi),
        "Sequential test: log-likelihood ratio per challenge",
        "challenges used",
        "log-likelihood ratio S\u2099",
        "sprt",
        _xticks(n),
    )
    p.hline(upper, VERMILLION, "8 4", f"DIFFERENT \u2265 {upper:.2f}", "threshold-upper")
    p.hline(
        lower, GREEN, "2 4", f"SAME \u2264 {lower:.2f}".replace("-", "\u2212"), "threshold-lower"
    )
    p.parts.append(
        f'<line x1="{ML}" x2="{ML + p.pw}" y1="{p.y(0):.1f}" y2="{p.y(0):.1f}" stroke="#999"/>'
    )
    if n:
        pts = " ".join(f"{p.x(i + 1):.1f},{p.y(s):.1f}" for i, s in enumerate(path))
        p.parts.append(f'<polyline points="{pts}" fill="none" stroke="{BLUE}" stroke-width="2"/>')
        r = _radius(n)
        p.parts.append('<g class="points">')
        for i, s in enumerate(path):
            p.parts.append(
                _marker(
                    "circle",
                    p.x(i + 1),
                    p.y(s),
                    r,
                    BLUE,
                    f'class="point" data-challenge="{i + 1}" data-llr="{s:.6g}"',
                )
            )
        p.parts.append("</g>")
    desc = (
        f"{n} challenges; verdict {verdict}; thresholds {lower:.3f} (SAME) and {upper:.3f} "
        "(DIFFERENT)"
    )
    return p.svg(desc)


def distance_chart(distances: Sequence[float], delta: float, tolerance: str) -> str:
    """Each challenge's distance; points above the tolerance's threshold count as mismatches."""
    n = len(distances)
    top = max([delta, *distances]) * 1.2 or 0.01
    p = _Plot(
        (0.5, max(n, 1) + 0.5),
        (0.0, top),
        "Distance per challenge",
        "challenge",
        "fraction of signature bits that differ",
        "distances",
        _xticks(n),
    )
    p.hline(delta, ORANGE, "6 3", f"\u03b4 = {delta:g} ({tolerance})", "threshold-delta")
    r = _radius(n)
    p.parts.append('<g class="points">')
    for i, d in enumerate(distances):
        over = d > delta
        p.parts.append(
            _marker(
                "square" if over else "circle",
                p.x(i + 1),
                p.y(d),
                r,
                VERMILLION if over else BLUE,
                f'class="point{" mismatch" if over else ""}" data-challenge="{i + 1}" '
                f'data-distance="{d:.6g}"',
            )
        )
    p.parts.append("</g>")
    lx, ly = ML + p.pw + 10, MT + 36
    p.parts.append(
        '<g class="legend" font-size="12" fill="#222">'
        + _marker("square", lx, ly, 4, VERMILLION, 'class="key"')
        + f'<text x="{lx + 10}" y="{ly + 4}">mismatch (d &gt; \u03b4)</text>'
        + _marker("circle", lx, ly + 20, 4, BLUE, 'class="key"')
        + f'<text x="{lx + 10}" y="{ly + 24}">match</text></g>'
    )
    mism = sum(d > delta for d in distances)
    return p.svg(f"{n} challenges, {mism} above the threshold {delta:g}")


def bar_chart(
    labels: Sequence[str],
    values: Sequence[float],
    title: str,
    ylabel: str,
    css: str,
    threshold: tuple[float, str] | None = None,
    highlight: int | None = None,
) -> str:
    """Vertical bars (per site, per ranked model), an optional threshold line."""
    n = len(values)
    top = max([*(values or [0.0]), threshold[0] if threshold else 0.0]) * 1.2 or 0.01
    p = _Plot((0, max(n, 1)), (0.0, top), title, "", ylabel, css, xticks=[])
    slot = p.pw / max(n, 1)
    bw = min(56.0, slot * 0.6)
    for i, (label, v) in enumerate(zip(labels, values, strict=True)):
        x = ML + slot * (i + 0.5)
        colour = BLUE if highlight is None or i == highlight else SKY
        p.parts.append(
            f'<rect class="bar" data-label="{escape(label)}" data-value="{v:.6g}" '
            f'x="{x - bw / 2:.1f}" y="{p.y(v):.1f}" width="{bw:.1f}" '
            f'height="{p.y(0) - p.y(v):.1f}" fill="{colour}"/>'
            f'<text x="{x:.1f}" y="{MT + p.ph + 19}" text-anchor="middle" font-size="12" '
            f'fill="#222">{escape(label[:18])}</text>'
            f'<text class="value" x="{x:.1f}" y="{p.y(v) - 5:.1f}" text-anchor="middle" '
            f'font-size="12" fill="#222">{v:.4f}</text>'
        )
    if threshold is not None:
        p.hline(threshold[0], ORANGE, "6 3", threshold[1], "threshold-delta")
    return p.svg(f"{n} bars")


# ----------------------------------------------------------------------------- evidence
def _spec(params: Mapping[str, Any]) -> ToleranceSpec:
    """The tolerance the transcript was decided under (its own constants, not today's)."""
    name = str(params.get("tolerance", "exact"))
    base = TOLERANCES.get(name, TOLERANCES["exact"])
    return ToleranceSpec(
        name,
        float(params.get("delta", base.delta)),
        float(params.get("p0", base.p0)),
        float(params.get("p1", base.p1)),
        "from transcript",
    )


def _site_distance(a: str, b: str) -> float:
    x = np.frombuffer(base64.b64decode(a), np.uint8)
    y = np.frombuffer(base64.b64decode(b), np.uint8)
    return hamming(x, y) / (8 * len(x)) if len(x) else 0.0


def evidence(transcript: Mapping[str, Any]) -> dict[str, Any]:
    """Per-challenge distances, the SPRT path over them, and per-site distances."""
    params = transcript.get("parameters") or {}
    spec = _spec(params)
    alpha = float(params.get("alpha", 0.01))
    budget = int(params.get("max_challenges", 1))
    test = SequentialTest(spec, alpha, max(1, budget))
    records = transcript.get("records") or []
    rows, path = [], []
    per_site: dict[str, list[float]] = {}
    for pos, rec in enumerate(records):
        d = rec["differing_bits"] / rec["total_bits"] if rec.get("total_bits") else 0.0
        test.update(min(1.0, max(0.0, d)))
        path.append(test.statistic)
        rows.append(
            {
                "position": pos,
                "index": rec.get("index"),
                "distance": d,
                "differing_bits": rec.get("differing_bits"),
                "total_bits": rec.get("total_bits"),
                "mismatch": d > spec.delta,
                "llr": test.statistic,
            }
        )
        for site, sig in (rec.get("reference") or {}).items():
            other = (rec.get("candidate") or {}).get(site)
            if other is not None:
                per_site.setdefault(str(site), []).append(_site_distance(sig, other))
    sites = [
        {
            "site": s,
            "mean": float(np.mean(v)),
            "min": float(np.min(v)),
            "max": float(np.max(v)),
            "challenges": len(v),
        }
        for s, v in sorted(per_site.items(), key=lambda kv: int(kv[0]))
    ]
    return {
        "spec": spec,
        "alpha": alpha,
        "lower": test.lower,
        "upper": test.upper,
        "rows": rows,
        "path": path,
        "sites": sites,
        "replayed_verdict": test.decision.verdict if test.decision else None,
    }


def _scalars(value: Any, prefix: str = "") -> list[tuple[str, str]]:
    """Flatten a small JSON value into (dotted name, text) rows for a table."""
    if isinstance(value, Mapping):
        out: list[tuple[str, str]] = []
        for k, v in value.items():
            out += _scalars(v, f"{prefix}.{k}" if prefix else str(k))
        return out
    if isinstance(value, list):
        return [(prefix, ", ".join(str(v) for v in value))]
    return [(prefix, "" if value is None else str(value))]


# ----------------------------------------------------------------------------- report
def build_report(
    job: Mapping[str, Any],
    transcript: Mapping[str, Any] | None = None,
    certificate: Mapping[str, Any] | None = None,
    base_url: str = "",
) -> dict[str, Any]:
    """Everything the report template shows, charts included (SVG strings)."""
    result = dict(job.get("result") or {})
    request = dict(job.get("request") or {})
    verdict = result.get("verdict")
    out: dict[str, Any] = {
        "job": job,
        "result": result,
        "request": request,
        "verdict": verdict,
        "error": job.get("error"),
        "tolerance": result.get("tolerance") or request.get("tolerance"),
        "alpha": result.get("alpha", request.get("alpha")),
        "challenges_used": result.get(
            "challenges_used",
            (job.get("progress") or {}).get("challenges_done") if result.get("verdict") else None,
        ),
        "challenges_max": result.get("challenges_max")
        or (job.get("progress") or {}).get("challenges_max"),
        "reason": result.get("reason"),
        "charts": {},
    }
    consensus = result.get("consensus") or {}
    out["consensus"] = consensus
    positions: list[int] = []  # each record's challenge index, in transcript order
    if transcript is not None:
        ev = evidence(transcript)
        out["evidence"] = ev
        out["charts"]["sprt"] = sprt_chart(ev["path"], ev["lower"], ev["upper"], verdict)
        dists = [r["distance"] for r in ev["rows"]]
        out["charts"]["distances"] = distance_chart(dists, ev["spec"].delta, ev["spec"].name)
        if ev["sites"]:
            out["charts"]["sites"] = bar_chart(
                [f"layer {s['site']}" for s in ev["sites"]],
                [s["mean"] for s in ev["sites"]],
                "Mean distance per restriction site",
                "fraction of bits that differ",
                "sites",
                threshold=(ev["spec"].delta, f"\u03b4 = {ev['spec'].delta:g}"),
            )
        positions = [r["index"] for r in ev["rows"]]
        out["transcript"] = {
            "root": transcript.get("root"),
            "challenge_commitment": transcript.get("challenge_commitment"),
            "committed_root": transcript.get("committed_root"),
            "key_id": transcript.get("key_id"),
            "records": len(transcript.get("records") or []),
            "sites": transcript.get("sites"),
            "bits_per_site": (transcript.get("parameters") or {}).get("bits_per_site"),
        }
    votes = []
    for v in consensus.get("votes") or []:
        recs = v.get("reexecuted")
        votes.append(
            {
                **v,
                "records": recs,
                # 1-based, as the charts' x axis and the distance table number challenges
                "numbers": [i + 1 for i in recs or [] if 0 <= i < len(positions)],
            }
        )
    out["votes"] = votes
    ranking = list(result.get("ranking") or [])
    unavailable = list(result.get("unavailable") or [])
    if ranking or unavailable:
        # Every model of the registry: compared (nearest first), incompatible (DIFFERENT,
        # with the reason), unavailable (not compared, with the reason). Only compared
        # models have a distance, so only they are charted.
        out["ranking"] = [{"status": "compared", **r} for r in ranking]
        out["unavailable"] = unavailable
        measured = [r for r in ranking if r.get("mean_distance") is not None]
        if measured:
            out["charts"]["ranking"] = bar_chart(
                [str(r.get("model_id")) for r in measured],
                [float(r["mean_distance"]) for r in measured],
                "Compared models by mean distance to the candidate",
                "mean fraction of bits that differ",
                "ranking",
                highlight=0,
            )
    out["models"] = [
        (label, result.get(key))
        for label, key in (("reference", "reference"), ("candidate", "candidate"))
        if isinstance(result.get(key), Mapping)
    ]
    out["executed_on"] = result.get("executed_on")
    out["endpoint"] = [
        row for name in ENDPOINT_FIELDS if name in result for row in _scalars(result[name], name)
    ]
    created, started, finished = (job.get(k) for k in ("created_at", "started_at", "finished_at"))
    out["timings"] = [
        ("created", created, None),
        ("started", started, _duration(created, started)),
        ("finished", finished, _duration(started, finished)),
        ("total", None, _duration(created, finished)),
    ]
    jid = job.get("id", "")
    base = base_url.rstrip("/") or "$REV_API_URL"
    out["commands"] = {
        "transcript": (
            f'curl -sH "Authorization: Bearer $REV_API_KEY" {base}/v1/jobs/{jid}/transcript '
            f"-o transcript-{jid[:8]}.json && rev audit transcript-{jid[:8]}.json"
        ),
        "certificate": (
            f"curl -s {base}/v1/certificates/key -o farm-key.pem && "
            f'curl -sH "Authorization: Bearer $REV_API_KEY" {base}/v1/jobs/{jid}/certificate '
            f"-o certificate-{jid[:8]}.json && rev certificate verify certificate-{jid[:8]}.json "
            f"--public-key farm-key.pem"
            + (f" --transcript transcript-{jid[:8]}.json" if transcript is not None else "")
        ),
    }
    out["certificate"] = certificate
    return out
