"""Rollout records: the one data contract between generator, reward pool, driver and learner.

A :class:`Sample` is one response to one prompt. The generator fills the token fields and the
behaviour log-probs (log pi_behaviour of each sampled token) and tags the weight ``version`` that
sampled it; the reward pool fills ``reward``/``correct``/``reason``; the driver fills
``advantage``. :func:`collate` turns a list of samples into right-padded ``[batch, seq]`` tensors
in which position ``t`` holds the value for token ``t`` of ``input_ids`` (so
``old_log_probs[b, t] = log pi_behaviour(input_ids[b, t] | input_ids[b, :t])`` on response
positions, and ``response_mask[b, t] = 1`` exactly there).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch


@dataclass
class Sample:
    prompt_uid: str  # stable id of the prompt (dataset row); the G samples of a group share it
    prompt_token_ids: List[int]
    response_token_ids: List[int]
    response_logprobs: List[float]  # behaviour log-prob of each sampled token
    version: int  # weight version of the policy that sampled it
    finish_reason: str = "stop"  # "stop" | "length"
    response_text: str = ""
    ground_truth: str = ""
    data_source: str = ""
    reward: float = 0.0
    correct: bool = False
    reason: str = ""
    advantage: float = 0.0
    extra: Dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.response_token_ids) != len(self.response_logprobs):
            raise ValueError(
                f"sample {self.prompt_uid}: {len(self.response_token_ids)} response tokens but "
                f"{len(self.response_logprobs)} log-probs")

    @property
    def response_length(self) -> int:
        return len(self.response_token_ids)


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
