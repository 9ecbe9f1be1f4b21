"""Streaming rollouts (``trainer.rollout_mode=stream``): :class:`StreamingProducer`.

The batch producer (:mod:`dispo_ray.rollout.producer`) hands a round of prompts to one
``generate()`` and waits for its slowest sample before scoring anything. Here every generator's
engine is driven request by request (``actors.streaming.EngineLoop``) and this thread

* keeps prompt groups in flight: as groups finish, new ones are submitted, up to what the step
  being filled still needs (below), at most ``generator.max_inflight_groups`` per actor; and once
  that step only waits for its last groups (the tail) and the next step's gate is open, each group
  that finishes is replaced by one for the next step, so the engines do not drain (never more in
  flight than one step's draw, never more drawn ahead than the next step needs);
* scores each finished group at once (the reward pool works while the engines decode), and
  applies dynamic sampling to it (kept, or dropped and counted);
* forms step ``s``'s batch from finished groups, oldest version first, then draw order.

**Per-sample staleness.** A group's version is its oldest token's (a weight sync may land while
it decodes, ``generator.partial_rollout``). A group of version ``v`` may train at step ``s`` only
if ``0 <= s - v <= k`` (``k = trainer.max_staleness``), as in batch mode, and the driver asserts it
per sample. Groups are submitted only while the gate admits the step being filled (published
``V >= s - k``), so ``v >= s - k`` for every group submitted for ``s``; enough are submitted to
fill step ``s`` at the kept rate seen so far (groups left over carry to the next step).

**What step s waits for.** A group of version ``v <= s - k`` can train at step ``s`` and never
later, so the batch is formed only once no such group is still decoding, however long it takes
(choosing among the finished ones would select for short responses; the engines meanwhile decode
younger groups), and ``trainer.prompts_per_step`` groups are ready; with ``k = 0`` this is the
whole round, as in batch mode. The oldest come first, in draw order. Finished groups too old for
the next step are dropped as surplus (as batch mode drops a round's surplus); younger ones carry over.
With ``k = 0`` new groups are submitted only when none is in flight (rounds), so a step's
prompts and per-sample seeds are deterministic and a resumed run samples what the uninterrupted
run sampled. Dynamic sampling's cap: at most ``(1 + trainer.max_resample_rounds) x
ceil(prompts_per_step x oversample)`` groups are drawn while one step fills; then a short batch.

**Checkpoints lose and repeat nothing.** The data cursor recorded before step ``s`` (what a
checkpoint after ``s`` steps stores) re-queues every group that was in flight or ready but not yet
trained at that moment, and rewinds past everything drawn after it, so a resumed run trains every
prompt it had drawn exactly once. A generator that dies mid-stream has its groups re-submitted by
the pool (``actors.stream_router``).
"""
from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass
from collections import deque
from typing import Any, Deque, Dict, List, Optional, Tuple

from actors.backends.base import SamplingSpec
from actors.streaming import GroupRequest
from dispo_ray.algorithm.advantages import is_informative
from dispo_ray.rollout.producer import RolloutBatch, RolloutProducer, request_seed, sampling_params, trim_to_multiple
from dispo_ray.sample import Sample

ROLLOUT_MODES = ("batch", "stream")  # trainer.rollout_mode's choices
POLL_S = 0.2
RATE_WINDOW = 64  # finished groups the kept rate is measured over


@dataclass
class Group:
    gid: str
    record: Any
    draw: int  # global draw order
    version: int  # submitted at this published version; once finished: its oldest token's
    samples: Optional[List[Sample]] = None


