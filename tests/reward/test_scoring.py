"""Ordinary correctness of the pure scoring function (no Ray, no sandbox: trusted inputs only)."""
from __future__ import annotations

import dataclasses

import pytest

from dispo_ray.infra.config import compose
from dispo_ray.reward.sandbox import _audit
from dispo_ray.reward.scoring import (answer_span, box_chain, extract_answer, extract_boxed, finalize,
                               find_boxes, normalize_ground_truth, overlong_penalty, prefilter,
                               prepare, score_in_process)


@pytest.fixture(scope="module")
def rcfg():
    return compose(["reward.format_reward=0.0"]).reward


def score(text, gt, cfg, src="", length=0, max_len=100):
    return score_in_process(text, gt, cfg, max_len, data_source=src, response_length=length)


@pytest.mark.parametrize("answer,gt", [
    (r"\frac{1}{2}", "0.5"),
    ("0.5", r"\frac{1}{2}"),
    (r"\sqrt{8}", r"2\sqrt{2}"),
    (r"\{1, 2, 3\}", r"\{3, 2, 1\}"),
    (r"\dfrac{3}{4}", "0.75"),
    ("x^2 + 2x + 1", "(x+1)^2"),
    (r"(1, 2]", r"(1,2]"),
])
def test_equivalent_answers_are_correct(rcfg, answer, gt):
    r = score(f"Some work. The answer is $\\boxed{{{answer}}}$.", gt, rcfg)
    assert (r.reason, r.correct, r.reward, r.answer) == ("ok", True, 1.0, answer)


@pytest.mark.parametrize("answer,gt", [
    (r"\frac{1}{3}", "0.5"), (r"\sqrt{8}", r"3\sqrt{2}"), (r"\{1, 2\}", r"\{1, 2, 3\}"), ("41", "42"),
])
def test_different_answers_are_wrong(rcfg, answer, gt):
    r = score(f"\\boxed{{{answer}}}", gt, rcfg)
    assert (r.reason, r.correct, r.reward) == ("wrong", False, 0.0)


def test_last_box_wins_and_nested_braces(rcfg):
    far = r"first \boxed{7}. That guess fails the check in the second equation. Redo the algebra from the start: \boxed{\frac{\sqrt{16}}{2}} final"
    assert extract_boxed(far) == r"\frac{\sqrt{16}}{2}"
    assert extract_answer(far) == r"\frac{\sqrt{16}}{2}"
    assert score(far, "2", rcfg).reason == "ok"
    assert score(far, "7", rcfg).reason == "wrong"
    # boxes close together are one answer (math-verify's rule): {7, 2}, neither 7 nor 2 alone
    near = r"first \boxed{7}, then \boxed{\frac{\sqrt{16}}{2}} final"
    assert extract_answer(near) == r"7, \frac{\sqrt{16}}{2}"
    assert [score(near, g, rcfg).reason for g in ("2", "7", "7, 2", r"\{2, 7\}")] == [
        "wrong", "wrong", "ok", "ok"]


def test_box_chain_and_answer_span():
    def span(text):
        chain = box_chain(text, find_boxes(text))
        s, e = answer_span(text, chain)
        return text[s:e]

    assert span(r"so $x = \boxed{3}$.") == r"$x = \boxed{3}$"  # the environment, not the prose
    assert span(r"is $$\boxed{1}, \boxed{2}$$ ok") == r"$$\boxed{1}, \boxed{2}$$"
    assert span(r"get \[ y = \boxed{4} \] and") == r"\[ y = \boxed{4} \]"
    assert span(r"get \( \boxed{4} \) and") == r"\( \boxed{4} \)"
    assert span(r"rate $\boxed{28}$ pct of") == r"$\boxed{28}$ pct"
    assert span(r"$a$ then \boxed{5} $b$") == r"\boxed{5}"  # $..$ around, but not around the box
    assert span(r"$y_1 = \boxed{3}$ and $y_2 = \boxed{5}$.") == r"$y_1 = \boxed{3}$ and $y_2 = \boxed{5}$"
    # separators: < 10 characters, or < 70 with and/or/,/; and a different content
    assert extract_answer(r"\boxed{1} then at last \boxed{2}") == "2"  # 14 characters, no separator
    assert extract_answer(r"\boxed{1} and later, at last \boxed{2}") == "1, 2"
    assert extract_answer(r"\boxed{2} and later, at last \boxed{2}") == "2"  # same content: not chained
    assert extract_answer(r"\boxed{1}\boxed{1}\boxed{2}") == "1, 2"  # consecutive repeats dropped
    assert extract_answer(r"\boxed{1} " + "x" * 80 + r", \boxed{2}") == "2"  # too far
    assert box_chain("no box", []) == []


