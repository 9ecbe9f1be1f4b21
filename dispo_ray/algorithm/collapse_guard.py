"""Collapse guard: watch the signals the DISPO paper ties to collapse and act when one holds for
``patience`` consecutive steps.

    signal        condition                                          window the paper ties to it
    repetition    share of repetitive responses > repetition_max     eps_high_neg (too tight: repetition)
    length        mean response length < length_min                  eps_low_neg  (too tight: length collapse)
    entropy_low   mean token entropy < entropy_min                   eps_high_pos (weights > 1 on correct raise entropy)
    entropy_high  mean token entropy > entropy_max                   eps_low_pos  (weights < 1 on correct lower it)

``trainer.collapse_guard.action`` says what a trigger does:

    warn      a warning line and a guard event (``collapse_events`` in summary.json)
    stop      also save a checkpoint and stop the run
    rollback  restore the newest checkpoint from before the streak, widen the signal's window by
              ``widen_factor`` (:func:`dispo_ray.algorithm.windows.widen`, up to ``algorithm.window_max``)
              and continue (:mod:`dispo_ray.algorithm.rollback` does it)

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

from dispo_ray.algorithm.windows import widen

SIGNALS = {
    "repetition": ("rollout/repetition", lambda v, c: v > c.repetition_max),
    "length": ("rollout/response_length", lambda v, c: v < c.length_min),
    "entropy_low": ("actor/entropy", lambda v, c: v < c.entropy_min),
    "entropy_high": ("actor/entropy", lambda v, c: v > c.entropy_max),
}
SIGNAL_WINDOW = {"repetition": "eps_high_neg", "length": "eps_low_neg",
                 "entropy_low": "eps_high_pos", "entropy_high": "eps_low_pos"}


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

    def update(self, step: int, metrics: Mapping[str, float]) -> List[str]:
        """Feed one step's metrics; return the signals that trigger at this step."""
        if not self.cfg.enabled:
            return []
        fired = []
        for name, (key, bad) in SIGNALS.items():
            value = metrics.get(key)
            if value is None or value != value:  # missing or NaN: no evidence either way
                continue
            self.streak[name] = self.streak[name] + 1 if bad(value, self.cfg) else 0
            if self.streak[name] == self.cfg.patience:  # fire once per sustained episode
                fired.append(name)
                self.events.append({"step": step, "signal": name, "metric": key, "value": value})
        return fired

    def record_checkpoint(self, step: int) -> None:
        if step not in self.saved_steps:
            self.saved_steps.append(step)

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
                self.streak = {name: 0 for name in SIGNALS}
        for event in self.events[len(self.events) - len(fired):]:
            event["action"] = r.action
            if r.reason:
                event["rollback_refused"] = r.reason
            if r.restored_step is not None:
                key = SIGNAL_WINDOW[event["signal"]]
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
        for signal in fired:
            key = SIGNAL_WINDOW[signal]
            new = widen(key, windows[key], self.cfg.widen_factor, limits[key])
            if new > windows[key]:
                changes[key] = (windows[key], new)
        if not changes:
            keys = sorted({SIGNAL_WINDOW[s] for s in fired})
            return f"{', '.join(keys)} already at algorithm.window_max"
        return max(before), changes

    def state_dict(self) -> Dict:
        return {"streak": dict(self.streak), "events": list(self.events), "saved_steps": list(self.saved_steps),
                "rollbacks": self.rollbacks}

    def load_state_dict(self, state: Dict) -> None:
        self.streak.update(state["streak"])
        self.events = list(state["events"])
        self.saved_steps = [int(c) for c in state.get("saved_steps", [])]
        self.rollbacks = int(state.get("rollbacks", 0))
