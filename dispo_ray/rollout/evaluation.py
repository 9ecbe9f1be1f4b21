"""Held-out evaluation: avg@k and pass@k from k samples per problem.

For problem j with k scored samples c_j1..c_jk in {0, 1}:

    avg@k  = mean_j (1/k) sum_i c_ji          (expected accuracy of one sample)
    pass@k = mean_j [max_i c_ji]              (at least one of k correct)

Greedy evaluation is k = 1 at temperature 0.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

from dispo_ray.algorithm.advantages import group_by_prompt
from dispo_ray.sample import Sample


def avg_and_pass_at_k(samples: Sequence[Sample], prefix: str = "eval") -> Dict[str, float]:
    groups = list(group_by_prompt(samples).values())
    if not groups:
        return {}
    k = min(len(g) for g in groups)
    avg = sum(sum(s.correct for s in g) / len(g) for g in groups) / len(groups)
    passed = sum(any(s.correct for s in g) for g in groups) / len(groups)
    lengths: List[int] = [s.response_length for g in groups for s in g]
    return {f"{prefix}/accuracy": avg, f"{prefix}/pass@{k}": passed,
            f"{prefix}/response_length": sum(lengths) / len(lengths), f"{prefix}/num_problems": float(len(groups))}
