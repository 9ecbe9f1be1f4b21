"""Pure reward scoring of one response: answer extraction, cheap bomb pre-filters, the
math-verify comparison and the reward formula. No Ray, no processes.

The pipeline is split so that only :func:`verify_answer` ever hands untrusted text to sympy /
math-verify; the reward pool runs that one step inside :mod:`dispo_ray.reward.sandbox` (a child process
killed at a deadline). Everything else here is linear-time string work that is safe on any input.

What is compared (``reward.answer_format``):
  ``boxed`` (default) the answer must be in a box. This process finds the boxes math-verify
            reads as one answer (the last box and the boxes chained to it by math-verify's own
            rule: less than 10 characters apart, or less than 70 with ``and``/``or``/``,``/``;``
            between) and cuts out their *answer span*: those boxes with the math environment
            around them (``$..$``, ``$$..$$``, ``\\[..\\]``, ``\\(..\\)``) and a percent word right
            after (``$\\boxed{28}$ pct``). The child runs math-verify's boxed-answer extraction on
            the span, so several boxes become a set, ``k = 45`` a relation, ``\\text{}``, units,
            intervals and matrices parse as math-verify parses them. GSM8K-style sources fall
            back to ``#### n`` when there is no box.
  ``any``   math-verify's full default extraction (LaTeX and plain expressions, ``answer:``
            anchors, the last number) on the whole response; the pre-filters then run on the
            whole response.
Ground truths are parsed the way math-verify parses gold answers (:func:`normalize_ground_truth`).

Reasons (``ScoreResult.reason``):
  ``ok``        the extracted answer equals the ground truth
  ``wrong``     an answer was extracted and does not match
  ``no_answer`` no ``\\boxed{...}`` (nor ``#### n`` for GSM8K-style sources) in the response; with
                ``answer_format=any``: math-verify extracted nothing
  ``too_long``  the answer span is longer than ``max_answer_chars``, nested too deeply, or holds a
                numeric literal too large to verify (e.g. an exponent tower): rejected unverified
  ``timeout``   verification passed the wall-clock deadline (child killed or soft timer fired)
  ``crashed``   the verifier raised or its process died
Everything but ``ok`` scores ``wrong_reward``, so a bomb can never out-score a plain wrong answer.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Tuple

from dispo_ray.reward.answers import (answer_span, box_chain, extract_answer, extract_boxed,  # noqa: F401
                               extract_gsm8k, find_boxes, is_gsm8k, normalize_ground_truth, shown_answer)

REASONS = ("ok", "no_answer", "wrong", "timeout", "crashed", "too_long")
ANSWER_FORMATS = ("boxed", "any")  # reward.answer_format's choices; check_answer_format is the one check
MAX_BRACE_DEPTH = 64  # deeper nesting makes the LaTeX parser crawl (3000 levels: ~16 s)
MAX_LITERAL_DIGITS = 1e6  # integers beyond ~10^(10^6) make sympy's bigint work run for minutes


def check_answer_format(answer_format: str) -> None:
    """The answer-format rule, owned here: the config's ``reward.answer_format`` takes its choices
    from :data:`ANSWER_FORMATS`; :func:`prepare` and :func:`verify_answer` (the library entry
    points, callable without a config) refuse anything else."""
    if answer_format not in ANSWER_FORMATS:
        raise ValueError(f"answer_format must be one of {', '.join(ANSWER_FORMATS)}, got {answer_format!r}")


@dataclass
class ScoreResult:
    reward: float
    correct: bool
    reason: str
    answer: Optional[str] = None  # the boxed answer (contents, ", "-joined, cut to 200 chars)
    overlong: float = 0.0  # the (non-positive) DAPO overlong term included in ``reward``
    elapsed_s: float = 0.0  # extraction + verification time in the worker (not a child's start)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------- pre-filters
_NUM_TOKENS = re.compile(r"[0-9]+(?:\.[0-9]+)?|\*\*|\\[a-zA-Z]+|\\.|[{}()\[\]^!+\-,=*]|\s+|.", re.S)
_SUM_OPS = {"+", "-", ",", "=", "\\pm", "\\mp", "\\le", "\\ge", "\\leq", "\\geq"}
_CLOSE = {"}": "{", ")": "(", "]": "["}


def brace_depth(s: str) -> int:
    depth = best = 0
    for ch in s:
        if ch == "{":
            depth += 1
            best = max(best, depth)
        elif ch == "}":
            depth = max(0, depth - 1)
    return best


def _estimate_log10(s: str) -> float:
    """Upper-bound estimate of log10 of the largest integer sympy would build from ``s``
    (powers, factorials, products of literals). Unknown symbols count as 1. Cheap, approximate:
    it only has to tell ``2^{10}`` from ``9^{9^{9}}``."""
    toks = [t for t in _NUM_TOKENS.findall(s) if not t.isspace()]
    toks = ["^" if t == "**" else t for t in toks]
    pos = 0
    worst = 0.0

    def atom() -> float:
        nonlocal pos
        t = toks[pos]
        pos += 1
        if "0" <= t[0] <= "9":  # log10 of the literal; a decimal counts as its digit string
            digits = t.replace(".", "").lstrip("0")
            if not digits:
                return 0.0
            return math.log10(int(digits)) if len(digits) < 300 else float(len(digits))
        if t in ("{", "(", "["):
            v = seq(_CLOSE_OF[t])
            return v
        return 0.0  # symbol / command / operator we do not model

    def term() -> float:
        nonlocal pos, worst
        v = atom()
        if pos < len(toks) and toks[pos] == "^":
            pos += 1
            e = term() if pos < len(toks) else 0.0  # right associative
            v = v * 10.0 ** min(e, 300.0) if e > 0 else v
        while pos < len(toks) and toks[pos] == "!":
            pos += 1
            v = 10.0 ** min(v, 300.0) * max(v, 1.0)  # log10(n!) ~ n log10 n
        worst = max(worst, v)
        return v

    def seq(close: Optional[str]) -> float:
        nonlocal pos
        total = prod = 0.0
        while pos < len(toks):
            t = toks[pos]
            if t == close:
                pos += 1
                break
            if t in _CLOSE:  # stray closer: skip
                pos += 1
                continue
            if t in _SUM_OPS:
                pos += 1
                total, prod = max(total, prod) + 0.31, 0.0
                continue
            prod += term()
        return max(total, prod)

    _CLOSE_OF = {"{": "}", "(": ")", "[": "]"}
    while pos < len(toks):
        seq(None)
    return worst


def prefilter(answer: str, max_answer_chars: int) -> Optional[str]:
    """``"too_long"`` for answers rejected without verification, else None."""
    if len(answer) > max_answer_chars:
        return "too_long"
    if brace_depth(answer) > MAX_BRACE_DEPTH:
        return "too_long"
    if ("^" in answer or "!" in answer or "**" in answer) and _estimate_log10(answer) > MAX_LITERAL_DIGITS:
        return "too_long"
    return None


# ---------------------------------------------------------------- verification
_BOXED_ONLY = 25  # a priority no other math-verify pattern uses: picks out its boxed patterns
_BOXED_TARGETS: Optional[list] = None


def _boxed_targets() -> list:
    """math-verify's boxed-answer patterns alone (a box inside a math environment with up to 5
    more joined by ``,``/``and``/``or`` and a percent suffix, or a bare box), without its
    ``final answer is``/``answer:`` anchors and plain-LaTeX fallbacks: the answer must be boxed.
    Built once: math-verify caches only one regex set per config type."""
    global _BOXED_TARGETS
    if _BOXED_TARGETS is None:
        from math_verify import LatexExtractionConfig
        from math_verify.parser import get_extraction_regexes

        cfg = LatexExtractionConfig(boxed_match_priority=_BOXED_ONLY)
        ((patterns, target),) = get_extraction_regexes([cfg])
        _BOXED_TARGETS = [([(p, q) for p, q in patterns if q == _BOXED_ONLY], target)]
    return _BOXED_TARGETS


def _extract(text: str, answer_format: str) -> list:
    """math-verify's own extraction and parsing (``parse``'s defaults: first-match string
    fallback, any-match mode), with its timeout left to the sandbox."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig
    from math_verify.parser import extract_target_from_pred, get_extraction_regexes

    configs = {"any": [LatexExtractionConfig(), ExprExtractionConfig()], "expr": [ExprExtractionConfig()]}
    targets = _boxed_targets() if answer_format == "boxed" else get_extraction_regexes(configs[answer_format])
    try:
        return extract_target_from_pred(text, targets, fallback_mode="first_match",
                                        extraction_mode="any_match")
    except MemoryError:  # the sandbox recycles its child on this one
        raise
    except Exception:  # as math-verify's parse: malformed input extracts nothing
        return []


