"""Streaming generation inside one generator actor (see EngineLoop)."""
from __future__ import annotations

PARTIAL_ROLLOUTS = ("continue", "abort")  # generator.partial_rollout's choices
