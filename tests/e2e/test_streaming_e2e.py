"""Streaming rollouts (``trainer.rollout_mode=stream``) through the whole loop, every piece real:
the staleness bound per sample at k = 1 with a generator killed mid-stream, and a SIGKILL of the
driver and a resume at k = 1 that loses no prompt and trains none twice. (Exact resume at k = 0 is
tests/e2e/test_driver_e2e.py, run in both rollout modes.)"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter

from dispo_ray.infra.config import compose
from dispo_ray.rollout.staleness import StalenessGate, StalenessViolation
from dispo_ray.sample import Sample
from runs import REPO, SMALL, kill_at_checkpoint, sabotage, train_steps

STREAM = ["trainer.rollout_mode=stream", "trainer.max_staleness=1"]


def test_the_bound_is_checked_on_each_samples_oldest_token():
    class Published:
        version = 2

        def watch(self, notify):
            pass

        def unwatch(self, notify):
            pass

    gate = StalenessGate(1, Published())
    # tokens from versions 1 and 2: trained at step 2 it is 1 step stale, at step 3 it is 2
    s = Sample("p", [1], [5, 6, 7], [-1.0] * 3, version=1, version_spans=[[1, 2], [2, 1]])
    assert gate.check_and_record(2, [s.version])["staleness/max"] == 1
    try:
        gate.check_and_record(3, [s.version])
        raise AssertionError("a sample whose oldest token is 2 versions old passed a bound of 1")
    except StalenessViolation as e:
        assert "outside staleness [0, 1]" in str(e)


def test_stream_k1_bound_per_sample_with_a_generator_killed_mid_stream(ray_cluster, tmp_path):
    import ray
    from dispo_ray.rollout.driver import Trainer

    cfg = compose(SMALL + STREAM + ["generator.num_actors=2", "trainer.total_steps=6", f"trainer.run_dir={tmp_path}",
                                    "learner.mini_batches=1"])
    trainer = Trainer(cfg)
    killed = {}

    def kill_generator():
        deadline = time.monotonic() + 120
        while trainer.generators.stream.in_flight() == 0 and time.monotonic() < deadline:
            time.sleep(0.005)
        killed["in_flight"] = trainer.generators.stream.in_flight()
        ray.kill(trainer.generators.actors[0], no_restart=False)  # Ray restarts it

    t = sabotage(trainer, 2, kill_generator)
    try:
        summary = trainer.fit()
        t.join(timeout=60)
        steps = train_steps(str(tmp_path))
        assert summary["steps"] == 6 and len(steps) == 6 and killed["in_flight"] > 0
        assert trainer.generators.stream.requeued > 0  # the dead actor's groups were re-submitted
        hist = trainer.gate.histogram
        assert sum(hist.values()) == sum(m["rollout/train_samples"] for m in steps) > 0
        assert min(hist) >= 0 and max(hist) <= 1 and hist[1] > 0  # overlap happened, within the bound
        G = cfg.algorithm.group_size
        for m in steps:
            assert m["rollout/train_samples"] == m["rollout/groups_kept"] * G == cfg.trainer.prompts_per_step * G
        assert trainer.generators.versions() == [summary["version"]] * 2  # the restarted one was re-synced
    finally:
        trainer.shutdown()


def _record(out, run_dir, run, *extra):
    args = [sys.executable, os.path.join(REPO, "tests", "support", "record_prompts.py"), str(out), *SMALL, *STREAM,
            "trainer.total_steps=8", f"trainer.run_dir={run_dir}", "trainer.save_every=1",
            "trainer.keep_checkpoints=0", *extra]
    return subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env={**os.environ, "RECORD_RUN": run})


def test_kill_and_resume_at_k1_loses_no_prompt_and_trains_none_twice(tmp_path):
    out, run_dir = tmp_path / "prompts.jsonl", tmp_path / "run"
    p = _record(out, run_dir, "first")
    kill_at_checkpoint(p, run_dir, 5)  # the driver and its local Ray cluster, mid-run

    p = _record(out, run_dir, "resumed", "trainer.resume=true")
    log = p.communicate(timeout=600)[0]
    assert p.returncode == 0, log[-3000:]
    resumed_at = int(log.split("resumed from step ")[1].split()[0])
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    first = {x["step"]: x for x in lines if x["run"] == "first"}
    again = {x["step"]: x for x in lines if x["run"] == "resumed"}
    assert sorted(again) == list(range(resumed_at, 8)) and resumed_at >= 5

    # trained exactly once: the first run's steps before the checkpoint, the resumed run's after it
    trained = Counter(u for s in range(resumed_at) for u in first[s]["trained"])
    trained.update(u for s in again for u in again[s]["trained"])
    assert trained and max(trained.values()) == 1, [u for u, c in trained.items() if c > 1]
    # nothing lost: every prompt the killed run drew after the checkpoint is drawn again
    lost = {u for s, x in first.items() if s >= resumed_at for u in x["generated"]}
    drawn_again = {u for x in again.values() for u in x["generated"]}
    assert lost <= drawn_again, lost - drawn_again
    # what the checkpoint re-queued (in flight or ready, not trained) comes first after the resume
    with open(run_dir / "checkpoints" / f"step_{resumed_at}" / "driver_state.json") as f:
        requeued = json.load(f)["cursor"]["requeued"]
    assert set(requeued) <= drawn_again and not set(requeued) & {u for s in range(resumed_at) for u in first[s]["trained"]}
    carried = [json.load(open(d / "driver_state.json"))["cursor"]["requeued"]
               for d in (run_dir / "checkpoints").iterdir() if (d / "driver_state.json").exists()]
    assert any(carried), "no checkpoint carried a group in flight: the test did not exercise the carry"
    assert len(train_steps(str(run_dir))) == 8
