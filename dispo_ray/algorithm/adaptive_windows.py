"""Adaptive windows (``algorithm.adaptive_windows``): keep DISPO's collapse signals in their bands
by moving each of the four windows between its configured value and ``algorithm.window_max``.

Which window moves for which signal follows the paper's four regimes: :data:`RULES` is derived
from the regime table :data:`dispo_ray.algorithm.regimes.REGIMES` (each regime's window, its
``steer_metric`` and its band ``steer_limit``; why the entropy is that of correct responses here
and the mean token entropy in the collapse guard is said there).

Control law, once per step s, from the step's metrics (rollout metrics of the batch trained at s,
learner metrics of that update); ``widen`` is :func:`dispo_ray.algorithm.windows.widen` with
``step_factor`` (ratio space: ``1 + eps_high`` times f, ``1 - eps_low`` divided by f), capped at
``window_max``; ``relax`` moves ``relax`` of the way back: ``eps + relax * (configured - eps)``:

    window        signal (metric)                                  out of band         then
    eps_high_neg  repetition share (rollout/repetition)            > repetition_max    widen
    eps_low_neg   mean response length (rollout/response_length)   < length_min        widen
    eps_high_pos  entropy of correct responses (actor/entropy_correct) < entropy_correct_min  widen
                  (more weight > 1 on correct tokens raises their entropy)
    eps_low_pos   entropy of correct responses                     > entropy_correct_max  widen
                  (weights < 1 on correct tokens lower their entropy: distillation)

    any window   share of its regime's tokens it clipped           > clip_frac_max     widen
                 (regime/<regime>/clip_frac: pos_high -> eps_high_pos, pos_low -> eps_low_pos,
                 neg_high -> eps_high_neg, neg_low -> eps_low_neg)

    otherwise (signal in band): relax toward the configured value (``relax = 0``: stay);
    a missing or NaN signal (e.g. no correct response in the batch): the window stays.

The clip band is the direct measure of "too tight": a window that clips most of its regime's
tokens has taken that regime's weights away (at 0 it clips every one), and it moves before the
paper's downstream signals do, which react too late (docs/windows.md); the default windows clip far
less than the band (their clip fractions are in ``regime/*/clip_frac``), so it leaves them alone.

So each window only ever widens away from its configured value (the configured value is the
tightest the controller goes) and comes back gradually once its signal is in band; the band and
the relax rate set how much hysteresis there is. The new windows apply from the next step on, so
``windows/*`` of step s are the values step s trained with. Under asynchrony
(``max_staleness = k``) the signals come from rollouts up to k versions old: the controller
reacts k steps later, which the small per-step factor tolerates. With the collapse guard's
rollback also on, a window it widened is relaxed like any other once its signal is in band.
The controller keeps no state beyond the windows themselves (saved with every checkpoint by
:class:`~dispo_ray.algorithm.windows.LossWindows`), so a resumed run continues with the adapted windows.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, Mapping, Tuple

from dispo_ray.algorithm.regimes import BY_WINDOW, REGIMES, Regime
from dispo_ray.algorithm.windows import widen


def _rule(r: Regime) -> Tuple[str, Callable[[float, Any], bool]]:
    return r.steer_metric, lambda v, c: r.out_of_band(v, getattr(c, r.steer_limit))


# window -> (metric, out of band? given the value and algorithm.adaptive_windows)
RULES: Dict[str, Tuple[str, Callable[[float, Any], bool]]] = {r.window: _rule(r) for r in REGIMES}


def _value(metrics: Mapping[str, float], key: str):
    v = metrics.get(key)
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


class AdaptiveWindows:
    def __init__(self, cfg: Any, configured: Mapping[str, float], limits: Mapping[str, float]):
        self.cfg, self.configured, self.limits = cfg, dict(configured), dict(limits)

    def propose(self, metrics: Mapping[str, float], current: Mapping[str, float]) -> Dict[str, float]:
        """The windows for the next step, given this step's metrics and the windows it used."""
        out = dict(current)
        for key, (metric, out_of_band) in RULES.items():
            signal = _value(metrics, metric)
            clip = _value(metrics, BY_WINDOW[key].clip_frac_key)
            if signal is None and clip is None:
                continue  # no evidence either way
            cur = current[key]
            if (signal is not None and out_of_band(signal, self.cfg)) or (clip is not None and
                                                                          clip > self.cfg.clip_frac_max):
                out[key] = widen(key, cur, self.cfg.step_factor, self.limits[key])
            else:
                out[key] = cur + self.cfg.relax * (self.configured[key] - cur)
        return out
