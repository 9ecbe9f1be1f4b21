"""The one data contract between generator, reward pool, driver and learner (torch-free, so every
layer can import it).

A :class:`Sample` is one response to one prompt. The generator fills the token fields and the
behaviour log-probs (log pi_behaviour of each sampled token) and tags the weight ``version`` that
sampled it; the reward pool fills ``reward``/``correct``/``reason``; the driver fills
``advantage``. :func:`dispo_ray.rollout.samples.collate` turns samples into the learner's tensors.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List


@dataclass
class Sample:
    prompt_uid: str  # stable id of the prompt (dataset row); the G samples of a group share it
    prompt_token_ids: List[int]
    response_token_ids: List[int]
    response_logprobs: List[float]  # behaviour log-prob of each sampled token
    version: int  # weight version of the policy that sampled it (its oldest token's, see version_spans)
    finish_reason: str = "stop"  # "stop" | "length"
    response_text: str = ""
    ground_truth: str = ""
    data_source: str = ""
    reward: float = 0.0
    correct: bool = False
    reason: str = ""
    advantage: float = 0.0
    extra: Dict[str, float] = field(default_factory=dict)
    # [[version, tokens], ...] in token order when weights changed while it was being sampled
    # (streaming, generator.partial_rollout=continue); empty: every token is ``version``'s
    version_spans: List[List[int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.response_token_ids) != len(self.response_logprobs):
            raise ValueError(
                f"sample {self.prompt_uid}: {len(self.response_token_ids)} response tokens but "
                f"{len(self.response_logprobs)} log-probs")

    @property
    def response_length(self) -> int:
        return len(self.response_token_ids)
