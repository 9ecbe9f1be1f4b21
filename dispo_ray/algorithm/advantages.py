r"""Group-relative advantages (GRPO-style) and the dynamic-sampling filter.

For the G samples of one prompt with rewards R_1..R_G:

    A_i = (R_i - mean(R)) / (std(R) + eps)     (norm_by_std; std is the unbiased sample std)
    A_i =  R_i - mean(R)                        (otherwise)

A_i is broadcast to every response token of sample i. A group whose rewards are all equal
(all correct or all wrong with 0/1 rewards) has A = 0 and carries no signal; DAPO's dynamic
sampling drops such groups and samples more prompts instead.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Dict, List, Sequence

import torch

from dispo_ray.sample import Sample


def group_advantages(rewards: torch.Tensor, norm_by_std: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """Advantages for a ``[num_groups, G]`` reward tensor, same shape."""
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be [num_groups, G>=2], got {tuple(rewards.shape)}")
    rewards = rewards.to(torch.float32)
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if not norm_by_std:
        return centred
    std = rewards.std(dim=1, keepdim=True)  # unbiased; 0 for an all-equal group -> A = 0
    return centred / (std + eps)


def group_by_prompt(samples: Sequence[Sample]) -> "OrderedDict[str, List[Sample]]":
    """Samples grouped by ``prompt_uid``, groups and members in first-seen order."""
    groups: "OrderedDict[str, List[Sample]]" = OrderedDict()
    for s in samples:
        groups.setdefault(s.prompt_uid, []).append(s)
    return groups


def is_informative(group: Sequence[Sample]) -> bool:
    """False for a group whose rewards are all equal (zero advantage everywhere)."""
    return len({round(s.reward, 9) for s in group}) > 1


def assign_advantages(samples: Sequence[Sample], norm_by_std: bool = True, eps: float = 1e-6) -> None:
    """Fill ``Sample.advantage`` in place, group by group (groups may differ in size)."""
    for uid, group in group_by_prompt(samples).items():
        if len(group) < 2:
            raise ValueError(f"prompt {uid}: a group needs at least 2 samples, got {len(group)}")
        adv = group_advantages(torch.tensor([[s.reward for s in group]]), norm_by_std, eps)[0]
        for s, a in zip(group, adv.tolist()):
            s.advantage = a


def split_informative(samples: Sequence[Sample]) -> Dict[str, List[List[Sample]]]:
    """Partition groups into ``kept`` (mixed rewards) and ``dropped`` (all equal)."""
    out: Dict[str, List[List[Sample]]] = {"kept": [], "dropped": []}
    for group in group_by_prompt(samples).values():
        out["kept" if is_informative(group) else "dropped"].append(group)
    return out
