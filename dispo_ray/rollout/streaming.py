"""Streaming rollouts (``trainer.rollout_mode=stream``): :class:`StreamingProducer`.

The batch producer (:mod:`dispo_ray.rollout.producer`) hands a round of prompts to one
``generate()`` and waits for its slowest sample before scoring anything. Here every generator's
engine is driven request by request (``actors.streaming.EngineLoop``) and this thread

* keeps prompt groups in flight: as groups finish, new ones are submitted, up to what the step
  being filled still needs (below), at most ``generator.max_inflight_groups`` per actor; and once
  that step only waits for its last groups (the tail) and the next step's gate is open, each group
  that finishes is replaced by one for the next step, so the engines do not drain (never more in
  flight than one step's draw, never more drawn ahead than the next step needs);
* hands each batch of finished groups to the reward pool at once, in a scoring thread, and goes on
  submitting and collecting while it is scored (slots freed on the engines are refilled without
  waiting for the verdicts); a scored group then meets dynamic sampling (kept, or dropped and
  counted);
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
from concurrent.futures import Future, ThreadPoolExecutor, wait as wait_futures
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
SCORED_POLL_S = 0.02  # the collect wait while groups are being scored, so a verdict is seen soon
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
        # finished groups being scored, oldest first; they stay in ``inflight`` (not trained, and
        # carried by a checkpoint) until their verdicts are in
        self.scoring: Deque[Tuple[Future, List[Tuple[str, List[Sample]]]]] = deque()
        self._scorer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stream-scorer")

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
            self._scorer.shutdown(wait=False, cancel_futures=True)
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
        t0, timing = time.perf_counter(), {"reward_s": 0.0, "blocked_s": 0.0}
        cap = (1 + cfg.trainer.max_resample_rounds) * math.ceil(want * cfg.trainer.oversample)
        drawn = self.draws_this_step(step)  # some may have been drawn ahead, while step - 1 filled
        while True:
            if self._stop.is_set():
                return None
            self._absorb_scored(generated, counts, timing)
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
            if self.on_engines() == 0:  # only verdicts to wait for
                t1 = time.perf_counter()
                wait_futures([self.scoring[0][0]], timeout=POLL_S)
                timing["blocked_s"] += time.perf_counter() - t1
                continue
            finished = self.router.collect(SCORED_POLL_S if self.scoring else POLL_S)
            if finished:
                self._score(finished)
        self.generating.clear()
        self._step_draws.pop(step, None)
        batch = self._form(step, want, G, counts)
        # timing/reward: the pool's seconds on the groups scored while this step filled, mostly
        # overlapping the decoding; timing/generate: the rest of the fill (less the waits on verdicts alone)
        seconds = {"timing/generate": time.perf_counter() - t0 - timing["blocked_s"], "timing/reward": timing["reward_s"]}
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
        # groups being scored count towards the target (their verdicts are pending), not the engines' load
        n = min(target - len(self.inflight), self.max_inflight - self.on_engines(), budget)
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
        ahead, busy = self.draws_this_step(step), self.on_engines()
        n = min(full - busy, full - ahead, cap - ahead, self.max_inflight - busy)
        return self._submit(step, n) if n > 0 else 0

    def draws_this_step(self, step: int) -> int:
        return self._step_draws.get(step, 0)

    def on_engines(self) -> int:
        """Groups submitted and not yet finished (``inflight`` less those being scored)."""
        return len(self.inflight) - sum(len(finished) for _, finished in self.scoring)

    def _score(self, finished: List[Tuple[str, List[Sample]]]) -> None:
        """Hand finished groups to the scoring thread; each takes its oldest token's version now (what
        the wait for old groups looks at) and stays in flight until its verdicts are in."""
        for gid, group in finished:
            g = self.inflight[gid]
            g.samples, g.version = group, min(s.version for s in group)
        samples = [s for _, group in finished for s in group]
        self.scoring.append((self._scorer.submit(self._timed_score, samples), finished))

    def _timed_score(self, samples: List[Sample]) -> float:
        t0 = time.perf_counter()
        self.rewards.score_samples(samples)
        return time.perf_counter() - t0

    def _absorb_scored(self, generated: List[Sample], counts: Dict[str, float], timing: Dict[str, float]) -> None:
        """Groups whose verdicts are in, oldest first: dynamic sampling keeps or drops each (a scoring
        error is raised here, in the producer thread)."""
        while self.scoring and self.scoring[0][0].done():
            future, finished = self.scoring.popleft()
            timing["reward_s"] += future.result()
            for gid, group in finished:
                g = self.inflight.pop(gid)
                generated.extend(group)
                keep = not self.cfg.algorithm.dynamic_sampling or is_informative(group)
                self.outcomes.append(keep)
                if keep:
                    self.ready.append(g)
                else:
                    counts["rollout/groups_dropped"] += 1

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
