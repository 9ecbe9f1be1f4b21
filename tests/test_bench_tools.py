"""bench.run_all's bookkeeping: the goal verdict and the median over repeated runs."""
from __future__ import annotations

from bench.run_all import goal_met, merge_repeats


def _row(value, ratio, **kw):
    return {"name": "r", "value": value, "baseline": 2.0, "ratio": ratio, "goal": ">= 0.9", "unit": "s", **kw}


def test_goal_met_reads_the_goal_text():
    assert goal_met(_row(1.8, 0.9)) == "yes"
    assert goal_met(_row(1.7, 0.85)) == "NO"
    assert goal_met({**_row(0.1, 0.06), "goal": "<= 5%"}) == "NO"
    assert goal_met({**_row(0.1, 0.04), "goal": "<= 5%"}) == "yes"
    assert goal_met({**_row(1, "-")}) == "-"


def test_repeats_report_the_median_and_the_spread():
    merged = merge_repeats([[_row(1.0, 0.5)], [_row(1.9, 0.95)], [_row(1.8, 0.9)]])
    assert len(merged) == 1
    m = merged[0]
    assert (m["value"], m["ratio"]) == (1.8, 0.9)  # medians, not the best run
    assert m["ratios"] == [0.5, 0.95, 0.9]
    assert "0.5..0.95" in m["notes"] and m["name"] == "r [median of 3]"
    assert goal_met(m) == "yes"
    # a module's own verdict comes from the median run
    own = merge_repeats([[_row(1.0, 0.5, met=False)], [_row(1.9, 0.95, met=True)], [_row(1.8, 0.9, met=True)]])
    assert own[0]["met"] is True
    low = merge_repeats([[_row(1.0, 0.5, met=False)], [_row(1.1, 0.55, met=False)], [_row(1.8, 0.9, met=True)]])
    assert low[0]["met"] is False


def test_failed_runs_do_not_enter_the_median():
    err = {"name": "r", "value": "-", "baseline": "-", "ratio": "-", "goal": "-", "unit": "-", "error": True}
    merged = merge_repeats([[_row(1.0, 0.5)], [err], [_row(1.8, 0.9)]])
    assert merged[0]["ratio"] == 0.7 and merged[0]["ratios"] == [0.5, 0.9]
