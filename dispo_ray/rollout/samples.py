"""The learner's batch: :func:`collate` turns a list of :class:`~dispo_ray.sample.Sample` into
right-padded ``[batch, seq]`` tensors in which position ``t`` holds the value for token ``t`` of
``input_ids`` (so ``old_log_probs[b, t] = log pi_behaviour(input_ids[b, t] | input_ids[b, :t])`` on
response positions, and ``response_mask[b, t] = 1`` exactly there).
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch

from dispo_ray.sample import Sample


def collate(samples: List[Sample], pad_token_id: int, pad_to: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """Right-pad prompt+response into tensors the learner trains on.

    Returns ``input_ids, attention_mask, response_mask`` (long / float), ``old_log_probs``,
    ``advantages`` (float32, ``[B, T]``, zero off the response), and per-sample ``correct``,
    ``version`` and ``reward`` (``[B]``).
    """
    if not samples:
        raise ValueError("collate: empty list of samples")
    lengths = [len(s.prompt_token_ids) + len(s.response_token_ids) for s in samples]
    T = max(lengths) if pad_to is None else max(pad_to, max(lengths))
    B = len(samples)
    input_ids = torch.full((B, T), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.float32)
    response_mask = torch.zeros((B, T), dtype=torch.float32)
    old_log_probs = torch.zeros((B, T), dtype=torch.float32)
    advantages = torch.zeros((B, T), dtype=torch.float32)
    for b, s in enumerate(samples):
        p, r = len(s.prompt_token_ids), len(s.response_token_ids)
        input_ids[b, :p + r] = torch.tensor(s.prompt_token_ids + s.response_token_ids, dtype=torch.long)
        attention_mask[b, :p + r] = 1.0
        response_mask[b, p:p + r] = 1.0
        old_log_probs[b, p:p + r] = torch.tensor(s.response_logprobs, dtype=torch.float32)
        advantages[b, p:p + r] = s.advantage
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "response_mask": response_mask,
        "old_log_probs": old_log_probs,
        "advantages": advantages,
        "correct": torch.tensor([s.correct for s in samples], dtype=torch.bool),
        "reward": torch.tensor([s.reward for s in samples], dtype=torch.float32),
        "version": torch.tensor([s.version for s in samples], dtype=torch.long),
    }