def test_brace_matching_edge_cases():
    assert extract_boxed(r"\boxed{\{1,2\}}") == r"\{1,2\}"  # escaped braces are literal
    assert extract_boxed(r"\boxed{1} and an unclosed \boxed{2") == "1"
    assert extract_boxed(r"\boxed{\boxed{3}}") == "3"  # nested: the innermost (latest) box
    assert extract_boxed(r"\boxed {  5 }") == "5"
    assert extract_boxed(r"\fbox{6}") == "6"
    assert extract_boxed("no box at all") is None
    assert extract_boxed("\\boxed{" * 10000) is None


def test_gsm8k_fallback_only_for_gsm8k_sources(rcfg):
    text = "She has 40 + 2 = 42 apples.\n#### 42"
    assert extract_answer(text, "openai/gsm8k") == "42"
    assert extract_answer(text, "math") is None
    r = score(text, "#### 42", rcfg, src="gsm8k")
    assert (r.reason, r.correct, r.answer) == ("ok", True, "42")
    assert score("#### 1,234", "1234", rcfg, src="gsm8k").reason == "ok"
    assert score("#### 41", "42", rcfg, src="gsm8k").reason == "wrong"
    # a boxed answer still wins over ####
    assert extract_answer(r"#### 5 ... \boxed{6}", "gsm8k") == "6"


def test_ground_truth_normalisation(rcfg):
    # the gold text math-verify parses: boxed / delimited as is, #### as its number, plain in $..$
    assert normalize_ground_truth(r"\boxed{\frac12}") == r"\boxed{\frac12}"
    assert normalize_ground_truth(r"\boxed{1}\boxed{2}") == r"\boxed{1}\boxed{2}"
    assert normalize_ground_truth(r"\(x = 2\)") == r"\(x = 2\)"
    assert normalize_ground_truth("blah blah\n#### 1,000") == "$1000$"
    assert normalize_ground_truth("  17 ") == "$17$"
    assert normalize_ground_truth(r"\$5") == r"$\$5$"  # an escaped dollar is no delimiter
    assert normalize_ground_truth(42) == "$42$"
    # every box of a ground truth counts: {1, 2} is not 2
    assert score(r"\boxed{2}", r"\boxed{1}\boxed{2}", rcfg).reason == "wrong"
    assert score(r"\boxed{\{1, 2\}}", r"\boxed{1}\boxed{2}", rcfg).reason == "ok"
    assert score(r"\boxed{0.5}", r"Half of it: $\frac{1}{2}$", rcfg).reason == "ok"


def test_no_answer(rcfg):
    cfg = dataclasses.replace(rcfg, format_reward=0.1, wrong_reward=-0.5)
    r = score("I think it's 42 but I won't box it.", "42", cfg)
    assert (r.reason, r.correct, r.answer, r.reward) == ("no_answer", False, None, -0.5)
    assert score(r"\boxed{}", "42", cfg).reason == "wrong"


def test_format_reward_added_when_boxed(rcfg):
    cfg = dataclasses.replace(rcfg, format_reward=0.1, correct_reward=1.0, wrong_reward=0.0)
    assert score(r"\boxed{4}", "4", cfg).reward == pytest.approx(1.1)
    assert score(r"\boxed{5}", "4", cfg).reward == pytest.approx(0.1)
    assert score("4", "4", cfg).reward == pytest.approx(0.0)


