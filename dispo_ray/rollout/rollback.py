"""What the driver does after each update besides logging: the collapse guard's action and the
adaptive windows (:func:`after_step`), and the collapse guard's rollback itself (:func:`roll_back`).

A rollback to checkpoint c (chosen by :class:`~dispo_ray.algorithm.collapse_guard.CollapseGuard`):

    1. the rollout producer is stopped and dropped with every batch it had queued or in flight:
       under asynchrony (``max_staleness = k >= 1``) those were sampled by weights of the
       abandoned branch, so they are redone, not trained; its thread is joined first, so no
       generate call is left running;
    2. the learner loads c's DeepSpeed checkpoint (model, optimizer, scheduler, RNG of every
       rank); the driver takes c's step, version, data cursor and RNG;
    3. a fresh staleness gate at version c (versions count updates on the current branch, so
       they go back with it; the histogram of trained samples keeps counting);
    4. c's driver state is rewritten with the present windows (the widened one included) and
       guard history, and ``latest`` points at c: a crash now resumes on the new branch;
    5. version c is broadcast to the generators and published (``WeightSync.restore``: the one
       owner of the version takes it back with the branch), and a new producer starts at step c.

Every sample trained after the rollback was sampled by a version >= c of the new branch, so the
staleness bound ``0 <= s - v <= k`` holds as before (the gate asserts it on every batch). Metrics
of the abandoned steps stay in metrics.jsonl; ``collapse/rollbacks`` tells the branches apart.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

from dispo_ray.algorithm.collapse_guard import Response
from dispo_ray.algorithm.metric_keys import COLLAPSE_EVENTS, COLLAPSE_ROLLBACKS


def after_step(trainer: Any, metrics: Dict[str, float], log: Any) -> Optional[Response]:
    """Add ``windows/*`` (what this step trained with) and ``collapse/*`` to ``metrics``; run the
    collapse guard, apply a rollback's widening, else let the adaptive controller set the next
    step's windows (the driver sends them with the next batch). Returns the guard's response when a signal fired."""
    guard, windows, cg = trainer.guard, trainer.windows, trainer.cfg.trainer.collapse_guard
    metrics.update(windows.metrics())
    fired = guard.update(trainer.step, metrics)
    response = guard.respond(trainer.step, fired, windows.current, windows.limits) if fired else None
    if response is not None and response.action == "rollback":
        windows.set({k: new for k, (_, new) in response.changes.items()})
        widened = ", ".join(f"{k} {old:g} -> {new:g}" for k, (old, new) in response.changes.items())
        log.message(f"collapse guard: {', '.join(fired)} held for {cg.patience} steps at step {trainer.step}; "
                    f"rollback to the step-{response.restored_step} checkpoint, {widened}; continuing")
    else:
        if response is not None:
            why = f"; rollback not possible: {response.reason}" if response.reason else ""
            for signal in fired:
                log.message(f"WARNING collapse guard: '{signal}' held for {cg.patience} steps at step "
                            f"{trainer.step} (see trainer.collapse_guard){why}")
        if trainer.controller is not None:
            windows.set(trainer.controller.propose(metrics, windows.current))
    metrics[COLLAPSE_EVENTS] = float(len(guard.events))
    metrics[COLLAPSE_ROLLBACKS] = float(guard.rollbacks)
    return response


def roll_back(trainer: Any, step: int) -> None:
    """Restore checkpoint ``step`` and restart the rollout side from it (see the module docstring)."""
    from dispo_ray.infra.run_state import checkpoint_dir
    from dispo_ray.rollout.checkpointing import restore

    trainer.producer.stop()
    if trainer.producer.running:
        raise RuntimeError("rollback: the rollout producer did not stop")
    restore(trainer, checkpoint_dir(trainer.run_dir, step), rollback=True)
    trainer.start_producer()
