"""Pure reward scoring of one response: answer extraction, cheap bomb pre-filters, the
math-verify comparison and the reward formula. No Ray, no processes.

The pipeline is split so that only :func:`verify_answer` ever hands untrusted text to sympy /
math-verify; the reward pool runs that one step inside :mod:`dispo_ray.sandbox` (a child process
killed at a deadline). Everything else here is linear-time string work that is safe on any input.

Reasons (``ScoreResult.reason``):
  ``ok``        the extracted answer equals the ground truth
  ``wrong``     an answer was extracted and does not match
  ``no_answer`` no ``\\boxed{...}`` (nor ``#### n`` for GSM8K-style sources) in the response
  ``too_long``  the answer is longer than ``max_answer_chars``, nested too deeply, or a numeric
                literal too large to verify (e.g. an exponent tower): rejected before verification
  ``timeout``   verification passed the wall-clock deadline (child killed or soft timer fired)
  ``crashed``   the verifier raised or its process died
Everything but ``ok`` scores ``wrong_reward``, so a bomb can never out-score a plain wrong answer.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Tuple

REASONS = ("ok", "no_answer", "wrong", "timeout", "crashed", "too_long")
MAX_BRACE_DEPTH = 64  # deeper nesting makes the LaTeX parser crawl (3000 levels: ~16 s)
MAX_LITERAL_DIGITS = 1e6  # integers beyond ~10^(10^6) make sympy's bigint work run for minutes


@dataclass
class ScoreResult:
    reward: float
    correct: bool
    reason: str
    answer: Optional[str] = None  # extracted answer (cut to 200 chars), None if there was none
    overlong: float = 0.0  # the (non-positive) DAPO overlong term included in ``reward``
    elapsed_s: float = 0.0  # extraction + verification time in the worker (not a child's start)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------- extraction
_BOX_TOKENS = re.compile(r"\\(?:boxed|fbox)\s*\{|\\[{}]|[{}]")
_GSM8K_ANSWER = re.compile(r"####\s*\$?\s*([-+]?[0-9][0-9,]*(?:\.[0-9]+)?)")


def extract_boxed(text: str) -> Optional[str]:
    """Content of the last complete ``\\boxed{...}`` (or ``\\fbox{...}``), with real brace
    matching (escaped ``\\{``/``\\}`` do not count). "Last" = latest start, so for nested boxes
    the inner one wins. Linear time; an unclosed box is ignored."""
    if "\\boxed" not in text and "\\fbox" not in text:
        return None
    stack: List[int] = []  # per open brace: start of the box content, or -1 for a plain brace
    best: Optional[Tuple[int, int]] = None
    for m in _BOX_TOKENS.finditer(text):
        tok = m.group()
        if tok[0] == "\\" and len(tok) == 2:  # \{ or \}: literal
            continue
        if tok == "}":
            if stack:
                start = stack.pop()
                if start >= 0 and (best is None or start > best[0]):
                    best = (start, m.start())
        elif tok == "{":
            stack.append(-1)
        else:
            stack.append(m.end())
    return None if best is None else text[best[0]:best[1]].strip()


def is_gsm8k(data_source: str) -> bool:
    return "gsm8k" in (data_source or "").lower() or "gsm" == (data_source or "").lower()


def extract_gsm8k(text: str) -> Optional[str]:
    """The number after the last ``####`` (commas dropped), as in GSM8K solutions."""
    found = _GSM8K_ANSWER.findall(text)
    return found[-1].replace(",", "") if found else None


def extract_answer(text: str, data_source: str = "") -> Optional[str]:
    """Last boxed answer; for GSM8K-style sources fall back to ``#### n``."""
    ans = extract_boxed(text)
    if ans is None and is_gsm8k(data_source):
        ans = extract_gsm8k(text)
    return ans


def normalize_ground_truth(gt: str, data_source: str = "") -> str:
    """Ground truths arrive bare (``42``), boxed, or as a GSM8K solution ending in ``#### 42``."""
    gt = str(gt).strip()
    boxed = extract_boxed(gt)
    if boxed is not None:
        return boxed
    if "####" in gt:
        g = extract_gsm8k(gt)
        if g is not None:
            return g
    return gt


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
def verify_answer(answer: str, ground_truth: str) -> bool:
    """math-verify comparison. UNTRUSTED ``answer``: call only inside the sandbox child (or on
    trusted text). The answer is parsed as LaTeX only, never through sympy's ``parse_expr``
    (which evaluates Python); timeouts are left to the caller (the sandbox)."""
    from math_verify import LatexExtractionConfig, parse, verify

    gold = _parse_gold(ground_truth)
    pred = parse(f"${answer}$", extraction_config=[LatexExtractionConfig()], parsing_timeout=None)
    if not pred:
        return False
    return bool(verify(gold, pred, timeout_seconds=None))


_GOLD_CACHE: Dict[str, Any] = {}


def _parse_gold(gt: str) -> Any:
    """Ground truths are trusted and repeat across a group of samples: parse once, cache."""
    if gt not in _GOLD_CACHE:
        from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

        if len(_GOLD_CACHE) > 4096:
            _GOLD_CACHE.clear()
        _GOLD_CACHE[gt] = parse(f"${gt}$", extraction_config=[LatexExtractionConfig(),
                                                               ExprExtractionConfig()],
                                parsing_timeout=None)
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
    when an answer was extracted, plus the overlong term."""
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


def prepare(response_text: str, ground_truth: str, data_source: str,
            max_answer_chars: int) -> Tuple[Optional[str], str, Optional[str]]:
    """Extraction + pre-filters: ``(answer, normalized ground truth, early_reason)``; an
    ``early_reason`` means no verification is needed."""
    if not isinstance(response_text, str):
        raise TypeError(f"response_text must be str, got {type(response_text).__name__}")
    answer = extract_answer(response_text, data_source)
    gt = normalize_ground_truth(ground_truth, data_source)
    if answer is None:
        return None, gt, "no_answer"
    if answer == "":
        return answer, gt, "wrong"
    return answer, gt, prefilter(answer, max_answer_chars)


def score_in_process(response_text: str, ground_truth: str, cfg: Any, max_length: int,
                     data_source: str = "", response_length: int = 0) -> ScoreResult:
    """The whole pipeline in this process, WITHOUT a sandbox: for trusted text and tests only."""
    answer, gt, early = prepare(response_text, ground_truth, data_source, cfg.max_answer_chars)
    if early is None:
        early = "ok" if verify_answer(answer, gt) else "wrong"
    return finalize(early, answer, response_length, max_length, cfg)
