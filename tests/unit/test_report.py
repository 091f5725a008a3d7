"""Report data and charts: the SPRT path is the decision's own; every field a job has is shown."""

from __future__ import annotations

import math
import re
from typing import Any

import pytest

from rev_tasks import queues
from rev_tasks.core.decision import decide
from rev_tasks.report import build_report, nice_ticks
from tests.unit.test_transcript import make_transcript
from web.reports import report_html


def _job(transcript: dict[str, Any] | None, **result: Any) -> dict[str, Any]:
    return {
        "id": "0f8e4c1a-1111-2222-3333-444455556666",
        "tenant": "alpha",
        "kind": "verify",
        "status": "succeeded",
        "stage": "done",
        "device": "cpu",
        "queue": queues.INFERENCE_CPU,
        "request": {"tolerance": "exact", "alpha": 0.01},
        "progress": {"challenges_done": 8, "challenges_max": 64},
        "result": result,
        "error": None,
        "created_at": "2026-12-01T10:00:00Z",
        "started_at": "2026-12-01T10:00:01.5Z",
        "finished_at": "2026-12-01T10:00:09Z",
    }


@pytest.mark.parametrize("flip_rate", [0.0, 0.4])
def test_sprt_path_is_the_decisions_statistic(flip_rate: float) -> None:
    tr = make_transcript(flip_rate)
    verdict = tr["decision"]["verdict"]
    data = build_report(_job(tr, verdict=verdict, tolerance="exact", alpha=0.01), tr)
    ev = data["evidence"]
    n = len(tr["records"])
    assert len(ev["path"]) == n == tr["decision"]["challenges_used"]
    dists = [r["differing_bits"] / r["total_bits"] for r in tr["records"]]
    assert ev["path"][-1] == pytest.approx(decide(dists, "exact", 0.01, 64).statistic)
    assert ev["replayed_verdict"] == verdict
    assert (ev["lower"], ev["upper"]) == pytest.approx((-math.log(100), math.log(100)))
    svg = data["charts"]["sprt"]
    assert len(re.findall(r'<circle class="point"', svg)) == n
    assert "threshold-upper" in svg and "threshold-lower" in svg
    assert len(re.findall(r'class="point[^"]*" data-challenge', data["charts"]["distances"])) == n
    assert [s["site"] for s in ev["sites"]] == ["0", "3", "6"]
    if flip_rate:
        assert all(0.3 < s["mean"] < 0.5 for s in ev["sites"])
    else:
        assert all(s["mean"] == 0 for s in ev["sites"])


def test_votes_show_the_challenges_each_validator_reexecuted() -> None:
    tr = make_transcript(0.0)
    votes = [
        {"validator": i, "verdict": "SAME", "digest": "d" * 64, "reexecuted": [1, 3]}
        for i in range(5)
    ]
    data = build_report(_job(tr, verdict="SAME", consensus={"votes": votes, "quorum": 4}), tr)
    assert data["votes"][0]["numbers"] == [2, 4]
    html = report_html(_job(tr, verdict="SAME", consensus={"votes": votes}), tr, None, "", True)
    assert html.count("#2, #4") == 5


def test_identify_ranking_and_endpoint_fields_are_rendered() -> None:
    ranking = [
        {"model_id": "gpt2-a", "mean_distance": 0.0, "verdict": "SAME", "challenges_used": 8},
        {"model_id": "gpt2-b", "mean_distance": 0.43, "verdict": "DIFFERENT", "challenges_used": 2},
    ]
    job = _job(None, ranking=ranking, best="gpt2-a", verdict="SAME", compared=2,
               queries=40, tokens={"prompt": 1200, "completion": 40}, cost={"usd": 0.0123})  # fmt: skip
    job["kind"] = "identify"
    html = report_html(job, None, None, "http://127.0.0.1:1", standalone=True)
    assert html.count('class="bar"') == 2 and "gpt2-b" in html
    for text in ("queries", "tokens.prompt", "1200", "cost.usd", "0.0123", "Endpoint usage"):
        assert text in html


def test_failed_job_shows_its_error_and_no_charts() -> None:
    job = _job(None)
    job.update(status="failed", result=None,
               error={"code": "model_load_error", "message": "candidate: bad weights"})  # fmt: skip
    html = report_html(job, None, None, "http://127.0.0.1:1", standalone=True)
    assert "model_load_error" in html and "candidate: bad weights" in html
    assert "FAILED" in html and "<svg" not in html


def test_a_report_file_is_self_contained() -> None:
    tr = make_transcript(0.4)
    html = report_html(_job(tr, verdict="DIFFERENT"), tr, None, "http://127.0.0.1:1", True)
    assert "<style>" in html and "<link" not in html and "<script" not in html
    assert not re.search(r'(src|href)="(https?:)?//', html)


def test_text_is_escaped_in_pages_and_charts() -> None:
    ranking = [{"model_id": "<script>x</script>", "mean_distance": 0.1, "verdict": "DIFFERENT"}]
    job = _job(None, ranking=ranking, verdict="DIFFERENT")
    job["kind"] = "identify"
    html = report_html(job, None, None, "", standalone=True)
    assert "<script>" not in html and "&lt;script&gt;" in html


def test_nice_ticks_cover_the_range() -> None:
    assert nice_ticks(0, 1) == [0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert nice_ticks(-5.2, 5.2) == [-7.5, -5, -2.5, 0, 2.5, 5]
    assert nice_ticks(0, 0.0042) == [0, 0.001, 0.002, 0.003, 0.004]
