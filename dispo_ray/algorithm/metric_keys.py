"""The metric keys that one module writes and another reads, named once.

metrics.jsonl, TensorBoard, W&B, docs and tests use these strings as they are: a key is never
renamed here, only named. A key written and read in one module only (timing/*, staleness/*,
actor/loss, ...) stays a literal there. Grouped by the writer:

    rollout/*   dispo_ray.rollout.driver.rollout_metrics, one value per trained batch (a row with
                ROLLOUT_SAMPLES is a training step; the step-0 row is the initial evaluation)
    actor/*     dispo_ray.algorithm.losses.summarize_metrics (the update's ratios and entropies)
    regime/<regime>/{token_frac,clip_frac}
                dispo_ray.algorithm.losses.summarize_metrics: the share of response tokens in the
                regime, and the share of the regime's tokens whose weight its window clipped
    windows/<eps key>   dispo_ray.algorithm.windows.LossWindows.metrics: the windows the step used
    eval/*, collapse/*, perf/*   the driver's evaluation, collapse guard and step timing
"""
from __future__ import annotations

ROLLOUT_REWARD = "rollout/reward"
ROLLOUT_ACCURACY = "rollout/accuracy"
ROLLOUT_RESPONSE_LENGTH = "rollout/response_length"
ROLLOUT_TRUNCATED_FRAC = "rollout/truncated_frac"
ROLLOUT_REPETITION = "rollout/repetition"
ROLLOUT_SAMPLES = "rollout/samples"
ROLLOUT_TRAIN_SAMPLES = "rollout/train_samples"

ACTOR_PREFIX = "actor/"
ACTOR_ENTROPY = ACTOR_PREFIX + "entropy"
ACTOR_ENTROPY_CORRECT = ACTOR_PREFIX + "entropy_correct"
ACTOR_ENTROPY_INCORRECT = ACTOR_PREFIX + "entropy_incorrect"
ACTOR_RATIO_MEAN = ACTOR_PREFIX + "ratio_mean"
ACTOR_RATIO_MAX = ACTOR_PREFIX + "ratio_max"

EVAL_ACCURACY = "eval/accuracy"
COLLAPSE_EVENTS = "collapse/events"
COLLAPSE_ROLLBACKS = "collapse/rollbacks"
PERF_TOKENS_PER_S = "perf/tokens_per_s"  # trained tokens per second of the step (0 when no group was kept)
PERF_GENERATED_TOKENS_PER_S = "perf/generated_tokens_per_s"  # sampled response tokens per second of the step
ROLLOUT_MULTI_VERSION_FRAC = "rollout/multi_version_frac"  # samples whose tokens span two or more versions
ROLLOUT_GROUPS_KEPT = "rollout/groups_kept"


def regime_key(regime: str, what: str) -> str:
    """``regime/<regime>/<what>``, ``what`` in ``token_frac`` | ``clip_frac``."""
    return f"regime/{regime}/{what}"


def window_key(window: str) -> str:
    """``windows/<window>``: the value of a DISPO window a step trained with."""
    return f"windows/{window}"
