"""Pure parts of the driver: staleness admission, collapse guard on synthetic streams,
repetition measure, avg@k / pass@k, RNG state round trip."""
from __future__ import annotations

import random
import threading
import time

import numpy as np
import pytest
import torch

from dispo_ray.algorithm.collapse_guard import CollapseGuard
from dispo_ray.infra.config import compose
from dispo_ray.rollout.evaluation import avg_and_pass_at_k
from dispo_ray.sample import Sample
from dispo_ray.infra.run_state import load_driver_state, save_driver_state
from dispo_ray.rollout.staleness import StalenessGate, StalenessViolation
from dispo_ray.algorithm.text_metrics import is_repetitive, repetition_rate, tail_repeats


class _Published:
    """A version source the way the weight sync is one (``version``, ``watch``), without actors."""

    def __init__(self, version: int = 0):
        self.version, self.watchers = version, []

    def watch(self, notify):
        self.watchers.append(notify)

    def unwatch(self, notify):
        self.watchers.remove(notify)

    def publish(self, version: int):
        self.version = version
        for notify in self.watchers:
            notify()


def test_gate_admits_by_version_and_blocks_until_publish():
    versions = _Published(0)
    gate = StalenessGate(max_staleness=1, versions=versions)  # owns no version: reads the source's
    assert gate.admissible(0) and gate.admissible(1) and not gate.admissible(2)
    released = []
    t = threading.Thread(target=lambda: released.append(gate.wait_admissible(2, timeout=10)))
    t.start()
    time.sleep(0.2)
    assert not released  # still blocked: step 2 needs version >= 1
    versions.publish(1)
    t.join(timeout=5)
    assert released == [True] and gate.version == 1
    gate.close()
    assert gate.wait_admissible(10, timeout=1) is False
    assert versions.watchers == []  # a closed gate stops listening


def test_gate_k0_is_on_policy_and_violations_raise():
    gate = StalenessGate(max_staleness=0, versions=_Published())
    assert gate.check_and_record(0, [0, 0, 0])["staleness/max"] == 0
    with pytest.raises(StalenessViolation, match="step 3"):
        gate.check_and_record(3, [3, 2])
    gate2 = StalenessGate(max_staleness=2, versions=_Published())
    m = gate2.check_and_record(5, [5, 4, 3, 3])
    assert m["staleness/mean"] == pytest.approx(1.25) and m["staleness/frac_2"] == pytest.approx(0.5)
    with pytest.raises(StalenessViolation):
        gate2.check_and_record(5, [6])  # from the future: impossible, also refused


def test_repetition_measure():
    assert tail_repeats([1, 2, 3, 7, 7, 7, 7]) == 4
    assert tail_repeats([5, 1, 2, 1, 2, 1, 2]) == 3
    assert is_repetitive([9, 3, 4, 3, 4, 3, 4, 3, 4])
    assert not is_repetitive([1, 2, 3, 4, 5, 6])
    assert repetition_rate([[1, 1, 1, 1], [1, 2, 3], [], [4, 5, 4, 5, 4, 5, 4, 5]]) == pytest.approx(0.5)


def _metrics(rep=0.0, length=10.0, ent=1.0):
    return {"rollout/repetition": rep, "rollout/response_length": length, "actor/entropy": ent}


def test_collapse_guard_fires_once_on_sustained_signal_only():
    cfg = compose(["trainer.collapse_guard.patience=3"]).trainer.collapse_guard
    guard = CollapseGuard(cfg)
    stream = [_metrics(), _metrics(rep=0.9), _metrics(rep=0.9), _metrics(), _metrics(rep=0.9),
              _metrics(rep=0.9), _metrics(rep=0.9), _metrics(rep=0.9)]
    fired = [guard.update(i, m) for i, m in enumerate(stream)]
    assert fired == [[], [], [], [], [], [], ["repetition"], []]  # a blip of 2 does not fire
    guard2 = CollapseGuard(cfg)
    fired2 = [guard2.update(i, _metrics(length=1.0, ent=0.001)) for i in range(3)]
    assert sorted(fired2[2]) == ["entropy_low", "length"] and fired2[:2] == [[], []]
    guard3 = CollapseGuard(cfg)
    assert all(guard3.update(i, _metrics(ent=float("nan"))) == [] for i in range(5))
    assert [e["signal"] for e in guard2.events] == ["length", "entropy_low"]


def _sample(uid, correct):
    return Sample(prompt_uid=uid, prompt_token_ids=[1], response_token_ids=[2, 3], response_logprobs=[0.0, 0.0],
                  version=0, correct=correct)


def test_avg_and_pass_at_k_by_hand():
    samples = [_sample("a", True), _sample("a", False), _sample("a", False), _sample("a", False),
               _sample("b", False), _sample("b", False), _sample("b", False), _sample("b", False),
               _sample("c", True), _sample("c", True), _sample("c", True), _sample("c", False)]
    m = avg_and_pass_at_k(samples)
    assert m["eval/accuracy"] == pytest.approx((0.25 + 0 + 0.75) / 3)
    assert m["eval/pass@4"] == pytest.approx(2 / 3)


def test_driver_state_roundtrip_restores_rngs(tmp_path):
    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    save_driver_state(str(tmp_path), {"step": 7, "cursor": {"epoch": 1, "pos": 5}})
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    state = load_driver_state(str(tmp_path))
    assert state == {"step": 7, "cursor": {"epoch": 1, "pos": 5}}
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected
