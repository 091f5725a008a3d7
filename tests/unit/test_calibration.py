"""The pure part of precision's self-calibration: δ from counts, and the block's checks."""

from __future__ import annotations

import pytest

from rev_tasks.core.calibration import (
    FLOOR,
    MARGIN,
    Calibration,
    calibrated_delta,
    check_calibration,
)


def _cal(f16=(1, 2, 3, 0), b16=(10, 12, 8, 9), total=16384) -> Calibration:
    return Calibration(
        challenges=4, total_bits=total, differing_bits={"float16": list(f16), "bfloat16": list(b16)}
    )


def test_delta_is_margin_times_the_largest_count_with_a_floor():
    assert calibrated_delta({"float16": [1, 2], "bfloat16": [40, 25]}, 16384) == MARGIN * 40 / 16384
    assert calibrated_delta({"float16": [0, 0], "bfloat16": [1, 2]}, 16384) == FLOOR
    assert calibrated_delta({"float16": [9000], "bfloat16": [9000]}, 16384) == 0.5
    with pytest.raises(ValueError):
        calibrated_delta({"float16": [1]}, 0)


def test_block_round_trips_and_checks():
    cal = _cal()
    doc = cal.to_dict()
    assert check_calibration(doc) == []
    assert Calibration.from_dict(doc) == cal
    assert doc["delta"] == cal.delta == MARGIN * 12 / 16384


@pytest.mark.parametrize(
    "edit,expected",
    [
        (lambda d: d.update(delta=0.01), "its counts give"),
        (lambda d: d["differing_bits"].pop("float16"), "exactly float16, bfloat16"),
        (lambda d: d["differing_bits"]["bfloat16"].append(3), "expected 4"),
        (lambda d: d["differing_bits"]["bfloat16"].__setitem__(0, -1), "integers in"),
        (lambda d: d.update(margin=0.5), "margin must be >= 1"),
        (lambda d: d.update(format="x"), "format"),
        (lambda d: d.pop("total_bits"), "missing total_bits"),
    ],
)
def test_malformed_blocks_are_reported(edit, expected):
    doc = _cal().to_dict()
    edit(doc)
    problems = check_calibration(doc)
    assert problems and expected in problems[0], problems


def test_other_constants_fail_only_when_checked():
    cal = Calibration(4, 16384, {"float16": [1] * 4, "bfloat16": [2] * 4}, margin=2.0)
    doc = cal.to_dict()
    assert check_calibration(doc, check_constants=False) == []
    assert "differ from the current" in check_calibration(doc)[0]
