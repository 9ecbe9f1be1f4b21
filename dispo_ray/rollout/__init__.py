"""Rollout and the training driver (sampling, staleness, evaluation, the loop): changes when how a step runs does."""
