"""The regime lab: its task (written-out working), its preset, and the verdict logic on hand-made
metric streams."""
from __future__ import annotations

import pytest

from dispo_ray.infra.config import ConfigError, compose
from dispo_ray.study.verdicts import (adaptive_table, findings, guard_check, guard_table, largest_fall,
                                      replay_guard, verdict, window_extreme)
from dispo_ray.tiny.task import make_problems, response_text, working_text


def test_working_text_by_hand():
    assert working_text(478, 56) == "8+6+0=14\n7+5+1=13\n4+0+1=5\n\\boxed{534}"
    assert working_text(95, 7) == "5+7+0=12\n9+0+1=10\n\\boxed{102}"  # the last carry lands in the answer
    assert response_text(12, "+", 7) == "\\boxed{19}"  # the default style is unchanged
    with pytest.raises(ValueError, match="additions only"):
        response_text(12, "-", 7, "working")


def test_working_responses_score_right_and_near_misses_wrong():
    from dispo_ray.reward.scoring import score_in_process

    cfg = compose(["+preset=regime_lab"])
    rows = make_problems(cfg.data.tiny_task)["train"][:20]
    for r in rows:
        e, gt = r["extra_info"], r["reward_model"]["ground_truth"]
        text = response_text(e["a"], e["op"], e["b"], "working")
        assert score_in_process(text, gt, cfg.reward, 96).correct, text
        wrong = text.replace("\\boxed{" + gt + "}", "\\boxed{" + str(int(gt) + 1) + "}")
        assert not score_in_process(wrong, gt, cfg.reward, 96).correct, wrong


def test_lab_preset_composes_and_binds_the_windows():
    cfg = compose(["+preset=regime_lab"])
    assert cfg.data.tiny_task.style == "working" and list(cfg.data.tiny_task.ops) == ["+"]
    assert cfg.learner.mini_batches > 1 and cfg.trainer.max_staleness >= 1  # weights leave 1
    assert cfg.generator.max_new_tokens >= 2 * (cfg.data.tiny_task.max_digits + 1) * 8  # room to grow
    with pytest.raises(ConfigError) as e:
        compose(["+preset=regime_lab", "data.tiny_task.ops=[+,-]"])
    assert "data.tiny_task.ops" in str(e.value) and "working" in str(e.value) and "\n" not in str(e.value)


def test_verdict_needs_sign_and_twice_the_spread():
    v = verdict([1.0, 1.1, 0.9], [2.0, 2.1, 1.9], sign=-1)  # sd 0.1 each, effect -1.0
    assert v["effect"] == pytest.approx(-1.0) and v["spread"] == pytest.approx(0.1) and v["reproduced"]
    assert not verdict([1.0, 1.1, 0.9], [2.0, 2.1, 1.9], sign=+1)["reproduced"]  # wrong direction
    assert not verdict([1.8, 2.2, 1.6], [2.0, 2.1, 1.9], sign=-1)["reproduced"]  # -0.1 < 2 x 0.3


def _rows(values, key, evals=None, events=None):
    rows = []
    for i, v in enumerate(values, start=1):
        r = {"step": i, "rollout/samples": 128, key: v}
        if evals and i in evals:
            r["eval/accuracy"] = evals[i]
        if events:
            r["collapse/events"] = sum(1 for e in events if e <= i)
        rows.append(r)
    return rows


def test_statistics_by_hand():
    rep = _rows([0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 0.5], "rollout/repetition")
    assert window_extreme("rollout/repetition", max)(rep) == pytest.approx(1.0)
    length = _rows([40, 40, 40, 40, 40, 10, 10, 10, 10, 10], "rollout/response_length")
    assert window_extreme("rollout/response_length", min)(length) == pytest.approx(10.0)
    acc = _rows([0] * 4, "x", evals={1: 0.3, 2: 0.5, 3: 0.35, 4: 0.45})
    assert largest_fall(acc) == pytest.approx(0.15)


