"""Start-up phases: the pools start at once, each is timed, a failure shuts the built ones down."""
from __future__ import annotations

import threading
import time

import pytest

from dispo_ray.rollout.startup import StartupClock, start_concurrently


def test_pools_start_concurrently_and_each_is_timed():
    clock = StartupClock()
    started = []
    barrier = threading.Barrier(3, timeout=5)  # every builder must be running before any returns

    def build(name, secs):
        def f():
            started.append(name)
            barrier.wait()
            time.sleep(secs)
            return name.upper()
        return f

    out = start_concurrently({"a": build("a", 0.2), "b": build("b", 0.6), "c": build("c", 0.4)}, clock,
                             on_failure=lambda obj: None)
    assert out == {"a": "A", "b": "B", "c": "C"} and list(out) == ["a", "b", "c"]
    assert sorted(started) == ["a", "b", "c"]
    s = clock.seconds
    assert 0.2 <= s["a"] < s["c"] < s["b"]
    assert s["b"] <= s["pools_concurrent"] < s["a"] + s["b"] + s["c"]  # the slowest, not the sum
    line = clock.finish()
    assert line.startswith("start-up ") and "pools concurrent" in line and s["total"] >= s["pools_concurrent"]


def test_a_failing_pool_shuts_down_the_built_ones_and_raises_its_own_error():
    clock = StartupClock()
    shut = []

    def fail_late():
        time.sleep(0.2)
        raise RuntimeError("learner died")

    def fail_early():
        raise ValueError("engine refused the model")

    with pytest.raises(ValueError, match="engine refused"):  # the first failing builder in order
        start_concurrently({"rewards": lambda: "R", "generators": fail_early, "learners": fail_late}, clock,
                           on_failure=shut.append)
    assert shut == ["R"] and set(clock.seconds) >= {"rewards", "generators", "learners", "pools_concurrent"}