def verify_answer(answer: str, ground_truth: str, answer_format: str = "boxed") -> str:
    """``ok`` / ``wrong`` / ``no_answer``: math-verify's verdict on ``answer`` (an answer span, or
    with ``any`` a whole response) against the gold text. UNTRUSTED ``answer``: call only inside
    the sandbox child (or on trusted text); timeouts are left to the caller (the sandbox). In
    ``boxed`` mode only LaTeX is parsed; a bare answer (no box) counts as one box's content.
    ``any`` also runs math-verify's plain-expression extraction, whose sympy ``parse_expr``
    only ever sees digits and arithmetic operators (its regex admits nothing else)."""
    from math_verify import verify

    check_answer_format(answer_format)
    if answer_format == "boxed" and "\\boxed" not in answer and "\\fbox" not in answer:
        answer = "\\boxed{" + answer + "}"
    gold = _parse_gold(ground_truth)
    pred = _extract(answer, answer_format)
    if answer_format == "boxed" and pred and all(isinstance(x, str) for x in pred):
        # the box's LaTeX did not parse (``20 \\%``: the antlr 4.9 grammar hydra pins has no
        # percent): read its number the way math-verify's full pipeline then would
        pred += _extract(pred[0], "expr")
    if not pred:
        return "no_answer" if answer_format == "any" else "wrong"
    return "ok" if verify(gold, pred, timeout_seconds=None) else "wrong"


