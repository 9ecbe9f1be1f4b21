"""Short real runs (Ray actors, DeepSpeed learner, sandboxed rewards, weight broadcast) of the
collapse guard's rollback and of the adaptive windows, asserting on summary.json, metrics.jsonl,
the checkpoints and the windows the learner ranks' loss read (their config is never written)."""
from __future__ import annotations

import json

import pytest

from conftest import call_on
from dispo_ray.rollout import driver
from dispo_ray.infra.config import compose
from dispo_ray.infra.metrics_log import read_metrics
from runs import SMALL, train_steps


KEYS = ("eps_low_pos", "eps_high_pos", "eps_low_neg", "eps_high_neg")


def _learner_windows(trainer):
    """Per rank: the windows its latest train_step's loss read (sent with the batch)."""
    return call_on(trainer.learners.actors, lambda w: w.windows_used)


def _learner_config_windows(trainer):
    return call_on(trainer.learners.actors, lambda w: {k: getattr(w.cfg.algorithm, k) for k in KEYS})


def test_rollback_restores_widens_and_trains_on(ray_cluster, tmp_path, capsys):
    """A repetition signal on the trained steps 4 and 5 (patience 2, staleness k = 1) fires at
    step 5: the guard restores checkpoint 1 (c + 1 + k < 4), widens eps_high_neg 100 -> 201 and the
    run trains steps 2..6 again, with the batches in flight from the abandoned weights dropped.
    The signal is injected into the real step metrics (the first time steps 4 and 5 are trained)
    through the Trainer's ``metrics_hook``: the tiny task does not collapse within a few steps, and
    everything after the signal is real."""
    injected = set()

    def inject_repetition(batch, metrics):
        if batch.step + 1 in (4, 5) and batch.step not in injected:
            injected.add(batch.step)
            metrics["rollout/repetition"] = 1.0
    cfg = compose(SMALL + ["trainer.total_steps=6", f"trainer.run_dir={tmp_path}", "trainer.max_staleness=1",
                           "trainer.save_every=1", "trainer.collapse_guard.action=rollback",
                           "trainer.collapse_guard.patience=2", "trainer.collapse_guard.widen_factor=2",
                           "learner.mini_batches=2", "trainer.keep_checkpoints=0"])  # keep all: see saved_steps
    trainer = driver.Trainer(cfg, metrics_hook=inject_repetition)
    try:
        summary = trainer.fit()
        # step 6 trained with the widened window; the ranks' config still holds the configured one
        assert _learner_windows(trainer) == [{"eps_low_pos": 0.2, "eps_high_pos": 10.0, "eps_low_neg": 1.0,
                                              "eps_high_neg": 201.0}]
        assert _learner_config_windows(trainer)[0]["eps_high_neg"] == 100.0
    finally:
        trainer.shutdown()
    assert "rollback to the step-1 checkpoint, eps_high_neg 100 -> 201; continuing" in capsys.readouterr().out
    assert (summary["steps"], summary["version"], summary["rollbacks"]) == (6, 6, 1)
    assert summary["stopped_by_collapse_guard"] is False and summary["windows"]["eps_high_neg"] == 201.0
    assert json.loads((tmp_path / "summary.json").read_text())["collapse_events"] == [
        {"step": 5, "signal": "repetition", "metric": "rollout/repetition", "value": 1.0, "action": "rollback",
         "restored_step": 1, "window": "eps_high_neg", "old": 100.0, "new": 201.0}]
    steps = train_steps(str(tmp_path))
    assert [m["step"] for m in steps] == [1, 2, 3, 4, 5, 2, 3, 4, 5, 6]  # the abandoned branch stays logged
    assert [m["windows/eps_high_neg"] for m in steps] == [100.0] * 5 + [201.0] * 5
    assert [m["collapse/rollbacks"] for m in steps] == [0, 0, 0, 0, 1, 1, 1, 1, 1, 1]
    assert all(0 <= m["staleness/max"] <= 1 for m in steps) and max(trainer.gate.histogram) <= 1
    assert steps[5]["staleness/max"] == 0  # step 2 again: sampled by the restored version 1, nothing older
    assert [m["version"] for m in steps] == [1, 2, 3, 4, 5, 2, 3, 4, 5, 6]
    assert [m.get("eval/accuracy") is not None for m in read_metrics(str(tmp_path))].count(True) == 2  # 0, 6
    # the final checkpoint continues the new branch: widened window, guard history, forgotten checkpoints
    state = json.loads((tmp_path / "checkpoints" / "step_6" / "driver_state.json").read_text())
    assert state["windows"]["eps_high_neg"] == 201.0 and state["guard"]["rollbacks"] == 1
    assert state["guard"]["saved_steps"] == [0, 1, 2, 3, 4, 5, 6]  # step 0: saved because action=rollback
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_6"


def test_adaptive_windows_move_every_step_and_resume_with_them(ray_cluster, tmp_path):
    """Mean response length is always below a band of 1000 tokens, so eps_low_neg widens every
    step from 0.2 by a factor 2 on 1 - eps: 0.2 (trained at step 1), 0.6, 0.8, then 0.9 after the
    last step; repetition is never above 1.0, so eps_high_neg stays at its configured 100. A resumed
    run continues with the adapted windows: its new learner group trains step 4 with 0.9, sent
    with the batch."""
    common = SMALL + [f"trainer.run_dir={tmp_path}", "trainer.max_staleness=0", "learner.mini_batches=2",
                      "algorithm.eps_low_neg=0.2", "algorithm.adaptive_windows.enabled=true",
                      "algorithm.adaptive_windows.length_min=1000", "algorithm.adaptive_windows.repetition_max=1.0",
                      "algorithm.adaptive_windows.step_factor=2"]
    for total, resume in ((3, False), (4, True)):
        trainer = driver.Trainer(compose(common + [f"trainer.total_steps={total}", f"trainer.resume={resume}"]))
        try:
            summary = trainer.fit()
            windows, configured = _learner_windows(trainer)[0], _learner_config_windows(trainer)[0]
        finally:
            trainer.shutdown()
    steps = train_steps(str(tmp_path))
    assert [m["step"] for m in steps] == [1, 2, 3, 4]
    assert [m["windows/eps_low_neg"] for m in steps] == pytest.approx([0.2, 0.6, 0.8, 0.9])
    assert [m["windows/eps_high_neg"] for m in steps] == [100.0] * 4
    assert all({"windows/eps_low_pos", "windows/eps_high_pos"} <= set(m) for m in steps)
    assert windows["eps_low_neg"] == pytest.approx(0.9) == steps[-1]["windows/eps_low_neg"]  # what step 4 used
    assert summary["windows"]["eps_low_neg"] == pytest.approx(0.95)  # decided after step 4, for a step 5
    assert configured["eps_low_neg"] == 0.2
    assert summary["collapse_events"] == [] and summary["rollbacks"] == 0