def test_overlong_penalty_values():
    # max 100, buffer 20: free up to 80 tokens, then -1.0 * (len - 80) / 20, clipped at -1.0
    assert overlong_penalty(80, 100, 20, 1.0) == 0.0
    assert overlong_penalty(50, 100, 20, 1.0) == 0.0
    assert overlong_penalty(85, 100, 20, 1.0) == pytest.approx(-0.25)
    assert overlong_penalty(90, 100, 20, 0.5) == pytest.approx(-0.25)
    assert overlong_penalty(100, 100, 20, 1.0) == pytest.approx(-1.0)
    assert overlong_penalty(130, 100, 20, 1.0) == pytest.approx(-1.0)
    assert overlong_penalty(100, 100, 0, 1.0) == 0.0  # buffer 0 = off


def test_overlong_penalty_in_reward(rcfg):
    cfg = dataclasses.replace(rcfg, overlong_buffer=20, overlong_penalty=1.0)
    r = score(r"\boxed{4}", "4", cfg, length=95, max_len=100)  # 1 - 15/20
    assert (r.reward, r.overlong, r.correct) == (pytest.approx(0.25), pytest.approx(-0.75), True)
    r = score(r"\boxed{5}", "4", cfg, length=100, max_len=100)
    assert r.reward == pytest.approx(-1.0)


def test_prefilter_rejects_bombs_but_not_big_honest_numbers(rcfg):
    for bomb in [r"9^{9^{9^{9}}}+1", r"9^{9^{9}}", r"10^{10^{10}}", r"(10^{100})!", "9**9**9",
                 r"{9}^{{9}^{9}}", "1000000!", "1" * 1001, "{" * 70 + "1" + "}" * 70]:
        assert prefilter(bomb, 1000) == "too_long", bomb
    for fine in ["0^{0}", "0.0^{00}", "\u0663^{2}", r"2^{64}", "100!", r"2^{2^{2^{2}}}", r"\frac{1}{2}", "x^{2}+1", "9" * 500]:
        assert prefilter(fine, 1000) is None, fine
    r = score(r"\boxed{9^{9^{9^{9}}}+1}", "1", rcfg)
    assert (r.reason, r.reward, r.correct) == ("too_long", 0.0, False)


def test_prepare_and_finalize_contracts(rcfg):
    assert prepare("x \\boxed{3} y", "3", "", 1000) == ("3", "\\boxed{3}", "$3$", None)
    assert prepare("x \\boxed{3} y", "3", "", 1000, "any") == ("3", "x \\boxed{3} y", "$3$", None)
    assert prepare("#### 7", "7", "gsm8k", 1000) == ("7", "\\boxed{7}", "$7$", None)
    assert prepare("3", "3", "", 1000)[3] == "no_answer"
    with pytest.raises(TypeError, match="response_text must be str"):
        prepare(None, "3", "", 1000)
    with pytest.raises(ValueError, match="answer_format must be one of boxed, any"):
        prepare("x", "3", "", 1000, "latex")
    with pytest.raises(ValueError, match="unknown score reason"):
        finalize("maybe", "3", 0, 100, rcfg)
    for reason in ("timeout", "crashed"):  # never better than a wrong answer
        cfg = dataclasses.replace(rcfg, wrong_reward=-1.0)
        assert finalize(reason, "3", 0, 100, cfg).reward == -1.0


def test_sandbox_audit_hook_policy():
    """The child's audit hook: process creation, sockets and file writes are refused."""
    for event, args in [("os.system", (b"touch x",)), ("subprocess.Popen", ("sh", [], None, None)),
                        ("socket.connect", (None, ("1.2.3.4", 80))), ("os.remove", ("x", -1))]:
        with pytest.raises(PermissionError):
            _audit(event, args)
    with pytest.raises(PermissionError):
        _audit("open", ("pwned-marker", "w", 0))
    import os
    with pytest.raises(PermissionError):
        _audit("open", ("pwned-marker", None, os.O_CREAT | os.O_WRONLY))
    _audit("open", ("/usr/lib/x.py", "r", os.O_RDONLY))  # reading is fine
    _audit("import", ("math", None, [], [], []))
