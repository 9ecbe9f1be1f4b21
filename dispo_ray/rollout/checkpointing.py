"""Saving the run and the one path that restores it (resume, collapse-guard rollback and learner
recovery all go through :func:`restore`).

Save of step N, in this order, so that ``latest`` only ever names a complete checkpoint:

    1. a stale ``step_N`` folder (an abandoned branch, a failed save) is removed;
    2. every learner rank writes its DeepSpeed files and RNG into ``step_N/learner``;
    3. the driver writes ``driver_state.json`` (step, version, data cursor, gate, guard, windows, RNG);
    4. ``manifest.json`` (every file, its size and SHA-256) is written last;
    5. ``latest`` is moved to ``step_N``; older checkpoints beyond ``trainer.keep_checkpoints`` are
       deleted, except the one a collapse-guard rollback may still need.

A failure in 1-4 removes the partial folder and ends the run with one line
(:func:`~dispo_ray.infra.checkpoints.write_failed`: a full volume is named with path, step and size).
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any, Optional

from dispo_ray.infra import checkpoints
from dispo_ray.infra.run_state import checkpoint_dir, load_driver_state, mark_latest, save_driver_state


def save(trainer: Any) -> str:
    """Checkpoint the trainer at ``trainer.step`` (all five steps above); returns the folder."""
    run_dir, step = trainer.run_dir, trainer.step
    path = checkpoint_dir(run_dir, step)
    needed = checkpoints.estimate_bytes(run_dir, trainer.learners.num_params)
    try:
        shutil.rmtree(path, ignore_errors=True)
        trainer.learners.save_checkpoint(os.path.join(path, "learner"))
        trainer.guard.record_checkpoint(step)
        producer = trainer.producer  # None before the rollouts start (the step-0 checkpoint)
        cursor = producer.cursor_before(step) if producer is not None else trainer.train_set.state_dict()
        save_driver_state(path, trainer.driver_state(cursor))
        checkpoints.write_manifest(path, step)
    except Exception as e:  # noqa: BLE001 - one line (the driver first checks for a lost learner rank)
        raise checkpoints.write_failed(step, path, needed, e) from e
    mark_latest(run_dir, step)
    deleted = checkpoints.prune(run_dir, trainer.cfg.trainer.keep_checkpoints,
                                protected=trainer.guard.protected_checkpoints(step))
    trainer.guard.forget_checkpoints(deleted)
    return path


def restore(trainer: Any, path: str, *, rollback: bool = False) -> None:
    """Load the checkpoint at ``path`` into the learner group and the driver: step, data cursor and
    RNG; a fresh staleness gate (it reads the version from the weight sync). A resume or a learner
    recovery also takes the gate's histogram, the guard's history and the windows from the
    checkpoint; a rollback keeps the present guard and windows (the widened one included) and the
    histogram of everything trained so far, and rewrites the checkpoint's driver state with them
    so that a crash now resumes on the new branch. Ends by broadcasting the restored weights and
    publishing the checkpoint's version, possibly older than the present one
    (:meth:`dispo_ray.sync.coordinator.WeightSync.restore`)."""
    from dispo_ray.rollout.staleness import StalenessGate

    trainer.learners.load_checkpoint(os.path.join(path, "learner"))
    state = load_driver_state(path)
    trainer.step, version = int(state["step"]), int(state["version"])
    trainer.train_set.load_state_dict(state["cursor"])
    trainer.gate.close()  # the replaced gate stops listening to the weight sync
    gate = StalenessGate(trainer.cfg.trainer.max_staleness, trainer.weight_sync)
    if rollback:
        gate.histogram = trainer.gate.histogram
    else:
        gate.load_state_dict(state["gate"])
        trainer.guard.load_state_dict(state["guard"])
        trainer.guard.forget_checkpoints([c for c in trainer.guard.saved_steps  # pruned after that save
                                          if checkpoints.problem(checkpoint_dir(trainer.run_dir, c)) is not None])
        trainer.windows.load_state_dict(state.get("windows"))
    trainer.gate = gate
    if rollback:
        # the checkpoint's version: the weight sync publishes it below, once the weights are out
        save_driver_state(path, {**trainer.driver_state(state["cursor"]), "version": version})
        checkpoints.write_manifest(path, trainer.step)
        mark_latest(trainer.run_dir, trainer.step)
    trainer.weight_sync.restore(version)


def truncate_metrics(run_dir: str, step: int) -> None:
    """metrics.jsonl keeps the history up to ``step``; later lines belonged to the lost run."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if os.path.exists(path):
        with open(path) as f:
            keep = [ln for ln in f if ln.strip() and json.loads(ln)["step"] <= step]
        with open(path, "w") as f:
            f.writelines(keep)


def resume(trainer: Any, log_skip: Any = print) -> Optional[str]:
    """Restore the newest complete checkpoint of ``trainer.run_dir``; returns its folder (None: no
    checkpoint, a fresh start). Each damaged or incomplete one skipped is reported through
    ``log_skip``; when folders exist but none is complete, one line names the damage."""
    path, skipped = checkpoints.newest_valid(trainer.run_dir)
    for folder, why in skipped:
        log_skip(f"WARNING: skipping checkpoint {os.path.basename(folder)}: {why}")
    if path is None:
        if skipped:
            from dispo_ray.infra.failures import RunError
            raise RunError(f"trainer.resume=true: no complete checkpoint under {trainer.run_dir}/checkpoints; "
                           f"newest: {skipped[0][1]}")
        return None
    restore(trainer, path)
    truncate_metrics(trainer.run_dir, trainer.step)
    return path
