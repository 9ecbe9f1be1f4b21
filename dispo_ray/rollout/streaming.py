"""Streaming rollouts (see StreamingProducer)."""
from __future__ import annotations

ROLLOUT_MODES = ("batch", "stream")  # trainer.rollout_mode's choices
