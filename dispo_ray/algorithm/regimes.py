"""DISPO's four regimes, once: the window that bounds each, its metrics and the collapse signal
the paper ties to it (../shared/PAPER.md). The collapse guard's signals
(:mod:`dispo_ray.algorithm.collapse_guard`) and the adaptive controller's rules
(:mod:`dispo_ray.algorithm.adaptive_windows`) are derived from :data:`REGIMES`.

A response token with advantage A != 0 and importance ratio r falls in one regime; its weight
``w = clip(r, 1 - eps_low, 1 + eps_high)`` is bounded by one window:

    regime    tokens        window        paper's finding                 signal        out of band when
    pos_high  A > 0, r > 1  eps_high_pos  raises entropy (exploration)    entropy_low   entropy < *_min
    pos_low   A > 0, r < 1  eps_low_pos   lowers entropy (distillation)   entropy_high  entropy > *_max
    neg_high  A < 0, r > 1  eps_high_neg  too tight: repetition collapse  repetition    repetition > repetition_max
    neg_low   A < 0, r < 1  eps_low_neg   too tight: length collapse      length        length < length_min

(repetition: rollout/repetition, the share of repetitive responses; length: rollout/response_length,
the mean response length in tokens; entropy: see below.)

Each regime logs ``regime/<name>/token_frac`` and ``regime/<name>/clip_frac``; "widen the window
of a signal" always means the window of that signal's regime.

The entropy metric differs on purpose between the two users of the table, and only for the two
correct-response regimes:

    collapse guard   actor/entropy           (trainer.collapse_guard.entropy_min / entropy_max)
    controller       actor/entropy_correct   (algorithm.adaptive_windows.entropy_correct_min / _max)

The guard looks for a collapse of the whole policy, the paper's "mean token entropy" over every
response token, with wide limits held for ``patience`` steps: a policy going deterministic or
diffuse shows there whatever the cause. The controller steers eps_high_pos and eps_low_pos, which
weight only tokens with A > 0, so it measures what those windows move, the entropy of correct
responses; the entropy of incorrect responses moves with the other two windows (it rose in the
regime lab's eps_low_neg collapse, docs/regime_lab) and would blur that feedback. Repetition and
length are the same metric and the same band names for both.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

from dispo_ray.algorithm import metric_keys as K


@dataclass(frozen=True)
class Regime:
    name: str            # pos_high | pos_low | neg_high | neg_low: sign of A, side of r
    window: str          # the eps_* key bounding the weights of its tokens
    signal: str          # the collapse guard's name for its signal
    fires_above: bool    # out of band above the limit (True) or below it (False)
    guard_metric: str    # what the collapse guard watches ...
    guard_limit: str     # ... against this field of trainer.collapse_guard
    steer_metric: str    # what the adaptive controller watches ...
    steer_limit: str     # ... against this field of algorithm.adaptive_windows

    @property
    def token_frac_key(self) -> str:
        return K.regime_key(self.name, "token_frac")

    @property
    def clip_frac_key(self) -> str:
        return K.regime_key(self.name, "clip_frac")

    def out_of_band(self, value: float, limit: float) -> bool:
        return value > limit if self.fires_above else value < limit


REGIMES: Tuple[Regime, ...] = (
    Regime("pos_high", "eps_high_pos", "entropy_low", False,
           K.ACTOR_ENTROPY, "entropy_min", K.ACTOR_ENTROPY_CORRECT, "entropy_correct_min"),
    Regime("pos_low", "eps_low_pos", "entropy_high", True,
           K.ACTOR_ENTROPY, "entropy_max", K.ACTOR_ENTROPY_CORRECT, "entropy_correct_max"),
    Regime("neg_high", "eps_high_neg", "repetition", True,
           K.ROLLOUT_REPETITION, "repetition_max", K.ROLLOUT_REPETITION, "repetition_max"),
    Regime("neg_low", "eps_low_neg", "length", False,
           K.ROLLOUT_RESPONSE_LENGTH, "length_min", K.ROLLOUT_RESPONSE_LENGTH, "length_min"),
)
REGIME_NAMES: Tuple[str, ...] = tuple(r.name for r in REGIMES)
BY_NAME: Dict[str, Regime] = {r.name: r for r in REGIMES}
BY_WINDOW: Dict[str, Regime] = {r.window: r for r in REGIMES}
BY_SIGNAL: Dict[str, Regime] = {r.signal: r for r in REGIMES}
