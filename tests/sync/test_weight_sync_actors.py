"""The weight sync as the training loop runs it, with real Ray actors on CPU (gloo): a DeepSpeed
learner group and a generator pool joined by ``Trainer.connect_weight_sync``."""
from __future__ import annotations

import time

import torch

from dispo_ray.infra.config import compose
from sync_trainer import records, sync_trainer


def test_sync_behind_a_generation_longer_than_the_sync_timeout(ray_cluster, tmp_path):
    # trainer.max_staleness >= 1: the producer's generate() is still running when the sync starts,
    # so the generator's update_weights queues behind it. With a 1 s sync timeout and a generation
    # of several seconds, the sync must wait for it (no deadline) and then succeed.
    import ray

    from dispo_ray.tiny.model import build_tiny_model
    cfg = compose(["generator.backend=hf", f"model.cache_dir={tmp_path}", "learner.sync_timeout_s=1",
                   "trainer.max_staleness=1", "learner.num_actors=1", "generator.num_actors=1",
                   "learner.sync_bucket_mb=1"])
    path = build_tiny_model(cfg.model)
    trainer = sync_trainer(cfg, path)
    try:
        recs = records(path, ["12+7=", "3-45=", "9+9=", "40-1="] * 4)
        actor = trainer.generators.actors[0]
        long_gen = actor.generate.remote(recs, 8, {"max_new_tokens": 150, "stop": []})  # queued first
        t0 = time.monotonic()
        trainer.sync_weights(1)  # update_weights runs after long_gen on the actor
        waited = time.monotonic() - t0
        samples = ray.get(long_gen)
        busy = ray.get(actor.load.remote())["busy_s"]
        print(f"\ngeneration {busy:.1f}s, sync_weights returned after {waited:.1f}s (sync timeout 1 s)")
        assert busy > 2.0 and waited > busy * 0.8  # the sync really waited behind the generation
        assert {s.version for s in samples} == {0}
        assert trainer.generators.versions() == [1] and trainer.version == 1
        trainer.sync_weights(2)  # the next sync, with idle generators, as usual
        assert trainer.generators.versions() == [2]
        after = trainer.generators.generate(recs[:2], 2)
        assert {s.version for s in after} == {2} and all(torch.isfinite(torch.tensor(s.response_logprobs)).all()
                                                         for s in after)
    finally:
        trainer.shutdown()
