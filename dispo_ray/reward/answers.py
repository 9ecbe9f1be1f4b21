"""Answer extraction from model output and ground truths: linear-time string work, safe on any
input (no sympy, no math-verify). :mod:`dispo_ray.reward.scoring` builds on it.

The boxes of a response are read the way math-verify reads them (its ``extract_boxed_content``
with ``mode="last"``): the last box and the boxes chained to it. :func:`answer_span` cuts out the
text math-verify's boxed-answer patterns need for that chain, which is what the sandboxed verifier
gets: a short, prose-free string, so identical answers give identical verifier inputs.
"""
from __future__ import annotations

import re
from typing import Any, List, Optional, Tuple

_BOX_TOKENS = re.compile(r"\\(?:boxed|fbox)\s*\{|\\[{}]|[{}]")
_GSM8K_ANSWER = re.compile(r"####\s*\$?\s*([-+]?[0-9][0-9,]*(?:\.[0-9]+)?)")
_SEPARATOR = re.compile(r"\b(?:and|or)\b|,|;")  # math-verify's VALID_SEPARATOR_PATTERN
_PERCENT = re.compile(r"\s*(?:\\?%|[Pp]ercentage|[Pp]ercent|[Pp]ct)")  # read after an environment
_INLINE_DOLLAR = re.compile(r"(?<![\\$])\$(?!\$)")
_DELIMITED = re.compile(r"(?<!\\)\$|\\\(|\\\[")
Box = Tuple[int, int, int]  # (command start, content start, closing brace)


def find_boxes(text: str) -> List[Box]:
    """Every complete ``\\boxed{...}`` / ``\\fbox{...}``, ordered by start, with real brace
    matching (escaped ``\\{``/``\\}`` do not count). Linear time; an unclosed box is ignored."""
    if "\\boxed" not in text and "\\fbox" not in text:
        return []
    stack: List[Tuple[int, int]] = []  # per open brace: (command start, content start), -1 = plain
    out: List[Box] = []
    for m in _BOX_TOKENS.finditer(text):
        tok = m.group()
        if tok[0] == "\\" and len(tok) == 2:  # \{ or \}: literal
            continue
        if tok == "}":
            if stack:
                cmd, start = stack.pop()
                if cmd >= 0:
                    out.append((cmd, start, m.start()))
        elif tok == "{":
            stack.append((-1, -1))
        else:
            stack.append((m.start(), m.end()))
    out.sort()
    return out


def extract_boxed(text: str) -> Optional[str]:
    """Content of the last complete box: latest start, so for nested boxes the inner one wins."""
    boxes = find_boxes(text)
    return text[boxes[-1][1]:boxes[-1][2]].strip() if boxes else None


def box_chain(text: str, boxes: List[Box]) -> List[Box]:
    """The boxes math-verify reads as one answer (``extract_boxed_content(mode="last")``): the
    last box, and walking left each box that ends less than 10 characters before the next one,
    or less than 70 with a separator between and a different content. A box enclosing the
    current one ends the chain (nested boxes: the innermost)."""
    if not boxes:
        return []
    chain = [boxes[-1]]
    for b in reversed(boxes[:-1]):
        cur = chain[-1]
        if b[2] >= cur[0]:
            break
        between = text[b[2] + 1:cur[0]]
        same = text[b[1]:b[2]].strip() == text[cur[1]:cur[2]].strip()
        if not (len(between) < 10 or (not same and len(between) < 70 and _SEPARATOR.search(between))):
            break
        chain.append(b)
    chain.reverse()
    return chain


def _environment(text: str, pos: int) -> Optional[Tuple[int, int]]:
    """``(start, end)`` of the math environment around ``pos`` (``$$..$$``, ``\\[..\\]``, or on
    one line ``\\(..\\)`` / ``$..$``), delimiters included; None outside one."""
    if text.count("$$", 0, pos) % 2:
        end = text.find("$$", pos)
        if end >= 0:
            return text.rfind("$$", 0, pos), end + 2
    start = text.rfind("\\[", 0, pos)
    if start >= 0 and text.rfind("\\]", start, pos) < 0 and text.find("\\]", pos) >= 0:
        return start, text.find("\\]", pos) + 2
    line0 = text.rfind("\n", 0, pos) + 1
    line1 = text.find("\n", pos)
    line1 = len(text) if line1 < 0 else line1
    start = text.rfind("\\(", line0, pos)
    if start >= 0 and text.rfind("\\)", start, pos) < 0 and 0 <= text.find("\\)", pos, line1):
        return start, text.find("\\)", pos, line1) + 2
    opens = [m.start() for m in _INLINE_DOLLAR.finditer(text, line0, pos)]
    if len(opens) % 2:
        close = _INLINE_DOLLAR.search(text, pos, line1)
        if close:
            return opens[-1], close.end()
    return None


def answer_span(text: str, chain: List[Box]) -> Tuple[int, int]:
    """``(start, end)`` of the text math-verify's boxed extraction reads for ``chain``: from the
    environment of its first box to that of its last box, plus a percent word right after."""
    start, end = chain[0][0], chain[-1][2] + 1
    env = _environment(text, chain[0][0])
    if env is not None:
        start = min(start, env[0])
    env = _environment(text, chain[-1][0])
    if env is not None:
        end = max(end, env[1])
    pct = _PERCENT.match(text, end)
    return start, pct.end() if pct else end


def shown_answer(text: str, chain: List[Box]) -> Optional[str]:
    """The box contents of ``chain``, consecutive repeats dropped, joined by ``", "``."""
    if not chain:
        return None
    parts: List[str] = []
    for b in chain:
        c = text[b[1]:b[2]].strip()
        if not parts or parts[-1] != c:
            parts.append(c)
    return ", ".join(parts)


def is_gsm8k(data_source: str) -> bool:
    return "gsm8k" in (data_source or "").lower() or "gsm" == (data_source or "").lower()


def extract_gsm8k(text: str) -> Optional[str]:
    """The number after the last ``####`` (commas dropped), as in GSM8K solutions."""
    found = _GSM8K_ANSWER.findall(text)
    return found[-1].replace(",", "") if found else None


def extract_answer(text: str, data_source: str = "") -> Optional[str]:
    """The boxed answer as shown in results (every chained box); for GSM8K-style sources fall
    back to ``#### n``."""
    ans = shown_answer(text, box_chain(text, find_boxes(text)))
    if ans is None and is_gsm8k(data_source):
        ans = extract_gsm8k(text)
    return ans


def normalize_ground_truth(gt: Any, data_source: str = "") -> str:
    """The gold text handed to math-verify's ``parse``: a ground truth with a box or LaTeX
    delimiters as it is (math-verify reads every box: ``\\boxed{1}\\boxed{2}`` is ``{1, 2}``), a
    GSM8K solution as the number after its last ``####``, a plain one inside ``$...$``."""
    gt = str(gt).strip()
    if "\\boxed" in gt or "\\fbox" in gt or _DELIMITED.search(gt):
        return gt
    if "####" in gt:
        g = extract_gsm8k(gt)
        if g is not None:
            return f"${g}$"
    return "$" + gt.replace("\n", " ") + "$"  # an inline environment holds one line