class StreamingProducer(RolloutProducer):
    """Same contract as :class:`RolloutProducer` (``get(step)``, ``cursor_before``, ``stop``)."""

    def __init__(self, *args: Any, **kw: Any):
        super().__init__(*args, **kw)
        self.router = self.generators.stream
        self.inflight: Dict[str, Group] = {}
        self.ready: List[Group] = []  # finished, scored, kept by dynamic sampling; not yet trained
        self.draws = 0
        self.tag = uuid.uuid4().hex[:6]  # group ids stay unique across producers (resume, rollback)
        self._step_draws: Dict[int, int] = {}  # step -> groups drawn while it filled (seeds)
        cfg = self.cfg
        self.outcomes: Deque[bool] = deque(maxlen=RATE_WINDOW)  # kept? for the last finished groups
        per_actor = int(cfg.generator.max_inflight_groups) or 4 * int(cfg.trainer.prompts_per_step)
        self.max_inflight = per_actor * int(cfg.generator.num_actors)

    def _run(self) -> None:
        try:
            while not self._stop.is_set() and self.next_step < self.total_steps:
                batch = self.fill(self.next_step)
                if batch is None:
                    return
                self._out.put(batch)
                self.next_step += 1
        except BaseException as e:  # surfaced to the driver by get()
            self._out.put(e)
        finally:
            try:
                self.router.abort_all()  # nothing of this producer keeps decoding
            except Exception:  # noqa: BLE001 - the pools may be shutting down
                pass

    def cursor_before(self, step: int) -> Dict[str, Any]:
        """The data cursor a checkpoint taken before ``step`` restores: everything drawn and not
        yet trained is re-queued (see the module docstring)."""
        with self._lock:
            if step in self._cursors:
                return dict(self._cursors[step])
            return self.dataset.state_dict(requeue=self._carry())

    def _carry(self) -> List[Any]:
        return [g.record for g in sorted([*self.inflight.values(), *self.ready], key=lambda g: g.draw)]

    # ------------------------------------------------------------------ one step
    def fill(self, step: int) -> Optional[RolloutBatch]:
        cfg, k = self.cfg, self.cfg.trainer.max_staleness
        want, G = cfg.trainer.prompts_per_step, cfg.algorithm.group_size
        with self._lock:  # what a checkpoint taken after step - 1 restores: carry what is not trained
            cursor = self._cursors[step] = self.dataset.state_dict(requeue=self._carry())
            self._cursors.pop(step - 8, None)
        counts = {"rollout/rounds": 0.0, "rollout/prompts": 0.0, "rollout/prompts_ahead": 0.0, "rollout/groups_dropped": 0.0,
                  "rollout/groups_surplus": 0.0, "rollout/groups_requeued": float(self.router.requeued)}
        generated: List[Sample] = []
        t0, reward_s = time.perf_counter(), 0.0
        cap = (1 + cfg.trainer.max_resample_rounds) * math.ceil(want * cfg.trainer.oversample)
        drawn = self.draws_this_step(step)  # some may have been drawn ahead, while step - 1 filled
        while True:
            if self._stop.is_set():
                return None
            # a group that can train at this step and never later is waited for, however long it
            # decodes: choosing among the finished ones would select for short responses
            waiting_old = any(g.version <= step - k for g in self.inflight.values())
            if len(self.ready) >= want and not waiting_old:
                break
            if self.gate.admissible(step) and drawn < cap and (k > 0 or not self.inflight):
                n = self._top_up(step, want, cap - drawn)
                drawn += n
                counts["rollout/rounds"] += float(n > 0)
                counts["rollout/prompts"] += n
            counts["rollout/prompts_ahead"] += self._top_up_ahead(step + 1, want, cap)
            if not self.inflight:
                if drawn >= cap or (not cfg.algorithm.dynamic_sampling and drawn >= want):
                    break  # a short batch: the draw cap is spent
                if not self.gate.admissible(step):
                    self.gate.wait_admissible(step, timeout=0.5)
                continue
            self.generating.set()
            finished = self.router.collect(POLL_S)
            if finished:
                reward_s += self._score(finished, generated, counts)
        self.generating.clear()
        self._step_draws.pop(step, None)
        batch = self._form(step, want, G, counts)
        seconds = {"timing/generate": time.perf_counter() - t0 - reward_s, "timing/reward": reward_s}
        return RolloutBatch(step=step, samples=batch, generated=generated, cursor=cursor, counts=counts, seconds=seconds)

    def _top_up(self, step: int, want: int, budget: int) -> int:
        """Submit what the step being filled still needs at the kept rate seen so far, counting the
        groups in flight; returns how many groups. (Filling the later steps the published version
        admits as well, ``V + k - s + 1`` of them, made ``k = 1`` bursty: the next batch was ready
        early, then the producer idled until the next version: 0.44x of batch mode's steps/s on the
        demo against 0.74x without, 0.97x against 1.02x on the long tail; bench_streaming --quick,
        2026-12-06.)"""
        cfg, k = self.cfg, self.cfg.trainer.max_staleness
        target = math.ceil((want - len(self.ready)) / max(self.kept_rate(), 0.125))
        if k == 0 and self.draws_this_step(step) == 0 and cfg.algorithm.dynamic_sampling:
            target = math.ceil(want * cfg.trainer.oversample) - len(self.ready)  # DAPO's first round
        n = min(target - len(self.inflight), self.max_inflight - len(self.inflight), budget)
        return self._submit(step, n) if n > 0 else 0

    def _submit(self, step: int, n: int) -> int:
        """Draw ``n`` prompts for ``step`` (their seeds count that step's draws) and submit them."""
        cfg, version = self.cfg, self.gate.version
        groups = []
        for rec in self.dataset.next_batch(n):
            seed = request_seed(cfg.trainer.seed, step, self._step_draws.get(step, 0))
            self._step_draws[step] = self._step_draws.get(step, 0) + 1
            spec = SamplingSpec.from_config(cfg.generator, sampling_params(cfg, seed))
            gid = f"{self.tag}-s{step}d{self.draws}"
            groups.append(GroupRequest(gid, rec, cfg.algorithm.group_size, spec))
            self.inflight[gid] = Group(gid, rec, self.draws, version)
            self.draws += 1
        self.router.submit(groups)
        return n

    def _top_up_ahead(self, step: int, want: int, cap: int) -> int:
        """While the step before ``step`` waits for its last groups (the tail), replace each group
        that finished with one for ``step``, so the engines stay as full as one step's draw keeps
        them instead of draining (``step``'s gate is open: these groups are young enough for it).
        Never more than ``step`` itself will need, so nothing is drawn that would go stale; nothing
        at ``k = 0`` (rounds), past the last step, or before ``step``'s gate opens."""
        if self.cfg.trainer.max_staleness == 0 or step >= self.total_steps or not self.gate.admissible(step):
            return 0
        full = math.ceil(want / max(self.kept_rate(), 0.125))
        ahead = self.draws_this_step(step)
        n = min(full - len(self.inflight), full - ahead, cap - ahead, self.max_inflight - len(self.inflight))
        return self._submit(step, n) if n > 0 else 0

    def draws_this_step(self, step: int) -> int:
        return self._step_draws.get(step, 0)

    def _score(self, finished: List[Tuple[str, List[Sample]]], generated: List[Sample], counts: Dict[str, float]) -> float:
        """Reward the finished groups (the engines keep decoding meanwhile), then dynamic sampling."""
        t0 = time.perf_counter()
        samples = [s for _, group in finished for s in group]
        self.rewards.score_samples(samples)
        generated.extend(samples)
        for gid, group in finished:
            g = self.inflight.pop(gid)
            g.samples, g.version = group, min(s.version for s in group)
            keep = not self.cfg.algorithm.dynamic_sampling or is_informative(group)
            self.outcomes.append(keep)
            if keep:
                self.ready.append(g)
            else:
                counts["rollout/groups_dropped"] += 1
        return time.perf_counter() - t0

    def kept_rate(self) -> float:
        """The share of finished groups dynamic sampling kept, over the last ``RATE_WINDOW``
        (before any: ``1 / trainer.oversample``, the rate DAPO's over-sampling assumes)."""
        if not self.cfg.algorithm.dynamic_sampling:
            return 1.0
        if not self.outcomes:
            return 1.0 / self.cfg.trainer.oversample
        return sum(self.outcomes) / len(self.outcomes)

    def _form(self, step: int, want: int, G: int, counts: Dict[str, float]) -> List[Sample]:
        k = self.cfg.trainer.max_staleness
        usable = sorted((g for g in self.ready if g.version >= step - k), key=lambda g: (g.version, g.draw))
        chosen = usable[:want]
        chosen = trim_to_multiple([g.samples for g in chosen], G, self.cfg.learner.num_actors * self.cfg.learner.mini_batches)
        taken = {id(x) for x in chosen}
        rest = [g for g in self.ready if id(g.samples) not in taken]
        # what cannot train at the next step is surplus (with k = 0: everything left)
        self.ready = [g for g in rest if g.version >= step + 1 - k]
        counts["rollout/groups_surplus"] += len(rest) - len(self.ready)
        counts["rollout/groups_kept"] = float(len(chosen))
        counts["rollout/short_batch"] = float(len(chosen) < want)
        counts["rollout/groups_carried"] = float(len(self.ready) + len(self.inflight))
        return [s for g in chosen for s in g]
