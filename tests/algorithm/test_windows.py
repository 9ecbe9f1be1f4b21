"""Run-time DISPO windows on synthetic metric streams, every expected value derived by hand:
the widening rule, the adaptive-window controller, the collapse guard's action (which
checkpoint, which window, which factor, and the fallbacks to a warning), and the new config keys."""
from __future__ import annotations

import ast
import math
import os

import pytest

from dispo_ray.algorithm.adaptive_windows import RULES, AdaptiveWindows
from dispo_ray.algorithm.collapse_guard import SIGNAL_WINDOW, SIGNALS, CollapseGuard
from dispo_ray.algorithm.losses import REGIMES
from dispo_ray.algorithm.windows import REGIME_OF_WINDOW, LossWindows, resolve, widen
from dispo_ray.infra.config import ConfigError, compose


def test_widen_acts_on_the_bounds_in_ratio_space_and_stops_at_the_limit():
    assert widen("eps_high_neg", 100.0, 2.0, 1000.0) == 201.0  # upper bound 101 -> 202
    assert widen("eps_high_pos", 0.0, 1.5, 100.0) == 0.5  # a closed window opens: 1 -> 1.5
    assert widen("eps_low_neg", 0.2, 2.0, 1.0) == pytest.approx(0.6)  # lower bound 0.8 -> 0.4
    assert widen("eps_low_pos", 0.0, 4.0, 1.0) == pytest.approx(0.75)  # 1 -> 0.25
    assert widen("eps_high_neg", 600.0, 2.0, 1000.0) == 1000.0  # 1201 capped
    assert widen("eps_low_neg", 1.0, 2.0, 1.0) == 1.0  # no floor is as wide as it gets


def test_loss_windows_apply_only_changes_and_round_trip():
    cfg = compose([])
    w = LossWindows(cfg.algorithm)
    assert w.metrics() == {"windows/eps_low_pos": 0.2, "windows/eps_high_pos": 10.0, "windows/eps_low_neg": 1.0,
                           "windows/eps_high_neg": 100.0}
    assert w.set({"eps_high_neg": 201.0, "eps_low_pos": 0.2}) == {"eps_high_neg": (100.0, 201.0)}  # only the change
    sent = w.in_force()  # what the driver sends with the next batch: a copy
    assert sent == {"eps_low_pos": 0.2, "eps_high_pos": 10.0, "eps_low_neg": 1.0, "eps_high_neg": 201.0}
    sent["eps_high_neg"] = 0.0
    assert w.current["eps_high_neg"] == 201.0
    assert cfg.algorithm.eps_high_neg == 100.0  # the config keeps the configured value
    w2 = LossWindows(compose([]).algorithm)
    w2.load_state_dict(w.state_dict())  # resume: the widened window comes back
    assert w2.current["eps_high_neg"] == 201.0 and w2.in_force() == w.in_force()
    assert LossWindows(compose(["algorithm=dapo"]).algorithm).metrics() == {}  # dapo reads no eps_*


def test_resolve_fills_the_configured_windows_and_refuses_other_keys():
    a = compose(["algorithm.eps_low_neg=0.2"]).algorithm
    assert resolve(a) == {"eps_low_pos": 0.2, "eps_high_pos": 10.0, "eps_low_neg": 0.2, "eps_high_neg": 100.0}
    assert resolve(a, {"eps_high_neg": 201})["eps_high_neg"] == 201.0 and resolve(a, {})["eps_low_neg"] == 0.2
    with pytest.raises(KeyError, match=r"not a DISPO window: \['clip_low'\]"):
        resolve(a, {"clip_low": 0.1})