def test_findings_on_streams_with_a_built_in_length_collapse():
    runs = {}
    for s, jitter in zip((1, 2, 3), (0.0, 1.0, -1.0)):
        runs[("dispo", s)] = _rows([40 + jitter] * 12, "rollout/response_length")
        runs[("dispo_tight_low_neg", s)] = _rows([40] * 6 + [3 + jitter] * 6, "rollout/response_length")
    by_name = {f["finding"]: f for f in findings(runs)}
    length = by_name["incorrect, weight < 1 clipped: length collapse"]
    assert length["reproduced"] and length["effect"] == pytest.approx(-37.0)
    assert by_name["DISPO learns faster than DAPO"]["reproduced"] is None  # no dapo runs: not measured


def test_guard_fires_before_the_fall_and_never_on_default_windows():
    collapsed = _rows([0] * 12, "x", evals={4: 0.40, 8: 0.42, 12: 0.20}, events=[9])
    assert guard_check(collapsed) == {"first_event": 9, "fell_at": 12}
    noise = _rows([0] * 12, "x", evals={1: 0.30, 4: 0.50, 8: 0.35})  # 15 below its peak, above its start
    assert guard_check(noise)["fell_at"] is None
    late = _rows([0] * 12, "x", evals={4: 0.40, 8: 0.42, 12: 0.20}, events=[12, 12])
    quiet = _rows([0] * 12, "x", evals={4: 0.40, 8: 0.42, 12: 0.41})
    noisy_default = _rows([0] * 12, "x", evals={4: 0.40, 12: 0.41}, events=[5])
    table = {(g["variant"], g["seed"]): g["pass"] for g in guard_table(
        {("dispo_tight_high_neg", 1): collapsed, ("dispo_tight_high_neg", 2): late, ("cispo", 1): quiet,
         ("dispo", 1): noisy_default, ("dispo", 2): quiet})}
    assert table == {("dispo_tight_high_neg", 1): True, ("dispo_tight_high_neg", 2): False, ("cispo", 1): None,
                     ("dispo", 1): False, ("dispo", 2): True}


def test_guard_replayed_on_a_logged_stream_fires_where_the_live_guard_would():
    guard_cfg = compose(["+preset=regime_lab"]).trainer.collapse_guard  # patience 3, reward_fall 0.33
    rows = _rows([0.4] * 5 + [0.0] * 3 + [0.4], "rollout/accuracy", evals={9: 0.0})
    assert replay_guard(rows, guard_cfg) == 8  # falls at 6, held 3 steps
    assert guard_check(rows, guard_cfg=guard_cfg)["first_event"] == 8
    steady = _rows([0.4, 0.3, 0.5, 0.35, 0.45] * 4, "rollout/accuracy")
    assert replay_guard(steady, guard_cfg) is None


def test_adaptive_verdict_needs_two_seeds_without_collapse_and_the_accuracy_bar():
    ev = lambda *acc: _rows([0] * 12, "x", evals=dict(zip((4, 8, 12), acc)))  # noqa: E731
    runs = {("dispo", s): ev(0.30, 0.40, a) for s, a in ((1, 0.44), (2, 0.46), (3, 0.45))}  # mean final 0.45
    runs.update({("dispo_tight_low_neg", s): ev(0.30, 0.05, 0.0) for s in (1, 2, 3)})
    runs.update({("dispo_tight_low_neg_adaptive", 1): ev(0.30, 0.40, 0.44),
                 ("dispo_tight_low_neg_adaptive", 2): ev(0.30, 0.41, 0.45),
                 ("dispo_tight_low_neg_adaptive", 3): ev(0.30, 0.10, 0.41)})  # seed 3 fell 20 points
    (row,) = adaptive_table(runs)
    assert row["avoided"] == [True, True, False] and row["bar"] == pytest.approx(0.43)
    assert row["mean_final"] == pytest.approx(1.30 / 3) and row["pass"]  # 0.433 >= 0.45 - 0.02
    runs[("dispo_tight_low_neg_adaptive", 2)] = ev(0.30, 0.05, 0.45)
    assert not adaptive_table(runs)[0]["pass"]  # only one seed avoided the collapse
