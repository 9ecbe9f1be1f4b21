"""Async overlap, the system's headline: step time with ``trainer.max_staleness = 0`` divided by
step time with ``max_staleness = 1``, same workload (embedded default, vLLM generator, DeepSpeed
learner), both measured in this process one after the other.

The ideal for a workload whose synchronous step is ``t_gen`` (generate + reward) followed by
``t_train`` (train + sync) is ``(t_gen + t_train) / max(t_gen, t_train)``: perfect overlap hides the
shorter phase entirely. We report the measured speed-up, that ideal (from the synchronous run's
own phase times) and the achieved fraction of it (goal >= 0.9), plus where the time goes in each
configuration (generate / reward / train / sync / idle = step time not spent in this thread's
phases, i.e. waiting for a rollout).

On a 2-core machine generation (the vLLM engine process) and training (the DeepSpeed rank) share
the same two cores, so overlap buys less than on a cluster where they own separate GPUs.
"""
from __future__ import annotations

import sys

import statistics
import time
from typing import Dict, List

from dispo_ray.infra.config import compose

PHASES = ("timing/generate", "timing/reward", "timing/train", "timing/sync")


def _run(k: int, steps: int, run_dir: str) -> List[Dict[str, float]]:
    from dispo_ray.rollout.driver import Trainer
    from dispo_ray.infra.metrics_log import read_metrics

    cfg = compose([f"trainer.max_staleness={k}", f"trainer.total_steps={steps}", "trainer.eval_every=0",
                   "trainer.progress_bar=false", "trainer.tensorboard=false", f"trainer.run_dir={run_dir}",
                   "trainer.eval_max_prompts=8", "trainer.eval_k=1"])
    trainer = Trainer(cfg)
    try:
        trainer.fit()
    finally:
        trainer.shutdown()
    rows = [r for r in read_metrics(run_dir) if "rollout/samples" in r]  # training steps
    return rows[2:-1]  # drop warm-up steps and the last one (it carries the final evaluation)


def _median(rows: List[Dict[str, float]], key: str) -> float:
    return statistics.median(r.get(key, 0.0) for r in rows)


def main(quick: bool = False) -> List[Dict]:
    import tempfile

    steps = 12 if quick else 40
    with tempfile.TemporaryDirectory(prefix="bench-async-") as tmp:
        t0 = time.time()
        sync_rows = _run(0, steps, f"{tmp}/k0")
        async_rows = _run(1, steps, f"{tmp}/k1")
        wall = time.time() - t0
    t_sync, t_async = _median(sync_rows, "timing/step"), _median(async_rows, "timing/step")
    t_gen = _median(sync_rows, "timing/generate") + _median(sync_rows, "timing/reward")
    t_train = _median(sync_rows, "timing/train") + _median(sync_rows, "timing/sync")
    ideal = (t_gen + t_train) / max(t_gen, t_train)
    speedup = t_sync / t_async

    def breakdown(rows):
        parts = {p.split("/")[1]: _median(rows, p) for p in PHASES}
        step = _median(rows, "timing/step")
        # k=0: this thread waits for the whole rollout; k=1: generation runs in the producer thread
        busy = parts["train"] + parts["sync"]  # timing/step leaves evaluation out
        parts["wait_rollout"] = _median(rows, "timing/wait_rollout")
        parts["step"] = step
        parts["other"] = max(step - busy - parts["wait_rollout"], 0.0)
        return ", ".join(f"{k} {v:.3f}s" for k, v in parts.items())

    notes = f"{steps} steps each, median step; k=0: {breakdown(sync_rows)} | k=1: {breakdown(async_rows)}"
    return [
        {"name": "async overlap: step time k=0 / k=1", "value": round(speedup, 3), "baseline": 1.0,
         "ratio": round(speedup, 3), "goal": f"ideal {ideal:.2f}", "unit": "x", "notes": notes},
        {"name": "async overlap: achieved fraction of ideal", "value": round(speedup, 3), "baseline": round(ideal, 3),
         "ratio": round(speedup / ideal, 3), "goal": ">= 0.9", "unit": "x",
         "notes": f"ideal = (t_gen {t_gen:.3f}s + t_train {t_train:.3f}s) / max(...); wall {wall:.0f}s"},
    ]


if __name__ == "__main__":
    from bench import print_rows

    print_rows(main(quick="--quick" in sys.argv))
