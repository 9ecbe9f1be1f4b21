"""Response-level signals DISPO ties to collapse: length and repetition.

A response is *repetitive* when its tail is one n-gram (n = 1..max_n tokens) repeated at least
``min_repeats`` times back to back, e.g. ``... 7 7 7 7`` or ``... ab ab ab``: the signature of the
repetition collapse the paper reports for too-tight incorrect-response windows.
"""
from __future__ import annotations

from typing import Sequence


def tail_repeats(tokens: Sequence[int], max_n: int = 4) -> int:
    """Largest number of back-to-back copies of an n-gram (n <= max_n) ending the sequence."""
    best = 1 if tokens else 0
    for n in range(1, max_n + 1):
        if len(tokens) < 2 * n:
            break
        gram = list(tokens[-n:])
        reps, end = 1, len(tokens) - n
        while end - n >= 0 and list(tokens[end - n:end]) == gram:
            reps += 1
            end -= n
        best = max(best, reps)
    return best


def is_repetitive(tokens: Sequence[int], min_repeats: int = 4, max_n: int = 4) -> bool:
    return tail_repeats(tokens, max_n) >= min_repeats


def repetition_rate(responses: Sequence[Sequence[int]], min_repeats: int = 4, max_n: int = 4) -> float:
    """Share of responses whose tail repeats (0 for an empty list)."""
    if not responses:
        return 0.0
    return sum(is_repetitive(r, min_repeats, max_n) for r in responses) / len(responses)
