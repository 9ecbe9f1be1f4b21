"""The streaming producer's look-ahead (``StreamingProducer._top_up_ahead``): while step s waits for
its last groups, each group that finishes is replaced by one for step s + 1, only once s + 1's gate
is open, never with more than one step's draw in flight and never beyond what s + 1 needs. The
engines are stood in for by a router that records what it is handed (the whole loop with real
engines, the look-ahead included: tests/e2e/test_streaming_e2e.py)."""
from __future__ import annotations

from types import SimpleNamespace

from dispo_ray.data.records import PromptDataset, PromptRecord
from dispo_ray.infra.config import compose
from dispo_ray.rollout.producer import request_seed
from dispo_ray.rollout.staleness import StalenessGate
from dispo_ray.rollout.streaming import Group, StreamingProducer
from stream_standins import Published, Recorder


def _producer(k, published, want=4, total=10):
    cfg = compose(["trainer.rollout_mode=stream", f"trainer.max_staleness={k}", f"trainer.prompts_per_step={want}",
                   "algorithm.dynamic_sampling=false"])
    records = [PromptRecord(f"p{i}", f"{i}+1=", [1, 2, 3], str(i + 1), "t") for i in range(50)]
    router = Recorder()
    p = StreamingProducer(cfg, PromptDataset(records, seed=0), SimpleNamespace(stream=router), None,
                          StalenessGate(k, Published(published)), 1, total)
    p.inflight["tail"] = Group("tail", records[0], 0, 0)  # step 1's last, long group, still decoding
    return p, router


def test_groups_for_the_next_step_replace_finished_ones_up_to_what_it_needs():
    p, router = _producer(k=1, published=1)  # version 1 published: step 2's gate (2 - 1 <= 1) is open
    assert p._top_up_ahead(2, want=4, cap=10) == 3  # one step's draw in flight: the tail + 3
    assert p._top_up_ahead(2, want=4, cap=10) == 0  # the engines are as full as one step keeps them
    assert [g.spec.seed for g in router.groups] == [request_seed(p.cfg.trainer.seed, 2, d) for d in range(3)]
    del p.inflight[router.groups[0].gid]  # one of them finished
    assert p._top_up_ahead(2, want=4, cap=10) == 1  # replaced: step 2 now has its 4
    for g in router.groups[1:3]:
        del p.inflight[g.gid]
    assert p._top_up_ahead(2, want=4, cap=10) == 0  # slots free, but step 2 needs no more
    assert p.draws_this_step(2) == 4 and len(router.groups) == 4


def test_no_look_ahead_before_the_gate_opens_at_k0_or_past_the_last_step():
    p, router = _producer(k=1, published=0)  # step 2 would be 2 versions stale
    assert p._top_up_ahead(2, want=4, cap=10) == 0
    p, router = _producer(k=0, published=5)  # rounds: a step's prompts are drawn only for it
    assert p._top_up_ahead(2, want=4, cap=10) == 0
    p, router = _producer(k=1, published=1, total=2)
    assert p._top_up_ahead(2, want=4, cap=10) == 0
    p, router = _producer(k=1, published=1)
    assert p._top_up_ahead(2, want=4, cap=2) == 2  # dynamic sampling's draw cap for step 2 holds
    assert len(router.groups) == 2
