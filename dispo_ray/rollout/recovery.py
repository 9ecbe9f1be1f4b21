"""Recovery from a lost learner rank (a preempted or crashed node, a killed process) inside the run.

When a step fails, :func:`dead_learner` asks every learner rank whether it is alive (a dead Ray
actor answers with ``ActorDiedError`` naming its pid, node and why it died). If one is dead,
:func:`recover_learners`:

    1. stops the rollout producer and drops every batch it queued or had in flight (they were
       sampled from weights the new group may not reproduce: the last checkpoint's are older);
    2. kills the rest of the old learner group (surviving ranks may sit in a collective with
       the dead one);
    3. the weight sync closes the generators' side of its group, adopts a new learner group built
       from the same model folder and forms a new sync group (``WeightSync.reconnect``);
    4. restores the newest complete checkpoint (:func:`~dispo_ray.rollout.checkpointing.restore`:
       learner files, step, data cursor, gate, guard, windows) and broadcasts its weights,
       publishing its version (``WeightSync.restore``), so every generator samples from it;
    5. starts a new producer at the restored step.

The steps after the checkpoint are redone (at most ``trainer.save_every``); their metrics lines
are dropped from metrics.jsonl, so each step is logged once. At most
``trainer.max_learner_restarts`` recoveries per run; then, or with no complete checkpoint, the run
ends with one line naming the rank, where it ran, why it died and the resume command.
"""
from __future__ import annotations

import re
import time
from typing import Any, Dict, Optional

from dispo_ray.infra.failures import RunError


def _field(text: str, name: str) -> Optional[str]:
    m = re.search(rf"\b{name}: (\S+)", text)
    return m.group(1) if m else None


def _cause(text: str) -> str:
    """Ray's reason for an actor death, shortened to its first sentence."""
    for marker in ("Worker exit detail: ", "The actor is dead because "):
        if marker in text:
            return text.split(marker, 1)[1].strip().splitlines()[0].split(". ")[0].rstrip(".")
    return "cause not reported"


def dead_learner(learners: Any, exc: Optional[BaseException] = None, probe_s: float = 15.0) -> Optional[str]:
    """None if every learner rank is alive; else one phrase: "learner rank R (pid P on IP) died: why"."""
    import ray
    from ray.exceptions import RayActorError

    actors = list(getattr(learners, "actors", []))
    if not actors:
        return None
    refs = [a.__ray_ready__.remote() for a in actors]
    ray.wait(refs, num_returns=len(refs), timeout=probe_s)  # a rank busy in a collective is alive
    for rank, ref in enumerate(refs):
        try:
            ray.get(ref, timeout=0)
        except RayActorError as e:
            text = str(e)
            pid, ip = _field(text, "pid"), _field(text, "ip")
            where = f" (pid {pid} on {ip})" if pid and ip else ""
            return f"learner rank {rank}{where} died: {_cause(text)}"
        except Exception:  # noqa: BLE001 - not ready in time (busy) or another error: not a death
            continue
    return None


def recover_learners(trainer: Any, what: str, log: Any) -> Dict[str, float]:
    """Rebuild the learner group and continue from the newest complete checkpoint (module docstring).
    ``what`` is :func:`dead_learner`'s phrase. Returns the event's numbers for the metrics."""
    from actors.learner_group import LearnerGroup
    from dispo_ray.infra import checkpoints
    from dispo_ray.infra.stop import resume_command
    from dispo_ray.rollout.checkpointing import restore, truncate_metrics

    tr, failed_at = trainer.cfg.trainer, trainer.step
    if trainer.learner_restarts >= tr.max_learner_restarts:
        raise RunError(f"{what} at step {failed_at}; trainer.max_learner_restarts={tr.max_learner_restarts} "
                       f"recoveries spent. Resume with: {resume_command(trainer.run_dir)}")
    path, skipped = checkpoints.newest_valid(trainer.run_dir)
    if path is None:
        hint = "trainer.save_every=0 saves only at the end" if tr.save_every == 0 else "none saved yet"
        raise RunError(f"{what} at step {failed_at}; no complete checkpoint to recover from ({hint}). "
                       f"Restart with: {resume_command(trainer.run_dir)}")
    t0 = time.perf_counter()
    log.message(f"WARNING {what} at step {failed_at}: rebuilding the learner group from {path}")
    trainer.producer.stop()
    trainer.learners.kill()
    trainer.learners = trainer.weight_sync.reconnect(lambda: LearnerGroup(trainer.cfg, trainer.model_dir))
    restore(trainer, path)
    truncate_metrics(trainer.run_dir, trainer.step)
    trainer.learner_restarts += 1
    trainer.start_producer()
    seconds = time.perf_counter() - t0
    redone = failed_at - trainer.step
    trainer.recoveries.append({"failed_at_step": failed_at, "restored_step": trainer.step, "steps_redone": redone,
                               "seconds": round(seconds, 1), "what": what})
    log.rewind(trainer.step)
    log.message(f"learner group rebuilt in {seconds:.1f} s: continuing from step {trainer.step} ({redone} steps "
                f"redone; recovery {trainer.learner_restarts} of trainer.max_learner_restarts={tr.max_learner_restarts})")
    return {"recovery/seconds": seconds, "recovery/steps_redone": float(redone)}
