"""The weight sync as the training loop runs it, with real Ray actors on CPU (gloo): a DeepSpeed
learner group and a generator pool joined by a :class:`dispo_ray.sync.coordinator.WeightSync`."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from dispo_ray.infra.config import compose
from sync_pools import connected_sync, records

PROMPTS = ["12+7=", "3-45=", "9+9=", "40-1="]


@pytest.fixture(scope="module")
def sync_and_path(ray_cluster, tmp_path_factory):
    """One learner rank and one hf generator joined by a WeightSync; a 1 s sync timeout."""
    from dispo_ray.tiny.model import build_tiny_model
    cfg = compose(["generator.backend=hf", f"model.cache_dir={tmp_path_factory.mktemp('model')}",
                   "learner.sync_timeout_s=1", "trainer.max_staleness=1", "learner.num_actors=1",
                   "generator.num_actors=1", "learner.sync_bucket_mb=1"])
    path = build_tiny_model(cfg.model)
    with connected_sync(cfg, path) as sync:
        yield sync, path


def test_sync_behind_a_generation_longer_than_the_sync_timeout(sync_and_path):
    # trainer.max_staleness >= 1: the producer's generate() is still running when the sync starts,
    # so the generator's update_weights waits for the engine. With a 1 s sync timeout and a generation
    # of several seconds, the sync must wait for it (no deadline) and then succeed.
    import ray

    sync, path = sync_and_path
    recs = records(path, PROMPTS * 16)  # 512 rows: several seconds even with the faster hf decode loop
    actor = sync.generators.actors[0]
    t0 = time.monotonic()
    long_gen = actor.generate.remote(recs, 8, {"max_new_tokens": 200, "stop": []})
    # the actor runs calls concurrently (a sync may reach a streaming engine between two steps);
    # a batch generate holds the engine for its whole call, so a sync issued after it started waits
    time.sleep(1.0)
    sync.publish(1)
    waited = time.monotonic() - t0
    samples = ray.get(long_gen)
    busy = ray.get(actor.load.remote())["busy_s"]
    print(f"\ngeneration {busy:.1f}s, publish returned {waited:.1f}s after it was issued (sync timeout 1 s)")
    assert busy > 1.5 and waited > busy * 0.8  # longer than the 1 s sync timeout, and the sync waited for it
    assert {s.version for s in samples} == {0}
    assert sync.generators.versions() == [1] and sync.version == 1
    sync.publish(2)  # the next sync, with idle generators, as usual
    assert sync.generators.versions() == [2]
    after = sync.generators.generate(recs[:2], 2)
    assert {s.version for s in after} == {2} and all(torch.isfinite(torch.tensor(s.response_logprobs)).all()
                                                     for s in after)


def test_the_published_version_has_one_owner_and_a_restarted_generator_is_resynced_through_it(sync_and_path):
    import ray

    from dispo_ray.rollout.staleness import StalenessGate

    sync, path = sync_and_path
    recs = records(path, PROMPTS)
    start = sync.version
    gate = StalenessGate(0, sync)  # reads the version from the weight sync, woken by its publish
    assert gate.version == start and not gate.admissible(start + 1)
    woke = []
    waiter = threading.Thread(target=lambda: woke.append(gate.wait_admissible(start + 1, timeout=60)))
    waiter.start()
    sync.publish(start + 1)
    waiter.join(timeout=30)
    assert woke == [True] and gate.version == start + 1 == sync.version
    assert sync.generators.versions() == [start + 1]
    with pytest.raises(ValueError, match="versions only grow"):
        sync.publish(start)  # an older version only through restore (checkpoint weights)
    sync.restore(start)  # a rollback: the version goes back with the weights
    assert sync.version == gate.version == start and sync.generators.versions() == [start]
    sync.publish(start + 1)

    # a generator that died between syncs comes back with the initial weights (version 0): the pool
    # asks the weight sync (not the driver) to re-form the group and re-send the published version
    # before the dead actor's prompts are re-issued
    assert sync.generators.weight_sync is sync
    ray.kill(sync.generators.actors[0], no_restart=False)
    samples = sync.generators.generate(recs, 2)
    assert {s.version for s in samples} == {start + 1} and sync.generators.reissued == len(recs)
    assert sync.generators.needs_sync == set() and sync.generators.versions() == [start + 1]
    gate.close()
    sync.publish(start + 2)  # the re-formed group works; a closed gate no longer listens
    assert sync.generators.versions() == [start + 2] and sync.version == start + 2
