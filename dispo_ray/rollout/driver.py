"""The training loop, as the data flow of DESIGN.md reads:

    dataset -> generator pool (G samples/prompt, behaviour log-probs, version)
            -> reward pool (reward, correct, reason)
            -> group advantages, dynamic sampling, staleness admission     [RolloutProducer thread]
            -> learner group: DISPO step(s) -> metrics                      [this thread]
            -> publish: weight broadcast learner rank 0 -> generators: version + 1  [WeightSync]
            -> evaluation, logging, collapse guard, checkpoint

With ``trainer.max_staleness = 0`` the producer waits for each new version (synchronous,
on-policy). With ``k > 0`` it generates up to ``k`` batches ahead while the learner trains.
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Callable, Dict, List, Optional

from dispo_ray.algorithm import metric_keys as K
from dispo_ray.algorithm.advantages import assign_advantages
from dispo_ray.algorithm.windows import LossWindows
from dispo_ray.infra.config import RootConfig, to_dict
from dispo_ray.infra.stop import STOP
from dispo_ray.rollout.samples import collate
from dispo_ray.rollout.startup import StartupClock, init_ray, seed_everything, start_concurrently


def rollout_metrics(batch: Any) -> Dict[str, float]:
    from dispo_ray.algorithm.text_metrics import repetition_rate

    gen = batch.generated
    n = max(len(gen), 1)
    out = {
        K.ROLLOUT_REWARD: sum(s.reward for s in gen) / n,
        K.ROLLOUT_ACCURACY: sum(s.correct for s in gen) / n,
        K.ROLLOUT_RESPONSE_LENGTH: sum(s.response_length for s in gen) / n,
        K.ROLLOUT_TRUNCATED_FRAC: sum(s.finish_reason == "length" for s in gen) / n,
        K.ROLLOUT_REPETITION: repetition_rate([s.response_token_ids for s in gen]),
        K.ROLLOUT_SAMPLES: float(len(gen)),
        K.ROLLOUT_TRAIN_SAMPLES: float(len(batch.samples)),
        K.ROLLOUT_MULTI_VERSION_FRAC: sum(len(s.version_spans) > 1 for s in gen) / n,
        "perf/generated_tokens": float(sum(s.response_length for s in gen)),
    }
    reasons: Dict[str, int] = {}
    for s in gen:
        reasons[s.reason] = reasons.get(s.reason, 0) + 1
    out.update({f"reward/reason_{k}": v / n for k, v in reasons.items() if k})
    return {**out, **batch.counts, **batch.seconds}


class Trainer:
    """Owns the actors and the run state; ``fit()`` is the loop. The published weight version is
    the weight sync's (``self.weight_sync.version``, :mod:`dispo_ray.sync.coordinator`)."""

    def __init__(self, cfg: RootConfig, handle_signals: bool = False,
                 metrics_hook: Optional[Callable[[Any, Dict[str, float]], None]] = None):
        """``metrics_hook(batch, metrics)``, when given, runs on every step's metrics once the
        batch's rollout metrics are in and before the update, the collapse guard and the adaptive
        windows read them; it may change ``metrics`` in place (the tests inject a collapse signal
        into a real run this way)."""
        from actors.generator import GeneratorPool
        from actors.learner_group import LearnerGroup
        from actors.reward_pool import RewardPool
        from dispo_ray.data.records import PromptDataset, data_files
        from dispo_ray.rollout.staleness import StalenessGate
        from dispo_ray.sync.coordinator import WeightSync
        from dispo_ray.tiny.warmstart import warm_started_model_dir
        from transformers import AutoTokenizer

        self.cfg, tr = cfg, cfg.trainer
        self.metrics_hook = metrics_hook
        self.windows = LossWindows(cfg.algorithm)  # DISPO's windows in force, sent with every batch
        self.run_dir = os.path.abspath(tr.run_dir)
        os.makedirs(self.run_dir, exist_ok=True)
        with open(os.path.join(self.run_dir, "config.json"), "w") as f:
            json.dump(to_dict(cfg), f, indent=1)
        seed_everything(tr.seed)
        self.startup = clock = StartupClock()
        with clock.phase("warm_start"):
            self.model_dir = warm_started_model_dir(cfg)
        with clock.phase("data"):
            self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
            train_files, val_files = data_files(cfg)
            self.train_set = PromptDataset.from_files(train_files, self.tokenizer, cfg.data, seed=tr.seed)
            self.eval_sets = {"eval": PromptDataset.from_files(val_files, self.tokenizer, cfg.data, shuffle=False)}
            for path in cfg.data.extra_eval_files:
                name = "eval_" + os.path.splitext(os.path.basename(path))[0]
                self.eval_sets[name] = PromptDataset.from_files([path], self.tokenizer, cfg.data, shuffle=False)
        with clock.phase("ray"):
            init_ray(cfg)
            if handle_signals:  # again after ray.init: Ray's own SIGTERM handler in the driver aborts
                STOP.install()
        pools = start_concurrently({
            "rewards": lambda: RewardPool(cfg.reward, max_new_tokens=cfg.generator.max_new_tokens),
            "generators": lambda: GeneratorPool(cfg, self.model_dir),
            "learners": lambda: LearnerGroup(cfg, self.model_dir),
        }, clock, on_failure=lambda pool: pool.shutdown())
        self.rewards, self.generators, self.learners = pools["rewards"], pools["generators"], pools["learners"]
        # the weight sync's one owner; it also re-syncs a generator Ray restarted (the pool asks it)
        self.weight_sync = WeightSync(cfg, self.learners, self.generators)
        with clock.phase("sync_group"):
            self.weight_sync.connect()
        print(clock.finish(), flush=True)
        self.step = 0
        self.gate = StalenessGate(tr.max_staleness, self.weight_sync)
        self.learner_restarts, self.recoveries = 0, []

    # ------------------------------------------------------------------ pieces of one step

    def train_on(self, batch: Any) -> Dict[str, float]:
        samples = batch.samples
        metrics = self.gate.check_and_record(batch.step, [s.version for s in samples])
        if not samples:
            return {**metrics, "actor/skipped": 1.0}
        a = self.cfg.algorithm
        assign_advantages(samples, norm_by_std=a.norm_adv_by_std, eps=a.adv_eps)
        tensors = collate(samples, pad_token_id=self.tokenizer.pad_token_id)
        t0 = time.perf_counter()
        metrics.update(self.learners.train_step(tensors, self.windows.in_force()))  # the windows travel with it
        metrics["timing/train"] = time.perf_counter() - t0
        metrics["perf/train_tokens"] = float(tensors["attention_mask"].sum())
        return metrics

    def evaluate(self) -> Dict[str, float]:
        from dispo_ray.rollout.evaluation import avg_and_pass_at_k

        tr, out = self.cfg.trainer, {}
        t0 = time.perf_counter()
        greedy = tr.eval_greedy
        sampling = {"temperature": 0.0 if greedy else self.cfg.generator.temperature,
                    "top_p": 1.0 if greedy else self.cfg.generator.top_p,
                    "max_new_tokens": self.cfg.generator.max_new_tokens, "stop": list(self.cfg.generator.stop),
                    "seed": tr.seed + 7}
        for name, ds in self.eval_sets.items():
            prompts = list(ds)[:tr.eval_max_prompts]
            samples = self.generators.generate(prompts, 1 if greedy else tr.eval_k, sampling)
            self.rewards.score_samples(samples)
            out.update(avg_and_pass_at_k(samples, prefix=name))
        out["timing/eval"] = time.perf_counter() - t0
        return out

    # ------------------------------------------------------------------ checkpoint / resume
    def driver_state(self, cursor: Dict[str, int]) -> Dict[str, Any]:
        return {"step": self.step, "version": self.weight_sync.version, "cursor": cursor, "gate": self.gate.state_dict(),
                "guard": self.guard.state_dict(), "windows": self.windows.state_dict()}

    def start_producer(self) -> None:
        """The rollout thread, from the present step (start, resume, rollback, recovery)."""
        from dispo_ray.rollout.producer import RolloutProducer
        from dispo_ray.rollout.streaming import StreamingProducer

        tr = self.cfg.trainer
        kind = StreamingProducer if tr.rollout_mode == "stream" else RolloutProducer
        self.producer = kind(self.cfg, self.train_set, self.generators, self.rewards, self.gate,
                             start_step=self.step, total_steps=tr.total_steps).start()

    def next_batch(self) -> Optional[Any]:
        """The producer's batch for this step, or None once a stop signal arrived while waiting."""
        import queue

        while not STOP.requested:
            try:
                return self.producer.get(self.step, timeout=0.5)
            except queue.Empty:
                continue
        return None

    # ------------------------------------------------------------------ the loop
    def fit(self) -> Dict[str, Any]:
        from dispo_ray.algorithm.adaptive_windows import AdaptiveWindows
        from dispo_ray.algorithm.collapse_guard import CollapseGuard
        from dispo_ray.infra.metrics_log import MetricsLogger
        from dispo_ray.infra.run_state import checkpoint_dir
        from dispo_ray.rollout.checkpointing import resume, save
        from dispo_ray.rollout.rollback import after_step, roll_back

        cfg, tr = self.cfg, self.cfg.trainer
        self.guard = CollapseGuard(tr.collapse_guard, tr.max_staleness)
        aw = cfg.algorithm.adaptive_windows
        self.controller = AdaptiveWindows(aw, self.windows.configured, self.windows.limits) if aw.enabled else None
        resumed = bool(tr.resume and resume(self, lambda line: print(line, flush=True)))
        log = MetricsLogger(self.run_dir, tr.total_steps, tr.tensorboard, tr.wandb_project, tr.progress_bar,
                            config=to_dict(cfg), start_step=self.step)
        if resumed:
            log.message(f"resumed from step {self.step} (version {self.weight_sync.version})")
        first_eval: Optional[float] = None
        last_eval: Dict[str, float] = {}
        stopped_by_guard, self.stopped_by, checkpoint = False, None, None
        self.producer = None
        try:
            if not resumed:
                self.warn_if_disk_small(log)
                last_eval = self.evaluate()  # before the rollouts start: the same engine calls in every mode
                first_eval = last_eval.get(K.EVAL_ACCURACY)
                log.log(0, last_eval, advance=False)  # step 0: before any update
                if tr.collapse_guard.action == "rollback":  # a collapse from the first steps on can return here
                    save(self)
            self.start_producer()
            while self.step < tr.total_steps and not STOP.requested:
                t_step = time.perf_counter()
                batch = self.next_batch()
                if batch is None:  # a stop signal while waiting: the rollout is abandoned
                    break
                metrics = {"timing/wait_rollout": time.perf_counter() - t_step, **rollout_metrics(batch)}
                if self.metrics_hook is not None:
                    self.metrics_hook(batch, metrics)
                if not self.survive_learner_loss(lambda: self.train_and_publish(batch, metrics), log):
                    continue  # a learner rank was lost: the group was rebuilt from the last checkpoint
                self.step += 1
                metrics["version"] = float(self.weight_sync.version)
                # The step's own time (rollout wait, train, sync); evaluation is timing/eval.
                metrics["timing/step"] = time.perf_counter() - t_step
                metrics[K.PERF_TOKENS_PER_S] = metrics.get("perf/train_tokens", 0.0) / metrics["timing/step"]
                metrics[K.PERF_GENERATED_TOKENS_PER_S] = metrics["perf/generated_tokens"] / metrics["timing/step"]
                if (tr.eval_every and self.step % tr.eval_every == 0) or self.step == tr.total_steps:
                    last_eval = self.evaluate()
                    metrics.update(last_eval)
                response = after_step(self, metrics, log)  # guard, windows: dispo_ray/rollout/rollback.py
                log.log(self.step, metrics)  # step N: after N updates
                if response is not None and response.action == "rollback":
                    roll_back(self, response.restored_step)
                    log.rewind(self.step)
                    continue
                stopped_by_guard = response is not None and response.action == "stop"
                if (tr.save_every and self.step % tr.save_every == 0) or self.step == tr.total_steps or stopped_by_guard:
                    saved: List[str] = []
                    if not self.survive_learner_loss(lambda: saved.append(save(self)), log):
                        continue
                    checkpoint = saved[0]
                if stopped_by_guard:
                    log.message(f"stopping at step {self.step}: collapse guard triggered (checkpoint saved)")
                    break
            if STOP.requested:
                self.stopped_by = STOP.name
                if tr.save_on_stop and self.step > 0 and checkpoint != checkpoint_dir(self.run_dir, self.step):
                    checkpoint = save(self)  # unless this very step was just saved
            elif self.step == tr.total_steps and tr.export_final:
                self.learners.export_hf(os.path.join(self.run_dir, "final_hf"))
        finally:
            if self.producer is not None:
                self.producer.stop(wait=not STOP.requested)  # a signal: never wait for a rollout in flight
            log.close()
        summary = {"run_dir": self.run_dir, "steps": self.step, "version": self.weight_sync.version,
                   "first_eval_accuracy": first_eval, "last_eval_accuracy": last_eval.get(K.EVAL_ACCURACY),
                   "collapse_events": self.guard.events, "stopped_by_collapse_guard": stopped_by_guard,
                   "rollbacks": self.guard.rollbacks, "windows": self.windows.state_dict(),
                   "startup_seconds": dict(self.startup.seconds), "stopped_by_signal": self.stopped_by,
                   "checkpoint": checkpoint if self.stopped_by else None, "learner_recoveries": self.recoveries}
        with open(os.path.join(self.run_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        return summary

    def train_and_publish(self, batch: Any, metrics: Dict[str, float]) -> None:
        """Train on the batch, then publish the result: one unit under the weight sync's lock, so a
        re-sync for a restarted generator never sends half-updated weights."""
        with self.weight_sync.lock:
            metrics.update(self.train_on(batch))
            metrics["timing/sync"] = self.weight_sync.publish(self.step + 1)

    def survive_learner_loss(self, work: Any, log: Any) -> bool:
        """Run ``work()``; True if it succeeded. False when a learner rank died during it and the
        run went back to its last checkpoint (:mod:`dispo_ray.rollout.recovery`); other errors raise."""
        from dispo_ray.rollout.recovery import dead_learner, recover_learners

        try:
            work()
            return True
        except Exception as e:  # noqa: BLE001 - only a lost learner rank is recovered here
            what = dead_learner(self.learners, e)
            if what is None:
                raise
            recover_learners(self, what, log)
            return False

    def warn_if_disk_small(self, log: Any) -> None:
        from dispo_ray.infra.checkpoints import estimate_bytes, space_warning

        if self.cfg.trainer.save_every or self.cfg.trainer.save_on_stop:
            line = space_warning(self.run_dir, estimate_bytes(self.run_dir, self.learners.num_params))
            if line:
                log.message(line)

    def shutdown(self) -> None:
        for part in ("generators", "learners", "rewards"):
            obj = getattr(self, part, None)
            if obj is not None and hasattr(obj, "shutdown"):
                obj.shutdown()


def run(cfg: RootConfig) -> Dict[str, Any]:
    STOP.install()  # before the pools start; installed again after ray.init
    trainer = Trainer(cfg, handle_signals=True)
    try:
        summary = trainer.fit()
        if summary["stopped_by_signal"]:  # said before the pools shut down: the grace period may end there
            print(stop_line(summary, cfg.trainer.save_on_stop), file=sys.stderr, flush=True)
            return summary
    finally:
        trainer.shutdown()
    first, last = summary["first_eval_accuracy"], summary["last_eval_accuracy"]
    fmt = lambda v: "n/a" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    print(f"\ndone: {summary['steps']} steps, eval accuracy {fmt(first)} -> {fmt(last)}, "
          f"collapse events {len(summary['collapse_events'])}\nrun dir: {summary['run_dir']}")
    return summary


def stop_line(summary: Dict[str, Any], save_on_stop: bool) -> str:
    from dispo_ray.infra.stop import resume_command

    if summary["checkpoint"]:
        saved = f"checkpoint saved at {summary['checkpoint']}"
    else:
        saved = "no checkpoint saved (" + ("trainer.save_on_stop=false" if not save_on_stop else "no step finished") + ")"
    return (f"stopped by {summary['stopped_by_signal']} at step {summary['steps']}: {saved}; "
            f"resume with: {resume_command(summary['run_dir'])}")
