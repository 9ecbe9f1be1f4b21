"""Collapse guard: watch the signals the DISPO paper ties to collapse and raise the alarm when
one holds for ``patience`` consecutive steps.

    repetition  share of repetitive responses > repetition_max   (too-tight eps_high_neg)
    length      mean response length < length_min                 (too-tight eps_low_neg)
    entropy     mean token entropy < entropy_min or > entropy_max (entropy collapse / explosion)

The driver warns loudly on a trigger and, with ``stop_on_trigger``, saves a checkpoint and stops.
"""
from __future__ import annotations

from typing import Dict, List, Mapping

SIGNALS = {
    "repetition": ("rollout/repetition", lambda v, c: v > c.repetition_max),
    "length": ("rollout/response_length", lambda v, c: v < c.length_min),
    "entropy_low": ("actor/entropy", lambda v, c: v < c.entropy_min),
    "entropy_high": ("actor/entropy", lambda v, c: v > c.entropy_max),
}


class CollapseGuard:
    def __init__(self, cfg) -> None:
        self.cfg = cfg
        self.streak: Dict[str, int] = {name: 0 for name in SIGNALS}
        self.events: List[Dict] = []

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

    def state_dict(self) -> Dict:
        return {"streak": dict(self.streak), "events": list(self.events)}

    def load_state_dict(self, state: Dict) -> None:
        self.streak.update(state["streak"])
        self.events = list(state["events"])
