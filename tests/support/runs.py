"""What the end-to-end tests share: the small real run (hf generator, 4 prompts x 4 samples,
16-token answers) and reading its trained steps back."""
from __future__ import annotations

import os
import threading
import time

from dispo_ray.infra.metrics_log import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMALL = ["generator=hf", "generator.max_new_tokens=16", "trainer.prompts_per_step=4", "algorithm.group_size=4",
         "trainer.eval_every=0", "trainer.eval_max_prompts=16", "trainer.eval_k=2", "trainer.progress_bar=false",
         "trainer.tensorboard=false", "reward.num_workers=1", "learner.micro_batch_size=8"]


def train_steps(run_dir):
    return [m for m in read_metrics(run_dir) if "rollout/samples" in m]  # step 0 is the initial eval


def kill_at_checkpoint(p, run_dir, step: int, timeout: float = 600) -> None:
    """SIGKILL the process group of run ``p`` (the driver and its local Ray cluster) as soon as its
    ``step_<step>`` checkpoint is the latest."""
    import signal

    marker = os.path.join(str(run_dir), "checkpoints", "latest")
    deadline = time.monotonic() + timeout
    while not (os.path.exists(marker) and open(marker).read() == f"step_{step}"):
        assert p.poll() is None and time.monotonic() < deadline, f"run ended before its step-{step} checkpoint"
        time.sleep(0.02)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait(timeout=60)


def sabotage(trainer, at_step: int, act) -> threading.Thread:
    """Start a thread that calls ``act()`` once ``trainer.fit()`` has reached ``at_step`` (the
    fault tests' way of hitting a running loop)."""
    def run():
        while getattr(trainer, "producer", None) is None or trainer.step < at_step:
            time.sleep(0.01)
        act()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t

