"""The rollout side of the loop: a background thread that turns prompts into training batches,
in step order, each one admitted by the :class:`~dispo_ray.rollout.staleness.StalenessGate`.

For step ``s`` (once the gate admits it):

    prompts --generator pool--> G samples each (token ids, behaviour log-probs, version)
            --reward pool-----> reward, correct, reason
            --dynamic sampling: keep groups with mixed rewards; the first round draws
              ceil(trainer.prompts_per_step x trainer.oversample) prompts (DAPO's over-sampling:
              one engine call usually fills the batch), later rounds draw more while fewer than
              ``trainer.prompts_per_step`` groups are kept (at most ``trainer.max_resample_rounds``
              extra rounds); surplus groups are dropped, counted
            --> RolloutBatch(step, kept samples, all samples of the step, timings, counts)

Request seeds derive from ``(trainer.seed, step, round)``, so with ``max_staleness = 0`` a
resumed run samples exactly what the uninterrupted run sampled.
"""
from __future__ import annotations

import math
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from dispo_ray.algorithm.advantages import group_by_prompt, is_informative
from dispo_ray.sample import Sample
from dispo_ray.rollout.staleness import StalenessGate


@dataclass
class RolloutBatch:
    step: int
    samples: List[Sample]  # the groups kept for training, G samples each, grouped
    generated: List[Sample]  # every sample generated for this step (rollout metrics use these)
    cursor: Dict[str, int]  # data cursor before this step's first prompt was drawn
    counts: Dict[str, float] = field(default_factory=dict)
    seconds: Dict[str, float] = field(default_factory=dict)


def sampling_params(cfg: Any, seed: int) -> Dict[str, Any]:
    g = cfg.generator
    return {"temperature": g.temperature, "top_p": g.top_p, "max_new_tokens": g.max_new_tokens,
            "stop": list(g.stop), "seed": seed}


def request_seed(base: int, step: int, round_: int) -> int:
    return (base * 1_000_003 + step * 1009 + round_) % (2 ** 31 - 1)


def trim_to_multiple(groups: List[List[Sample]], group_size: int, multiple: int) -> List[List[Sample]]:
    """Largest prefix of groups whose sample count is divisible by ``multiple`` (ranks x minis)."""
    n = len(groups)
    while n > 0 and (n * group_size) % multiple:
        n -= 1
    return groups[:n]


class RolloutProducer:
    def __init__(self, cfg: Any, dataset: Any, generators: Any, rewards: Any, gate: StalenessGate,
                 start_step: int, total_steps: int):
        self.cfg, self.dataset, self.generators, self.rewards, self.gate = cfg, dataset, generators, rewards, gate
        self.next_step, self.total_steps = start_step, total_steps
        self._out: "queue.Queue[Any]" = queue.Queue()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._cursors: Dict[int, Dict[str, int]] = {}  # step -> data cursor before its first draw
        self.generating = threading.Event()  # set while a generate call is in flight (fault tests)
        self._thread = threading.Thread(target=self._run, name="rollout-producer", daemon=True)

    def start(self) -> "RolloutProducer":
        self._thread.start()
        return self

    def get(self, step: int, timeout: Optional[float] = None) -> RolloutBatch:
        item = self._out.get(timeout=timeout)
        if isinstance(item, BaseException):
            raise RuntimeError(f"rollout producer failed: {item}") from item
        if item.step != step:
            raise RuntimeError(f"rollout producer out of order: wanted step {step}, got {item.step}")
        return item

    def cursor_before(self, step: int) -> Dict[str, int]:
        """The data cursor as it was (or is, if not yet started) before ``step`` drew prompts."""
        with self._lock:
            return dict(self._cursors.get(step) or self.dataset.state_dict())

    def stop(self, wait: bool = True) -> None:
        """End the thread after its present call; ``wait=False`` (a stop signal) does not join it
        (a daemon thread: the pools' shutdown ends whatever it was waiting for)."""
        self._stop.set()
        self.gate.close()
        if wait:
            self._thread.join(timeout=600)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    # ------------------------------------------------------------------ thread body
    def _run(self) -> None:
        try:
            while not self._stop.is_set() and self.next_step < self.total_steps:
                if not self.gate.wait_admissible(self.next_step):
                    return
                self._out.put(self.collect(self.next_step))
                self.next_step += 1
        except BaseException as e:  # surfaced to the driver by get()
            self._out.put(e)

    def collect(self, step: int) -> RolloutBatch:
        cfg = self.cfg
        want, G = cfg.trainer.prompts_per_step, cfg.algorithm.group_size
        with self._lock:
            cursor = self._cursors[step] = self.dataset.state_dict()
            self._cursors.pop(step - 8, None)
        kept: List[List[Sample]] = []
        generated: List[Sample] = []
        counts = {"rollout/rounds": 0.0, "rollout/prompts": 0.0, "rollout/groups_dropped": 0.0,
                  "rollout/groups_surplus": 0.0}
        seconds = {"timing/generate": 0.0, "timing/reward": 0.0}
        for round_ in range(1 + cfg.trainer.max_resample_rounds):
            need = want - len(kept)
            if need <= 0:
                break
            if round_ == 0 and cfg.algorithm.dynamic_sampling:
                need = math.ceil(want * cfg.trainer.oversample)
            elif round_ > 0:  # ask for enough that, at the kept rate seen so far, the batch fills
                rate = max(len(kept) / max(len(generated) / G, 1.0), 0.125)
                need = min(math.ceil(need / rate), 4 * want)
            prompts = self.dataset.next_batch(need)
            t0 = time.perf_counter()
            self.generating.set()
            try:
                samples = self.generators.generate(prompts, G, sampling_params(cfg, request_seed(cfg.trainer.seed, step, round_)))
            finally:
                self.generating.clear()
            t1 = time.perf_counter()
            counts["rollout/prompts"] += len(prompts)
            self.rewards.score_samples(samples)
            seconds["timing/generate"] += t1 - t0
            seconds["timing/reward"] += time.perf_counter() - t1
            generated.extend(samples)
            counts["rollout/rounds"] += 1
            for group in group_by_prompt(samples).values():
                if not cfg.algorithm.dynamic_sampling or is_informative(group):
                    kept.append(group)
                else:
                    counts["rollout/groups_dropped"] += 1
            if not cfg.algorithm.dynamic_sampling:
                break
        counts["rollout/groups_surplus"] = float(max(len(kept) - want, 0))
        kept = trim_to_multiple(kept[:want], G, cfg.learner.num_actors * cfg.learner.mini_batches)
        counts["rollout/groups_kept"] = float(len(kept))
        counts["rollout/short_batch"] = float(len(kept) < want)
        return RolloutBatch(step=step, samples=[s for g in kept for s in g], generated=generated,
                            cursor=cursor, counts=counts, seconds=seconds)