def test_guard_and_controller_maps_derive_from_the_one_regime_table():
    """The maps as the paper ties them (../shared/PAPER.md), written out: the guard watches the
    mean token entropy, the controller the entropy of correct responses (regimes.py says why)."""
    assert SIGNAL_WINDOW == {"repetition": "eps_high_neg", "length": "eps_low_neg", "entropy_low": "eps_high_pos",
                             "entropy_high": "eps_low_pos"}
    assert {s: m for s, (m, _) in SIGNALS.items()} == {
        "repetition": "rollout/repetition", "length": "rollout/response_length", "entropy_low": "actor/entropy",
        "entropy_high": "actor/entropy"}
    assert list(SIGNALS) == ["repetition", "length", "entropy_low", "entropy_high"]  # the order events are logged in
    assert {w: m for w, (m, _) in RULES.items()} == {
        "eps_high_neg": "rollout/repetition", "eps_low_neg": "rollout/response_length",
        "eps_high_pos": "actor/entropy_correct", "eps_low_pos": "actor/entropy_correct"}
    assert REGIME_OF_WINDOW == {"eps_high_pos": "pos_high", "eps_low_pos": "pos_low", "eps_high_neg": "neg_high",
                                "eps_low_neg": "neg_low"}
    assert REGIMES == ("pos_high", "pos_low", "neg_high", "neg_low")
    cg, aw = compose([]).trainer.collapse_guard, compose([]).algorithm.adaptive_windows
    # each side of each band, against the guard's limits (0.5, 2, 0.02, 5) and the controller's (0.2, 4, 0.05, 3)
    assert [SIGNALS[s][1](v, cg) for s, v in (("repetition", 0.6), ("repetition", 0.5), ("length", 1.9),
                                              ("length", 2.0), ("entropy_low", 0.01), ("entropy_low", 0.02),
                                              ("entropy_high", 5.1), ("entropy_high", 5.0))] == [True, False] * 4
    assert [RULES[w][1](v, aw) for w, v in (("eps_high_neg", 0.3), ("eps_high_neg", 0.2), ("eps_low_neg", 3.9),
                                            ("eps_low_neg", 4.0), ("eps_high_pos", 0.04), ("eps_high_pos", 0.05),
                                            ("eps_low_pos", 3.1), ("eps_low_pos", 3.0))] == [True, False] * 4


_CONFIG_NAMES = {"cfg", "config", "algorithm", "algo", "aw", "cg", "tr"}  # the names the code gives it


def _config_writes(path):
    """Assignments and setattr calls whose target hangs off a name the code uses for the config."""
    def is_cfg(node):  # x.cfg..., cfg.x..., self.cfg.x...
        chain = []
        while isinstance(node, ast.Attribute):
            chain.append(node.attr)
            node = node.value
        return (isinstance(node, ast.Name) and node.id in _CONFIG_NAMES and chain) or "cfg" in chain[1:]

    out = []
    for node in ast.walk(ast.parse(open(path).read())):
        targets = []
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setattr" and node.args:
            targets = [ast.Attribute(value=node.args[0], attr="?")]
        out += [f"{path}:{node.lineno}" for t in targets if isinstance(t, ast.Attribute) and is_cfg(t)]
    return out


def test_no_code_writes_the_config_at_run_time(tmp_path):
    """The config is read-only once composed (infra/config.py and infra/validation.py build it):
    no module of the trainer, its actors or its algorithm assigns to it."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    skip = {os.path.join("dispo_ray", "infra", "config.py"), os.path.join("dispo_ray", "infra", "validation.py")}
    found = []
    for top in ("dispo_ray", "actors"):
        for folder, _, files in os.walk(os.path.join(root, top)):
            for f in files:
                rel = os.path.relpath(os.path.join(folder, f), root)
                if f.endswith(".py") and rel not in skip:
                    found += _config_writes(os.path.join(root, rel))
    assert found == []
    probe = tmp_path / "probe.py"  # the check itself sees the writes the windows used to be
    probe.write_text("def f(self, k, v):\n    setattr(self.cfg.algorithm, k, v)\n    self.cfg.algorithm.eps_low_pos = v\n")
    assert len(_config_writes(str(probe))) == 2


AW = ["algorithm.adaptive_windows.enabled=true", "algorithm.adaptive_windows.step_factor=1.5",
      "algorithm.adaptive_windows.relax=0.5", "algorithm.eps_low_neg=0.2", "algorithm.eps_high_neg=0"]


def _m(rep=None, length=None, ent=None):
    keys = ("rollout/repetition", "rollout/response_length", "actor/entropy_correct")
    return {k: v for k, v in zip(keys, (rep, length, ent)) if v is not None}


def test_controller_widens_out_of_band_relaxes_in_band_and_holds_without_evidence():
    a = compose(AW).algorithm  # configured: low_pos 0.2, high_pos 10, low_neg 0.2, high_neg 0
    w = LossWindows(a)
    ctl = AdaptiveWindows(a.adaptive_windows, w.configured, w.limits)
    cur = dict(w.current)
    steps = []
    for metrics in (_m(rep=0.5, length=2, ent=0.01), _m(rep=0.5, length=2, ent=0.01),  # all out of band, low entropy
                    _m(rep=0.0, length=10, ent=5.0),  # back in band; entropy too high
                    _m(length=10, ent=float("nan"))):  # no repetition measure, no correct response
        cur = ctl.propose(metrics, cur)
        steps.append(dict(cur))
    # repetition > 0.2: eps_high_neg (1+0)*1.5-1 = 0.5, then 1.5*1.5-1 = 1.25; in band: 1.25 + 0.5*(0-1.25)
    assert [s["eps_high_neg"] for s in steps] == pytest.approx([0.5, 1.25, 0.625, 0.625])
    # length < 4: eps_low_neg 1-0.8/1.5 = 7/15, 1-(8/15)/1.5 = 29/45; in band: halfway to 0.2 = 19/45, then 14/45
    assert [s["eps_low_neg"] for s in steps] == pytest.approx([7 / 15, 29 / 45, 19 / 45, 14 / 45])
    # entropy of correct < 0.05: eps_high_pos 11*1.5-1 = 15.5, 16.5*1.5-1 = 23.75; in band for it: halfway to 10
    assert [s["eps_high_pos"] for s in steps] == pytest.approx([15.5, 23.75, 16.875, 16.875])
    # entropy of correct > 3: eps_low_pos widens (weights < 1 lower entropy) 1-0.8/1.5 = 7/15
    assert [s["eps_low_pos"] for s in steps] == pytest.approx([0.2, 0.2, 7 / 15, 7 / 15])


def test_controller_stays_between_configured_value_and_limit():
    a = compose(AW + ["algorithm.window_max.eps_high_pos=30", "algorithm.adaptive_windows.relax=1"]).algorithm
    w = LossWindows(a)
    ctl = AdaptiveWindows(a.adaptive_windows, w.configured, w.limits)
    cur = dict(w.current)
    for _ in range(5):
        cur = ctl.propose(_m(ent=0.0), cur)
    assert cur["eps_high_pos"] == 30.0  # 15.5, 23.75, 30 (capped), 30, 30
    cur = ctl.propose(_m(ent=1.0), cur)
    assert cur["eps_high_pos"] == 10.0  # relax = 1: straight back to the configured value, never below


def test_controller_widens_a_window_that_clips_most_of_its_regime():
    a = compose(AW + ["algorithm.adaptive_windows.clip_frac_max=0.5", "algorithm.eps_low_neg=0"]).algorithm
    w = LossWindows(a)  # configured: low_neg 0 (every incorrect token with r < 1 clipped), high_neg 0
    ctl = AdaptiveWindows(a.adaptive_windows, w.configured, w.limits)
    in_band = {"rollout/repetition": 0.0, "rollout/response_length": 40.0, "actor/entropy_correct": 0.1}
    cur = ctl.propose({**in_band, "regime/neg_low/clip_frac": 1.0, "regime/neg_high/clip_frac": 0.3}, w.current)
    # neg_low clipped 100% > 0.5: eps_low_neg 1 - 1/1.5 = 1/3; neg_high 30% and repetition in band: stays at 0
    assert cur["eps_low_neg"] == pytest.approx(1 / 3) and cur["eps_high_neg"] == 0.0
    cur = ctl.propose({**in_band, "regime/neg_low/clip_frac": 0.6}, cur)
    assert cur["eps_low_neg"] == pytest.approx(1 - (2 / 3) / 1.5)  # still above the band: 5/9
    cur = ctl.propose({**in_band, "regime/neg_low/clip_frac": 0.1}, cur)
    assert cur["eps_low_neg"] == pytest.approx(5 / 9 * 0.5)  # in band: halfway back to 0 (relax 0.5)
    only_clip = ctl.propose({"regime/pos_low/clip_frac": 0.9}, dict(w.current))  # no other signal at all
    assert only_clip["eps_low_pos"] == pytest.approx(1 - 0.8 / 1.5) and only_clip["eps_high_pos"] == 10.0


GUARD = ["trainer.collapse_guard.action=rollback", "trainer.save_every=1", "trainer.collapse_guard.patience=2",
         "trainer.collapse_guard.widen_factor=2", "trainer.collapse_guard.max_rollbacks=1"]


def _guard(extra=(), k=0, saved=(1, 2, 3, 4, 5)):
    cfg = compose(GUARD + list(extra))
    g = CollapseGuard(cfg.trainer.collapse_guard, max_staleness=k)
    for c in saved:
        g.record_checkpoint(c)
    return g, LossWindows(cfg.algorithm)


def _drive(g, w, stream, start=1):
    """Feed metric dicts for steps start, start+1, ...; return (step, response) of the first trigger."""
    for step, m in enumerate(stream, start):
        fired = g.update(step, {"rollout/repetition": 0.0, "rollout/response_length": 10.0, "actor/entropy": 1.0,
                                **m})
        if fired:
            return step, g.respond(step, fired, w.current, w.limits)
    return None, None


@pytest.mark.parametrize("k,restored", [(0, 2), (1, 1)])
def test_rollback_restores_the_newest_checkpoint_before_the_streak(k, restored):
    g, w = _guard(k=k)
    bad = {"rollout/repetition": 0.9}
    step, r = _drive(g, w, [{}, {}, {}, bad, bad])  # streak begins at step 4, fires at 5
    # checkpoint c sampled steps c+1 .. c+1+k: c + 1 + k < 4  ->  c <= 2 - k
    assert (step, r.action, r.restored_step) == (5, "rollback", restored)
    assert r.changes == {"eps_high_neg": (100.0, 201.0)}  # repetition -> eps_high_neg, (101 * 2) - 1
    assert g.events == [{"step": 5, "signal": "repetition", "metric": "rollout/repetition", "value": 0.9,
                         "action": "rollback", "restored_step": restored, "window": "eps_high_neg",
                         "old": 100.0, "new": 201.0}]
    assert g.rollbacks == 1 and g.saved_steps == list(range(1, restored + 1))  # later ones: abandoned branch
    assert set(g.streak.values()) == {0}
    state = g.state_dict()
    g2, _ = _guard(saved=())
    g2.load_state_dict(state)
    assert (g2.saved_steps, g2.rollbacks, g2.events) == (g.saved_steps, 1, g.events)


@pytest.mark.parametrize("signal,metric,value,window,old,new", [
    ("length", "rollout/response_length", 1.0, "eps_low_neg", 0.2, 0.6),  # 1 - 0.8 / 2
    ("entropy_low", "actor/entropy", 0.001, "eps_high_pos", 10.0, 21.0),  # weights > 1 raise entropy
    ("entropy_high", "actor/entropy", 9.0, "eps_low_pos", 0.2, 0.6),  # weights < 1 lower it
])
def test_each_signal_widens_the_window_the_paper_ties_to_it(signal, metric, value, window, old, new):
    g, w = _guard(["algorithm.eps_low_neg=0.2"])
    step, r = _drive(g, w, [{}, {}, {metric: value}, {metric: value}])
    assert (step, r.signals, r.action, r.restored_step) == (4, [signal], "rollback", 1)
    assert list(r.changes) == [window] and r.changes[window] == pytest.approx((old, new))


def test_reward_signal_fires_on_a_fall_below_its_best_and_widens_the_hardest_binding_window():
    g, w = _guard(["algorithm.eps_low_neg=0"])  # patience 2, widen_factor 2, checkpoints 1..5
    ok = {"rollout/accuracy": 0.4, "regime/neg_low/clip_frac": 1.0, "regime/pos_low/clip_frac": 0.05}
    fallen = {**ok, "rollout/accuracy": 0.1}  # < 0.33 x 0.4 (best running mean) = 0.132
    step, r = _drive(g, w, [ok] * 5 + [fallen] * 2)  # streak begins at 6, fires at 7: c + 1 < 6
    assert (step, r.signals, r.action, r.restored_step) == (7, ["reward"], "rollback", 4)
    assert r.changes == {"eps_low_neg": (0.0, 0.5)}  # clips 100% of its regime: 1 - 1/2
    assert g.events[-1]["window"] == "eps_low_neg" and g.events[-1]["metric"] == "rollout/accuracy"
    # a collapse from the first step is measured against the starting accuracy: with patience 2 it
    # fires at step 3 (reference 0.4 from step 1; 0.05 < 0.132 at steps 2 and 3)
    g, w = _guard(["algorithm.eps_low_neg=0"], saved=(0, 1, 2))
    step, r = _drive(g, w, [ok] + [{**ok, "rollout/accuracy": 0.05}] * 2)
    assert (step, r.action, r.restored_step) == (3, "rollback", 0)  # the step-0 checkpoint (streak began at 2)
    # once every group is all wrong nothing clips: the window is the one that clipped during the streak
    g, w = _guard(["algorithm.eps_low_neg=0"], saved=(0, 1, 2))
    dead = {"rollout/accuracy": 0.0, "regime/neg_low/clip_frac": 0.0, "regime/pos_low/clip_frac": 0.0}
    step, r = _drive(g, w, [ok, {**ok, "rollout/accuracy": 0.05}, dead])
    assert (step, r.action, r.changes) == (3, "rollback", {"eps_low_neg": (0.0, 0.5)})
    # a noisy run that never falls below a third of its best does not fire
    g, w = _guard()
    noisy = [{"rollout/accuracy": a} for a in (0.3, 0.55, 0.27, 0.5, 0.35, 0.56, 0.25, 0.48, 0.3, 0.6)]
    assert _drive(g, w, noisy) == (None, None)
    # nothing clips: the guard warns and says why; reward_fall=0 switches the signal off
    g, w = _guard()
    _, r = _drive(g, w, [{"rollout/accuracy": 0.4}] * 5 + [{"rollout/accuracy": 0.0}] * 2)
    assert (r.action, r.reason) == ("warn", "no window clips any of its regime's tokens: nothing to widen")
    g, w = _guard(["trainer.collapse_guard.reward_fall=0"])
    assert _drive(g, w, [{"rollout/accuracy": 0.4}] * 5 + [{"rollout/accuracy": 0.0}] * 3) == (None, None)


@pytest.mark.parametrize("extra,saved,reason", [
    ([], (3, 4), "no checkpoint from before the streak (needs step <= 1; saved: [3, 4])"),
    ([], (), "no checkpoint from before the streak (needs step <= 1; saved: none)"),
    (["algorithm.eps_high_neg=1000"], (1,), "eps_high_neg already at algorithm.window_max"),
])
def test_rollback_falls_back_to_a_warning_and_says_why(extra, saved, reason):
    g, w = _guard(extra, saved=saved)
    bad = {"rollout/repetition": 0.9}
    step, r = _drive(g, w, [{}, {}, bad, bad])  # streak begins at 3: needs c <= 1
    assert (step, r.action, r.reason, r.restored_step, r.changes) == (4, "warn", reason, None, {})
    assert g.events[-1]["action"] == "warn" and g.events[-1]["rollback_refused"] == reason
    assert g.rollbacks == 0 and g.saved_steps == list(saved)


def test_rollbacks_are_capped_and_stop_and_warn_act_as_before():
    g, w = _guard()
    g.rollbacks = 1  # max_rollbacks=1 already spent
    _, r = _drive(g, w, [{}, {}, {"rollout/repetition": 0.9}, {"rollout/repetition": 0.9}])
    assert (r.action, r.reason) == ("warn", "trainer.collapse_guard.max_rollbacks=1 rollbacks done")
    for action in ("stop", "warn"):
        g, w = _guard([f"trainer.collapse_guard.action={action}"])
        _, r = _drive(g, w, [{"rollout/response_length": 1.0, "actor/entropy": 0.001}] * 2)
        assert r.action == action and r.signals == ["length", "entropy_low"]
        assert [e["action"] for e in g.events] == [action, action]


def test_stop_on_trigger_is_a_deprecated_alias_of_action(capsys):
    assert compose(["trainer.collapse_guard.stop_on_trigger=true"]).trainer.collapse_guard.action == "stop"
    cg = compose(["trainer.collapse_guard.stop_on_trigger=false"]).trainer.collapse_guard
    assert (cg.action, cg.stop_on_trigger) == ("warn", None)
    assert "use trainer.collapse_guard.action=warn" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="contradicts trainer.collapse_guard.action='rollback'"):
        compose(GUARD + ["trainer.collapse_guard.stop_on_trigger=true"])


@pytest.mark.parametrize("overrides,key,fragment", [
    (["trainer.collapse_guard.action=pause"], "trainer.collapse_guard.action", "one of warn, stop, rollback"),
    (["trainer.collapse_guard.action=rollback"], "trainer.save_every", ">= 1 with trainer.collapse_guard.action"),
    (["algorithm=cispo", "trainer.collapse_guard.action=rollback", "trainer.save_every=1"],
     "trainer.collapse_guard.action", "warn or stop with algorithm.name=cispo"),
    (["trainer.collapse_guard.widen_factor=1"], "trainer.collapse_guard.widen_factor", "> 1"),
    (["trainer.collapse_guard.reward_fall=1"], "trainer.collapse_guard.reward_fall", "in [0, 1)"),
    (["trainer.collapse_guard.max_rollbacks=-1"], "trainer.collapse_guard.max_rollbacks", ">= 0"),
    (["algorithm.window_max.eps_high_neg=50"], "algorithm.window_max.eps_high_neg", ">= algorithm.eps_high_neg=100"),
    (["algorithm.window_max.eps_low_pos=1.5"], "algorithm.window_max.eps_low_pos", "and <= 1"),
    (["algorithm.window_max.eps_low_pos=0.1"], "algorithm.window_max.eps_low_pos", ">= algorithm.eps_low_pos=0.2"),
    (["algorithm=dapo", "algorithm.adaptive_windows.enabled=true"], "algorithm.adaptive_windows.enabled",
     "false with algorithm.name=dapo"),
    (["algorithm.adaptive_windows.repetition_max=2"], "algorithm.adaptive_windows.repetition_max", "in [0, 1]"),
    (["algorithm.adaptive_windows.length_min=-1"], "algorithm.adaptive_windows.length_min", ">= 0"),
    (["algorithm.adaptive_windows.entropy_correct_min=5"], "algorithm.adaptive_windows.entropy_correct_min",
     "< algorithm.adaptive_windows.entropy_correct_max=3.0"),
    (["algorithm.adaptive_windows.step_factor=1"], "algorithm.adaptive_windows.step_factor", "> 1"),
    (["algorithm.adaptive_windows.relax=2"], "algorithm.adaptive_windows.relax", "in [0, 1]"),
    (["algorithm.adaptive_windows.clip_frac_max=0"], "algorithm.adaptive_windows.clip_frac_max", "in (0, 1]"),
    (["algorithm.adaptive_windows.enabled=maybe"], "algorithm.adaptive_windows.enabled", "not a valid bool"),
])
def test_new_keys_are_validated_in_one_line(overrides, key, fragment):
    with pytest.raises(ConfigError) as e:
        compose(overrides)
    msg = str(e.value)
    assert key in msg and fragment in msg and "\n" not in msg


def test_defaults_leave_windows_fixed_and_the_guard_warning():
    cfg = compose([])
    assert cfg.algorithm.adaptive_windows.enabled is False and cfg.trainer.collapse_guard.action == "warn"
    assert not math.isnan(cfg.trainer.collapse_guard.widen_factor)