_GOLD_CACHE: Dict[str, Any] = {}


def _parse_gold(gt: str) -> Any:
    """Ground truths are trusted and repeat across a group of samples: math-verify's default
    ``parse`` (LaTeX and plain expressions, every box), once per text, cached."""
    if gt not in _GOLD_CACHE:
        from math_verify import parse

        if len(_GOLD_CACHE) > 4096:
            _GOLD_CACHE.clear()
        _GOLD_CACHE[gt] = parse(gt, parsing_timeout=None)
    return _GOLD_CACHE[gt]


# ---------------------------------------------------------------- reward
def overlong_penalty(length: int, max_length: int, buffer: int, penalty: float) -> float:
    """DAPO soft overlong punishment: 0 up to ``max_length - buffer`` tokens, then linear down
    to ``-penalty`` at ``max_length`` (clipped there). ``buffer == 0`` disables it."""
    if buffer <= 0 or penalty == 0:
        return 0.0
    over = length - (max_length - buffer)
    if over <= 0:
        return 0.0
    return -penalty * min(over / buffer, 1.0)


def finalize(reason: str, answer: Optional[str], response_length: int, max_length: int,
             cfg: Any) -> ScoreResult:
    """Turn a verification outcome into the reward: correct/wrong value, plus ``format_reward``
    when a boxed answer was extracted, plus the overlong term."""
    if reason not in REASONS:
        raise ValueError(f"unknown score reason {reason!r}: must be one of {', '.join(REASONS)}")
    correct = reason == "ok"
    reward = float(cfg.correct_reward if correct else cfg.wrong_reward)
    if answer is not None:
        reward += float(cfg.format_reward)
    over = overlong_penalty(int(response_length), int(max_length), int(cfg.overlong_buffer),
                            float(cfg.overlong_penalty))
    shown = None if answer is None else answer[:200]
    return ScoreResult(reward=reward + over, correct=correct, reason=reason, answer=shown,
                       overlong=over)


def prepare(response_text: str, ground_truth: Any, data_source: str, max_answer_chars: int,
            answer_format: str = "boxed"
            ) -> Tuple[Optional[str], Optional[str], str, Optional[str]]:
    """Extraction + pre-filters: ``(answer, text to verify, gold text, early_reason)``. ``answer``
    is the boxed answer shown in results (None without a box); an ``early_reason`` means no
    verification is needed. ``(text to verify, gold text)`` decides the verdict: a cache key."""
    if not isinstance(response_text, str):
        raise TypeError(f"response_text must be str, got {type(response_text).__name__}")
    check_answer_format(answer_format)
    gt = normalize_ground_truth(ground_truth, data_source)
    chain = box_chain(response_text, find_boxes(response_text))
    answer = shown_answer(response_text, chain)
    if answer_format == "any":
        if not response_text.strip():
            return answer, None, gt, "no_answer"
        return answer, response_text, gt, prefilter(response_text, float("inf"))
    if chain:
        start, end = answer_span(response_text, chain)
        # math-verify reads \fbox only inside a \boxed match: name it \boxed so that it counts
        text = response_text[start:end].replace("\\fbox", "\\boxed")
    elif is_gsm8k(data_source) and extract_gsm8k(response_text) is not None:
        answer = extract_gsm8k(response_text)
        text = "\\boxed{" + answer + "}"
    else:
        return None, None, gt, "no_answer"
    if not answer.replace(",", "").strip():  # only empty boxes
        return answer, text, gt, "wrong"
    return answer, text, gt, prefilter(text, max_answer_chars)


def score_in_process(response_text: str, ground_truth: Any, cfg: Any, max_length: int,
                     data_source: str = "", response_length: int = 0) -> ScoreResult:
    """The whole pipeline in this process, WITHOUT a sandbox: for trusted text and tests only."""
    fmt = getattr(cfg, "answer_format", "boxed")
    answer, text, gt, early = prepare(response_text, ground_truth, data_source,
                                      cfg.max_answer_chars, fmt)
    if early is None:
        early = verify_answer(text, gt, fmt)
    return finalize(early, answer, response_length, max_length, cfg)
