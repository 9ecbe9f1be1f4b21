"""The streaming producer scores finished groups in a thread of its own
(``StreamingProducer._score`` / ``_absorb_scored``): while a batch of groups waits for its verdicts,
the slots it freed on the engines are refilled; the groups stay in flight (carried by a checkpoint,
waited for as old groups) until the verdicts are in, and a scoring error reaches the producer
thread. The engines and the reward pool are stood in for, so the verdicts can be held back (the
whole loop with real engines and the real sandboxed pool: tests/e2e/test_streaming_e2e.py)."""
from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest

from dispo_ray.data.records import PromptDataset, PromptRecord
from dispo_ray.infra.config import compose
from dispo_ray.rollout.staleness import StalenessGate
from dispo_ray.rollout.streaming import StreamingProducer
from dispo_ray.sample import Sample
from stream_standins import Published, Recorder


class HeldRewards:
    """Scores only once ``release`` is set (reward 1 to the first sample of a group, 0 to the rest)."""

    def __init__(self, fail=False):
        self.release, self.fail, self.calls = threading.Event(), fail, 0

    def score_samples(self, samples):
        self.calls += 1
        assert self.release.wait(30)
        if self.fail:
            raise RuntimeError("verifier exploded")
        for i, s in enumerate(samples):
            s.reward = 1.0 if i % 2 == 0 else 0.0


def _finished(router, version):
    return [(g.gid, [Sample(g.record.uid, [1], [5, 6], [-0.1, -0.2], version) for _ in range(g.n)])
            for g in router.groups]


def _producer(rewards, want=4):
    cfg = compose(["trainer.rollout_mode=stream", "trainer.max_staleness=1", f"trainer.prompts_per_step={want}",
                   "algorithm.dynamic_sampling=false", "algorithm.group_size=2"])
    records = [PromptRecord(f"p{i}", f"{i}+1=", [1, 2, 3], str(i + 1), "t") for i in range(50)]
    router = Recorder()
    p = StreamingProducer(cfg, PromptDataset(records, seed=0), SimpleNamespace(stream=router), rewards,
                          StalenessGate(1, Published(1)), 1, 10)
    return p, router


def test_freed_slots_are_refilled_while_the_verdicts_are_pending():
    rewards = HeldRewards()
    p, router = _producer(rewards)
    assert p._top_up(1, want=4, budget=10) == 4  # step 1's draw
    p._score(_finished(router, version=0)[:3])  # three groups finish and go to the scorer
    assert len(p.inflight) == 4 and p.on_engines() == 1 and not p.ready
    # step 2's gate is open (version 1 published): the three freed slots take step 2's groups now,
    # before a single verdict is in
    assert p._top_up_ahead(2, want=4, cap=10) == 3
    assert not p.scoring[0][0].done() and len(router.groups) == 7
    # step 1 still needs its scored groups: they are waited for (old) and carried by a checkpoint
    assert {g.version for g in p.inflight.values() if g.samples} == {0}
    assert len(p._carry()) == 7
    generated, counts, timing = [], {"rollout/groups_dropped": 0.0}, {"reward_s": 0.0}
    p._absorb_scored(generated, counts, timing)
    assert not p.ready and not generated  # nothing is kept before its verdict
    rewards.release.set()
    p.scoring[0][0].result(timeout=30)
    p._absorb_scored(generated, counts, timing)
    assert [g.gid for g in p.ready] == [g.gid for g in router.groups[:3]]
    assert len(generated) == 6 and [s.reward for s in generated[:2]] == [1.0, 0.0]
    assert len(p.inflight) == 4 and p.on_engines() == 4 and not p.scoring and timing["reward_s"] > 0
    p._scorer.shutdown()


def test_a_scoring_error_is_raised_in_the_producer_thread():
    rewards = HeldRewards(fail=True)
    p, router = _producer(rewards)
    p._top_up(1, want=4, budget=10)
    p._score(_finished(router, version=0)[:1])
    rewards.release.set()
    with pytest.raises(RuntimeError, match="verifier exploded"):
        p.scoring[0][0].exception(timeout=30)
        p._absorb_scored([], {"rollout/groups_dropped": 0.0}, {"reward_s": 0.0})
    p._scorer.shutdown()
