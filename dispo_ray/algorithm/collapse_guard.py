"""Collapse guard: watch the signals the DISPO paper ties to collapse and act when one holds for
``patience`` consecutive steps.

    signal        condition                                          window the paper ties to it
    repetition    share of repetitive responses > repetition_max     eps_high_neg (too tight: repetition)
    length        mean response length < length_min                  eps_low_neg  (too tight: length collapse)
    entropy_low   mean token entropy < entropy_min                   eps_high_pos (weights > 1 on correct raise entropy)
    entropy_high  mean token entropy > entropy_max                   eps_low_pos  (weights < 1 on correct lower it)
    reward        batch accuracy < reward_fall x its best mean of    the window that clips the largest share
                  up to 5 consecutive steps so far (0 = off)         of its regime over the streak (regime/*/clip_frac)

The four paper signals, their metrics and windows are derived from the regime table
:data:`dispo_ray.algorithm.regimes.REGIMES` (``signal``, ``guard_metric``, ``guard_limit``,
``window``); they are checked, and reported when several fire at once, in the order of
:data:`SIGNAL_ORDER`. The reward signal is not one of the paper's: it catches collapses the
paper's signals miss (docs/windows.md). The paper ties no window to it; the window that binds
hardest (clips most of its regime's tokens) is the direct suspect.

``trainer.collapse_guard.action`` says what a trigger does:

    warn      a warning line and a guard event (``collapse_events`` in summary.json)
    stop      also save a checkpoint and stop the run
    rollback  restore the newest checkpoint from before the streak, widen the signal's window by
              ``widen_factor`` (:func:`dispo_ray.algorithm.windows.widen`, up to ``algorithm.window_max``)
              and continue (:mod:`dispo_ray.rollout.rollback` does it)

Which checkpoint: a signal firing at step S began its streak at ``b = S - patience + 1``. The
weights of checkpoint c (saved after c updates) sampled the batches trained at steps c+1 ..
c+1+k (k = ``trainer.max_staleness``) and were measured by the learner at step c+1, so the newest
checkpoint with ``c + 1 + k < b`` is the newest one none of whose batches is part of the streak.
A rollback falls back to a warning, saying why, when there is no such checkpoint, when every
window it would widen is already at its limit, or after ``max_rollbacks`` rollbacks. After a
rollback the streaks restart from zero; the events, the rollback count and the windows are kept
(they are what the run learned), and checkpoints later than the restored one are forgotten.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Tuple

from dispo_ray.algorithm.metric_keys import ROLLOUT_ACCURACY
from dispo_ray.algorithm.regimes import BY_SIGNAL, REGIMES, Regime
from dispo_ray.algorithm.windows import widen

SIGNAL_ORDER = ("repetition", "length", "entropy_low", "entropy_high")  # the sudden collapses first


def _signal(r: Regime):
    return r.guard_metric, lambda v, c: r.out_of_band(v, getattr(c, r.guard_limit))


# signal -> (metric, out of band? given the value and trainer.collapse_guard)
SIGNALS = {name: _signal(BY_SIGNAL[name]) for name in SIGNAL_ORDER}
SIGNAL_WINDOW = {name: BY_SIGNAL[name].window for name in SIGNAL_ORDER}
REWARD_KEY, REWARD_WINDOW = ROLLOUT_ACCURACY, 5

ACTIONS = ("warn", "stop", "rollback")  # trainer.collapse_guard.action's choices (the module docstring)


@dataclass
class Response:
    """What the guard decided at one step: ``action`` is what is done (a rollback that is not
    possible becomes ``warn`` with its ``reason``)."""
    step: int
    signals: List[str]
    action: str
    restored_step: Optional[int] = None
    changes: Dict[str, Tuple[float, float]] = field(default_factory=dict)  # window -> (old, new)
    reason: str = ""


class CollapseGuard:
    def __init__(self, cfg, max_staleness: int = 0) -> None:
        self.cfg, self.k = cfg, max_staleness
        self.streak: Dict[str, int] = {name: 0 for name in SIGNALS}
        self.events: List[Dict] = []
        self.saved_steps: List[int] = []  # steps of the checkpoints on the current branch
        self.rollbacks = 0
        self.streak["reward"] = 0
        self.recent: List[float] = []  # the last REWARD_WINDOW batch accuracies
        self.reward_best = 0.0  # best REWARD_WINDOW-step mean so far
        self.binding: List[Dict[str, float]] = []  # window -> share of its regime clipped, last patience steps

    def update(self, step: int, metrics: Mapping[str, float]) -> List[str]:
        """Feed one step's metrics; return the signals that trigger at this step."""
        if not self.cfg.enabled:
            return []
        fired = []
        for name, (key, bad) in SIGNALS.items():
            value = metrics.get(key)
            if value is None or value != value:  # missing or NaN: no evidence either way
                continue
            self._count(step, name, key, value, bad(value, self.cfg), fired)
        # over the streak, not the last step: once every group is all wrong no token has A != 0
        # and no window clips anything, though one did while accuracy was falling
        step_binding = {r.window: float(metrics[r.clip_frac_key]) for r in REGIMES if r.clip_frac_key in metrics}
        self.binding = (self.binding + [step_binding])[-self.cfg.patience:]
        reward = metrics.get(REWARD_KEY)
        if self.cfg.reward_fall > 0 and reward is not None and reward == reward:
            # the reference is there from the first step (a mean of what there is so far), so a
            # collapse that begins at once is compared with the starting accuracy, not with itself
            self.recent = (self.recent + [float(reward)])[-REWARD_WINDOW:]
            self.reward_best = max(self.reward_best, sum(self.recent) / len(self.recent))
            self._count(step, "reward", REWARD_KEY, reward, reward < self.cfg.reward_fall * self.reward_best, fired)
        return fired

    def _count(self, step: int, name: str, key: str, value: float, bad: bool, fired: List[str]) -> None:
        self.streak[name] = self.streak[name] + 1 if bad else 0
        if self.streak[name] == self.cfg.patience:  # fire once per sustained episode
            fired.append(name)
            self.events.append({"step": step, "signal": name, "metric": key, "value": value})

    def window_for(self, signal: str) -> Optional[str]:
        """The window a signal widens: the paper's for its four, the hardest-binding one for reward."""
        if signal != "reward":
            return SIGNAL_WINDOW[signal]
        binding: Dict[str, float] = {}
        for step_binding in self.binding:
            for w, f in step_binding.items():
                if f > 0:
                    binding[w] = max(binding.get(w, 0.0), f)
        return max(binding, key=binding.get) if binding else None

    def record_checkpoint(self, step: int) -> None:
        if step not in self.saved_steps:
            self.saved_steps.append(step)

    def protected_checkpoints(self, step: int) -> List[int]:
        """The checkpoint a rollback triggered from now on could restore and retention must keep:
        the newest c with c + 1 + k < b for the earliest streak start b still possible (a streak
        running now began at ``step - streak + 1``; a new one begins at ``step + 1`` or later)."""
        if not self.cfg.enabled or self.cfg.action != "rollback" or self.rollbacks >= self.cfg.max_rollbacks:
            return []
        begin = step + 1 - max(self.streak.values(), default=0)
        before = [c for c in self.saved_steps if c <= begin - 2 - self.k]
        return [max(before)] if before else []

    def forget_checkpoints(self, deleted: List[int]) -> None:
        self.saved_steps = [c for c in self.saved_steps if c not in set(deleted)]

    def respond(self, step: int, fired: List[str], windows: Mapping[str, float],
                limits: Mapping[str, float]) -> Response:
        """Decide the action for the signals that fired at ``step`` (given the windows in force
        and their limits) and record it in this step's events."""
        r = Response(step=step, signals=list(fired), action=self.cfg.action)
        if r.action == "rollback":
            plan = self._plan_rollback(step, fired, windows, limits)
            if isinstance(plan, str):
                r.action, r.reason = "warn", plan
            else:
                r.restored_step, r.changes = plan
                self.rollbacks += 1
                self.saved_steps = [c for c in self.saved_steps if c <= r.restored_step]
                self.streak = {name: 0 for name in self.streak}
        for event in self.events[len(self.events) - len(fired):]:
            event["action"] = r.action
            if r.reason:
                event["rollback_refused"] = r.reason
            key = self.window_for(event["signal"])
            if r.restored_step is not None and key is not None:
                old, new = r.changes.get(key, (windows[key], windows[key]))
                event.update(restored_step=r.restored_step, window=key, old=old, new=new)
        return r

    def _plan_rollback(self, step: int, fired: List[str], windows: Mapping[str, float],
                       limits: Mapping[str, float]):
        """(restored step, {window: (old, new)}), or the reason there is no rollback."""
        if self.rollbacks >= self.cfg.max_rollbacks:
            return f"trainer.collapse_guard.max_rollbacks={self.cfg.max_rollbacks} rollbacks done"
        latest_ok = step - self.cfg.patience + 1 - 2 - self.k  # c + 1 + k < streak start
        before = [c for c in self.saved_steps if c <= latest_ok]
        if not before:
            return (f"no checkpoint from before the streak (needs step <= {latest_ok}; saved: "
                    f"{sorted(self.saved_steps) or 'none'})")
        changes: Dict[str, Tuple[float, float]] = {}
        keys = sorted({k for k in (self.window_for(s) for s in fired) if k is not None})
        if not keys:
            return "no window clips any of its regime's tokens: nothing to widen"
        for key in keys:
            new = widen(key, windows[key], self.cfg.widen_factor, limits[key])
            if new > windows[key]:
                changes[key] = (windows[key], new)
        if not changes:
            return f"{', '.join(keys)} already at algorithm.window_max"
        return max(before), changes

    def state_dict(self) -> Dict:
        return {"streak": dict(self.streak), "events": list(self.events), "saved_steps": list(self.saved_steps),
                "rollbacks": self.rollbacks, "recent": list(self.recent), "reward_best": self.reward_best}

    def load_state_dict(self, state: Dict) -> None:
        self.streak.update(state["streak"])
        self.events = list(state["events"])
        self.saved_steps = [int(c) for c in state.get("saved_steps", [])]
        self.rollbacks = int(state.get("rollbacks", 0))
        self.recent = [float(x) for x in state.get("recent", [])]
        self.reward_best = float(state.get("reward_best", 0.0))
