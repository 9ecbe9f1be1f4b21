"""DISPO's four clip windows at run time: driver state, sent with every batch to the loss.

The windows in force live in the driver (:class:`LossWindows`, ``current``); the config keeps the
configured values and is never written. Step s+1 trains with the windows decided after step s:

    after step s   the collapse guard's rollback (dispo_ray.algorithm.collapse_guard,
                   dispo_ray.rollout.rollback) widens the window of its signal's regime by
                   widen_factor, else adaptive windows (dispo_ray.algorithm.adaptive_windows) widen
                   while a signal is out of its band and relax toward the configured value in it;
                   both through :meth:`LossWindows.set`
    step s+1       the driver passes ``current`` with the batch:
                   ``LearnerGroup.train_step(batch, windows)`` -> every rank's ``train_step`` ->
                   the loss's ``windows=`` (:func:`dispo_ray.algorithm.losses.dispo_loss`)

So a learner holds no window between steps: a rebuilt learner group (learner recovery) trains the
next batch with the windows the driver sends, whatever it was built with.

"Widen by f" acts in ratio space, on the window's bound: the upper bound ``1 + eps_high`` is
multiplied by f, the lower bound ``1 - eps_low`` divided by f, so it also moves a window that is
closed (eps = 0): ``eps_high -> (1 + eps_high) * f - 1``, ``eps_low -> 1 - (1 - eps_low) / f``.
Every automatic value stays between the configured value and ``algorithm.window_max``.

The windows in force are saved with every checkpoint, re-applied on resume, and logged every step
as ``windows/<key>`` (the values the step's update used; dispo only).
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Tuple

from dispo_ray.algorithm.metric_keys import window_key
from dispo_ray.algorithm.regimes import REGIMES

WINDOW_KEYS = ("eps_low_pos", "eps_high_pos", "eps_low_neg", "eps_high_neg")  # in the config's order
# each window bounds the weights of one regime (dispo_ray.algorithm.regimes); its clip share is
# logged as regime/<regime>/clip_frac
REGIME_OF_WINDOW = {r.window: r.name for r in REGIMES}


def widen(key: str, value: float, factor: float, limit: float) -> float:
    """``value`` of window ``key`` widened by ``factor`` in ratio space, capped at ``limit``."""
    new = 1.0 - (1.0 - value) / factor if key.startswith("eps_low") else (1.0 + value) * factor - 1.0
    return min(max(new, value), limit)


def resolve(algorithm: Any, windows: Optional[Mapping[str, float]] = None) -> Dict[str, float]:
    """The four windows a loss call uses: ``windows`` where given, the configured
    ``algorithm.eps_*`` for the rest. A key that is not a DISPO window raises ``KeyError``."""
    unknown = sorted(set(windows or {}) - set(WINDOW_KEYS))
    if unknown:
        raise KeyError(f"not a DISPO window: {unknown}; the windows are {', '.join(WINDOW_KEYS)}")
    given = dict(windows or {})
    return {k: float(given[k]) if k in given else float(getattr(algorithm, k)) for k in WINDOW_KEYS}


class LossWindows:
    """The windows in force (``current``), the configured ones and their limits."""

    def __init__(self, algorithm: Any):
        self.configured = {k: float(getattr(algorithm, k)) for k in WINDOW_KEYS}
        self.limits = {k: float(getattr(algorithm.window_max, k)) for k in WINDOW_KEYS}
        self.current = dict(self.configured)
        self.enabled = algorithm.name == "dispo"  # the other losses do not read these keys

    def set(self, new: Mapping[str, float]) -> Dict[str, Tuple[float, float]]:
        """Take the values that differ; return ``{key: (old, new)}`` of what changed."""
        changed = {k: (self.current[k], float(v)) for k, v in new.items() if float(v) != self.current[k]}
        self.current.update({k: v for k, (_, v) in changed.items()})
        return changed

    def in_force(self) -> Dict[str, float]:
        """A copy of the windows the next update trains with (what the driver sends with its batch)."""
        return dict(self.current)

    def metrics(self) -> Dict[str, float]:
        return {window_key(k): v for k, v in self.current.items()} if self.enabled else {}

    def state_dict(self) -> Dict[str, float]:
        return dict(self.current)

    def load_state_dict(self, state: Optional[Mapping[str, float]]) -> None:
        """Re-apply saved windows (a checkpoint written before windows were saved has none)."""
        if state:
            self.set({k: state[k] for k in WINDOW_KEYS if k in state})
