"""bench.run_all's bookkeeping: the goal verdict and the median over repeated runs."""
from __future__ import annotations

import pytest

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


def test_peer_summary_by_hand():
    from bench.bench_peer_trl import THRESHOLD, _ratio_rows, summarize

    run = {"step_s": [1.0, 1.0, 1.0, 1.0, 0.2, 0.4, 0.3, 0.5], "startup_s": 20.0, "wall_s": 40.0, "cpu_s": 60.0,
           "accuracy": {0: 0.2, 4: THRESHOLD - 0.01, 8: THRESHOLD + 0.05}}
    s = summarize(run)
    assert s["step_median_s"] == pytest.approx(0.35)  # steps 5..8: 0.2, 0.4, 0.3, 0.5
    assert s["to_threshold_s"] == pytest.approx(20.0 + 5.4)  # start-up + the 8 steps up to the step-8 evaluation
    assert (s["final_step"], s["final_accuracy"]) == (8, THRESHOLD + 0.05)
    peer = {**s, "step_median_s": 0.5, "startup_s": 8.0, "to_threshold_s": None, "threads": 2, "by_threads": {}}
    rows = {r["name"].split(": ", 1)[1]: r for r in _ratio_rows("x", s, peer)}
    assert rows["seconds per RL step (median, steps 5..N) dispo-ray / TRL"]["ratio"] == 0.7
    startup = rows["start-up to step 1 dispo-ray / TRL"]
    assert startup["met"] is True and startup["ratio"] == 2.5  # the goal is absolute: <= 30 s
    assert rows[f"training wall to {THRESHOLD:.0%} held-out avg@4 dispo-ray / TRL"]["ratio"] == "-"


def test_an_opt_in_part_gets_its_own_budget(tmp_path, monkeypatch):
    import bench.run_all as run_all
    (tmp_path / "bench_x.py").write_text('BUDGET_S = 100\nBUDGET_QUICK_S = 50\nOPT_IN_ENV = "DISPO_X_FULL"\n'
                                         "BUDGET_OPT_IN_S = 900\n")
    monkeypatch.setattr(run_all, "BENCH_DIR", str(tmp_path))
    monkeypatch.delenv("DISPO_X_FULL", raising=False)
    assert (run_all.budget("bench_x", False), run_all.budget("bench_x", True)) == (100.0, 50.0)
    monkeypatch.setenv("DISPO_X_FULL", "0")
    assert run_all.budget("bench_x", False) == 100.0
    monkeypatch.setenv("DISPO_X_FULL", "1")
    assert (run_all.budget("bench_x", False), run_all.budget("bench_x", True)) == (900.0, 50.0)


def test_streaming_pools_runs_over_all_their_steps():
    from bench.bench_streaming import pooled

    a = {"tokens": [100.0, 300.0], "step_s": [1.0, 1.0], "samples": [10.0, 10.0], "multi_version": [0.0, 0.5]}
    b = {"tokens": [600.0], "step_s": [2.0], "samples": [20.0], "multi_version": [0.25]}
    p = pooled([a, b])
    assert p["tokens_per_s"] == 1000.0 / 4.0  # all tokens over all seconds, not a mean of runs' rates
    assert p["step_s"] == 1.0 and p["steps"] == 3  # the median step of the pooled steps
    assert p["response_length"] == 1000.0 / 40.0 and p["multi_version"] == 0.25
