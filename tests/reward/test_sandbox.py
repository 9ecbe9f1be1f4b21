"""The sandbox on its own (no Ray): pipelined verification keeps order, deadlines and results
whatever happens to the child in the middle of a run."""
from __future__ import annotations

import os
import threading
import time

import pytest

from dispo_ray.reward.sandbox import Sandbox

TIMEOUT_S = 1.0
MARGIN_S = 1.0


def _bomb(k: int):
    # slips past every pre-filter and runs in C: only the parent's kill stops it
    return (rf"\binom{{10^{{9}}}}{{10^{{8}}+{k}}}", "1")


def _pairs(n: int):
    """Item i: answer i (every third off by one) against ground truth i, as a fraction half
    the time so that the verifier does real work."""
    out, expected = [], []
    for i in range(n):
        ans = i if i % 3 else i + 1
        out.append((rf"\frac{{{2 * ans}}}{{2}}" if i % 2 else str(ans), str(i)))
        expected.append("ok" if i % 3 else "wrong")
    return out, expected


@pytest.fixture
def sandbox():
    sb = Sandbox(TIMEOUT_S, 1024, soft_timeout=False)
    yield sb
    sb.close()


def test_pipelined_run_with_back_to_back_bombs_keeps_order_and_deadlines(sandbox):
    pairs, expected = _pairs(30)
    # two bombs in a row: the second one lands on the promoted spare while a new spare starts
    for pos, k in ((5, 0), (6, 1), (20, 2)):
        pairs.insert(pos, _bomb(k))
        expected.insert(pos, "timeout")
    results = sandbox.verify_many(pairs)
    assert [r for r, _ in results] == expected
    for (reason, elapsed) in results:
        assert elapsed <= TIMEOUT_S + MARGIN_S, (reason, elapsed)
    bombs = [e for (r, e) in results if r == "timeout"]
    assert all(e >= TIMEOUT_S for e in bombs)  # the deadline, not an early give-up
    s = sandbox.stats()
    assert s["timeouts"] == 3 and s["replacements"] == 3 and s["verified"] == len(pairs)
    # one job at a time (verify) gives the same answers
    assert [sandbox.verify(*p)[0] for p in pairs[7:20]] == expected[7:20]


def test_large_jobs_close_the_window_so_a_send_never_blocks_past_a_deadline():
    # a wide window, a bomb first, then jobs two of which would fill the 64 KiB pipe: without
    # the size limit the parent would block writing while the child is stuck on the bomb
    sb = Sandbox(TIMEOUT_S, 1024, soft_timeout=False, window=8)
    try:
        pad = "0" * 30_000
        pairs = [_bomb(0)] + [(pad + "5", "5"), (pad + "6", "5"), (pad + "7", "7")] * 2
        results = sb.verify_many(pairs)
        assert [r for r, _ in results] == ["timeout"] + ["ok", "wrong", "ok"] * 2
        assert TIMEOUT_S <= results[0][1] <= TIMEOUT_S + MARGIN_S
    finally:
        sb.close()


def test_child_killed_mid_run_costs_at_most_the_job_it_was_running(sandbox):
    pairs, expected = _pairs(400)
    killed = {}

    def kill_after_100_answers():
        # by progress, not by a timer: on a fast machine 400 easy answers take < 0.5 s
        while sandbox.stats()["verified"] < 100:
            time.sleep(0.001)
        killed["pid"] = sandbox.child_pid
        os.kill(killed["pid"], 9)
        killed["at"] = sandbox.stats()["verified"]

    killer = threading.Thread(target=kill_after_100_answers, daemon=True)
    killer.start()
    results = sandbox.verify_many(pairs)
    killer.join(timeout=5)
    reasons = [r for r, _ in results]
    assert killed["at"] < len(pairs)  # the kill landed mid-run
    assert sandbox.child_pid != killed["pid"] and sandbox.stats()["replacements"] >= 1
    assert reasons.count("crashed") <= 1  # the job it was on; the queued ones went to the next
    assert [r for r, e in zip(reasons, expected) if r != "crashed"] == [
        e for r, e in zip(reasons, expected) if r != "crashed"]


def test_window_must_be_positive():
    with pytest.raises(ValueError, match="window"):
        Sandbox(TIMEOUT_S, 1024, window=0)
