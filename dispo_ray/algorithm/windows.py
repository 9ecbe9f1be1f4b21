"""DISPO's four clip windows at run time: the one place that changes them.

The learner ranks read ``algorithm.eps_{low,high}_{pos,neg}`` from their copy of the config on
every loss call. Two things move them during a run, both through :meth:`LossWindows.set`, which
sends the new values to every rank (``LearnerGroup.set_loss_windows``, applied before the next
``train_step``: calls on one actor run in order):

    the collapse guard's rollback  (dispo_ray.algorithm.collapse_guard / dispo_ray.rollout.rollback): widens the
                                    window the paper ties to the signal, by widen_factor
    adaptive windows               (dispo_ray.algorithm.adaptive_windows): widens while a signal is out of
                                    its band, relaxes toward the configured value inside it

"Widen by f" acts in ratio space, on the window's bound: the upper bound ``1 + eps_high`` is
multiplied by f, the lower bound ``1 - eps_low`` divided by f, so it also moves a window that is
closed (eps = 0): ``eps_high -> (1 + eps_high) * f - 1``, ``eps_low -> 1 - (1 - eps_low) / f``.
Every automatic value stays between the configured value and ``algorithm.window_max``.

The windows in force are driver state: saved with every checkpoint, re-applied on resume, and
logged every step as ``windows/<key>`` (the values the step's update used).
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Tuple

WINDOW_KEYS = ("eps_low_pos", "eps_high_pos", "eps_low_neg", "eps_high_neg")
# each window bounds the weights of one regime (dispo_ray.algorithm.losses.REGIMES); its clip share
# is logged as regime/<regime>/clip_frac
REGIME_OF_WINDOW = {"eps_high_pos": "pos_high", "eps_low_pos": "pos_low", "eps_high_neg": "neg_high",
                    "eps_low_neg": "neg_low"}


def widen(key: str, value: float, factor: float, limit: float) -> float:
    """``value`` of window ``key`` widened by ``factor`` in ratio space, capped at ``limit``."""
    new = 1.0 - (1.0 - value) / factor if key.startswith("eps_low") else (1.0 + value) * factor - 1.0
    return min(max(new, value), limit)


class LossWindows:
    """The windows in force (``current``), the configured ones and their limits."""

    def __init__(self, algorithm: Any, learners: Optional[Any] = None):
        self.configured = {k: float(getattr(algorithm, k)) for k in WINDOW_KEYS}
        self.limits = {k: float(getattr(algorithm.window_max, k)) for k in WINDOW_KEYS}
        self.current = dict(self.configured)
        self.learners = learners
        self.enabled = algorithm.name == "dispo"  # the other losses do not read these keys

    def set(self, new: Mapping[str, float]) -> Dict[str, Tuple[float, float]]:
        """Apply the values that differ; return ``{key: (old, new)}`` of what changed."""
        changed = {k: (self.current[k], float(v)) for k, v in new.items() if float(v) != self.current[k]}
        if changed and self.learners is not None:
            self.learners.set_loss_windows({k: v for k, (_, v) in changed.items()})
        self.current.update({k: v for k, (_, v) in changed.items()})
        return changed

    def push(self) -> None:
        """Send every window in force to the learners (a rebuilt learner group starts configured)."""
        if self.enabled and self.learners is not None:
            self.learners.set_loss_windows(dict(self.current))

    def metrics(self) -> Dict[str, float]:
        return {f"windows/{k}": v for k, v in self.current.items()} if self.enabled else {}

    def state_dict(self) -> Dict[str, float]:
        return dict(self.current)

    def load_state_dict(self, state: Optional[Mapping[str, float]]) -> None:
        """Re-apply saved windows (a checkpoint written before windows were saved has none)."""
        if state:
            self.set({k: state[k] for k in WINDOW_KEYS if k in state})
