"""Generator actors and the pool the driver holds.

:class:`GeneratorActor` (a Ray actor) wraps one backend (``vllm`` or ``hf``, see
``actors.backends``) and owns everything backends share: turning prompt records into
:class:`~dispo_ray.rollout.samples.Sample` s (n per prompt, grouped and in sample order), the weight
``version`` that tags them, the weight-sync calls, and load accounting. Every engine call goes
through the actor's :class:`~actors.streaming.EngineLoop`: calls run concurrently (a weight sync or
an abort must reach a streaming engine between two steps), and a batch ``generate`` holds the
engine for its whole call, so every sample of it carries the single version that drew it.

:class:`GeneratorPool` starts ``generator.num_actors`` actors, splits each request across them
in contiguous chunks (results come back in prompt order), reports per-actor load, and handles a
dead actor: Ray restarts it (``max_restarts``), the pool waits for it, flags it as needing a
weight sync (it came back with the initial weights, version 0), asks its ``weight_sync`` owner
(:class:`dispo_ray.sync.coordinator.WeightSync`, attached when it forms the group) to re-form the
group and re-broadcast the published version, and re-issues the failed chunk (on a healthy, in-sync
actor when there is one). The pool owns no version: the published one is the owner's, what each
actor holds is :meth:`GeneratorPool.versions`.

On GPU clusters each actor gets its own placement group of ``tensor_parallel_size`` bundles of one
GPU, ``STRICT_PACK`` so a tensor-parallel group never spans nodes; vLLM's Ray executor places its
TP workers in that group.
"""
from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from typing import Any, Dict, List, Optional, Protocol, Sequence, Tuple

from actors.backends import BACKENDS
from actors.backends.base import SamplingSpec
from actors.stream_router import StreamRouter
from actors.streaming import EngineLoop, GroupRequest
from dispo_ray.data.records import PromptRecord
from dispo_ray.infra.failures import engine_root_cause, log_offset
from dispo_ray.infra.placement import pin, wait_for_node_resource
from dispo_ray.sample import Sample
from dispo_ray.sync.settings import SyncSettings

log = logging.getLogger(__name__)
MAX_RESTARTS = 3


def make_backend(cfg: Any, model_path: str, index: int = 0):
    """The backend named by ``generator.backend`` over the HF folder ``model_path``; actor
    ``index`` samples with seed ``generator.seed + index`` (actors must not draw identical streams)."""
    g = dataclasses.replace(cfg.generator, seed=int(cfg.generator.seed) + index)
    max_model_len = int(cfg.data.max_prompt_length) + int(g.max_new_tokens)
    if g.backend == "vllm":
        from actors.backends.vllm_backend import VLLMBackend
        return VLLMBackend(model_path, g, cfg.model.dtype, max_model_len)
    if g.backend == "hf":
        if g.tensor_parallel_size != 1:
            raise ValueError(f"generator.tensor_parallel_size = {g.tensor_parallel_size}: the hf backend needs 1")
        from actors.backends.hf_backend import HFBackend
        return HFBackend(model_path, g, cfg.model.dtype, max_model_len)
    raise ValueError(f"generator.backend = {g.backend!r}: must be one of {', '.join(BACKENDS)}")


def _record(p: Any) -> PromptRecord:
    return p if isinstance(p, PromptRecord) else PromptRecord(**p)


class GeneratorActor:
    """One engine. Wrapped with ``ray.remote`` by :class:`GeneratorPool`; usable in-process too."""

    def __init__(self, cfg: Any, model_path: str, index: int = 0):
        t0 = time.perf_counter()
        self.cfg, self.index = cfg, index
        since = log_offset()
        if int(cfg.generator.tensor_parallel_size) == 1:  # this process holds the engine's GPU itself
            from dispo_ray.infra.devices import check_cuda_startup
            check_cuda_startup(cfg.generator.num_gpus_per_actor, f"generator {index}")
        try:
            self.backend = make_backend(cfg, model_path, index)
        except Exception as e:  # noqa: BLE001 - re-raised with the engine's own root cause
            raise engine_root_cause(e, since, f"generator {index}: starting the {cfg.generator.backend} engine") from e
        self.tokenizer = self.backend.tokenizer
        # every engine call goes through the loop (streaming, or one generate under its lock); it
        # holds the version the engine's weights are
        self.loop = EngineLoop(self.backend, cfg.generator.partial_rollout,
                               lambda s: self._sample(s.group.record, s.token_ids, s.logprobs, s.finish_reason, s.spans))
        self.incarnation = uuid.uuid4().hex  # changes when Ray restarts the actor
        self.start_seconds = time.perf_counter() - t0
        self.stats = {"calls": 0, "prompts": 0, "samples": 0, "tokens": 0, "busy_s": 0.0, "syncs": 0}

    def generate(self, prompts: Sequence[Any], n: int, sampling: Optional[Dict[str, Any]] = None) -> List[Sample]:
        """``n`` samples per prompt, as ``[p0 s0 .. p0 s(n-1), p1 s0, ...]``. With no stream in
        flight: one engine call, every sample tagged with the one version that drew it. While
        groups stream (an evaluation in stream mode): through the engine loop beside them."""
        if n < 1:
            raise ValueError(f"generate: n = {n}, must be >= 1")
        records = [_record(p) for p in prompts]
        if not records:
            return []
        spec = SamplingSpec.from_config(self.cfg.generator, sampling)
        t0, since = time.perf_counter(), log_offset()
        try:
            with self.loop.engine():
                # decided while holding the engine: a group submitted between a check and the call
                # would be stepped (and its outputs collected) by the batch call
                streaming = self.loop.in_flight() > 0
                completions = None if streaming else self.backend.generate([r.prompt_token_ids for r in records], n, spec)
        except Exception as e:  # noqa: BLE001 - re-raised with the engine's own root cause
            raise engine_root_cause(e, since, f"generator {self.index}: {self.cfg.generator.backend} generate") from e
        if completions is None:
            return self._beside_stream(records, n, spec)
        out: List[Sample] = []
        for rec, group in zip(records, completions):
            if len(group) != n:
                raise RuntimeError(f"backend returned {len(group)} samples for prompt {rec.uid}, expected {n}")
            out.extend(self._sample(rec, c.token_ids, c.logprobs, c.finish_reason, [[self.loop.version, len(c.token_ids)]])
                       for c in group)
        self.stats["calls"] += 1
        self.stats["prompts"] += len(records)
        self.stats["busy_s"] += time.perf_counter() - t0
        return out

    def _beside_stream(self, records: List[PromptRecord], n: int, spec: SamplingSpec) -> List[Sample]:
        """``generate`` while groups stream: private groups through the engine loop beside them."""
        tag = uuid.uuid4().hex[:8]
        groups = [GroupRequest(f"gen-{tag}-{i}", r, n, spec) for i, r in enumerate(records)]
        self.loop.submit(groups, private=True)
        got: Dict[str, List[Sample]] = {}
        while len(got) < len(groups):
            got.update(self.loop.collect(1.0, {g.gid for g in groups} - set(got)))
        return [x for g in groups for x in got[g.gid]]

    def _sample(self, rec: PromptRecord, token_ids: List[int], logprobs: List[float], finish_reason: str,
                spans: List[List[int]]) -> Sample:
        """One finished sample; ``version`` is its oldest token's (``spans``: [[version, tokens], ...])."""
        self.stats["samples"] += 1
        self.stats["tokens"] += len(token_ids)
        version = spans[0][0] if spans else self.loop.version
        return Sample(prompt_uid=rec.uid, prompt_token_ids=list(rec.prompt_token_ids), response_token_ids=list(token_ids),
                      response_logprobs=list(logprobs), version=version, finish_reason=finish_reason,
                      response_text=self.tokenizer.decode(token_ids, skip_special_tokens=True),
                      ground_truth=rec.ground_truth, data_source=rec.data_source,
                      version_spans=[list(x) for x in spans] if len(spans) > 1 else [])

    # --- streaming (actors.streaming): the pool's StreamRouter drives these -----------------------
    def submit(self, groups: List[GroupRequest]) -> int:
        """Add prompt groups to the running engine; returns the groups now in flight here."""
        self.loop.submit([dataclasses.replace(g, record=_record(g.record)) for g in groups])
        self.stats["prompts"] += len(groups)
        return self.loop.in_flight()

    def collect(self, wait_s: float = 0.5) -> List[Tuple[str, List[Sample]]]:
        """Groups finished since the last call, ``(gid, samples)``; waits up to ``wait_s`` for one."""
        return self.loop.collect(wait_s)

    def abort(self, gids: List[str]) -> int:
        return self.loop.abort(gids)

    def sync_ranks(self) -> int:
        """How many ranks of the weight-sync group this actor takes (one per TP worker)."""
        return int(self.backend.sync_ranks)

    def init_weight_sync(self, settings: SyncSettings, rank: int) -> List[int]:
        """Join the group as ranks ``rank .. rank + sync_ranks() - 1``; blocks until every rank
        (the learner's rank 0 included) has joined. Returns the ranks taken."""
        return self.backend.init_weight_sync(settings, rank)

    def update_weights(self) -> int:
        """Receive one broadcast into the running engine; adopt the version the sender stamped on
        it (and reset the prefix cache). Returns the new version."""
        version = self.loop.swap_weights(self.backend.receive_weights)  # between two engine steps
        self.stats["syncs"] += 1
        return version

    def close_weight_sync(self) -> None:
        self.backend.close_weight_sync()

    def version(self) -> int:
        return self.loop.version

    def set_version(self, version: int) -> None:
        """Declare the loaded weights' version (e.g. after loading a checkpoint by other means)."""
        self.loop.version = int(version)

    def param_sums(self) -> Dict[str, float]:
        """Sum of each parameter in the engine (debugging weight updates)."""
        return self.backend.param_sums()

    def load(self) -> Dict[str, Any]:
        s = dict(self.stats)
        s["busy_s"] += self.loop.stats["busy_s"]  # engine steps of streamed groups
        s.update(actor=self.index, version=self.loop.version, stream=dict(self.loop.stats), incarnation=self.incarnation,
                 weight_update=self.backend.weight_update,
                 engine_core=getattr(self.backend, "engine_core", "n/a"),
                 start_seconds=round(self.start_seconds, 2),
                 tokens_per_s=s["tokens"] / s["busy_s"] if s["busy_s"] else 0.0,
                 samples_per_s=s["samples"] / s["busy_s"] if s["busy_s"] else 0.0)
        return s

    def ready(self) -> str:
        return self.incarnation

    def shutdown(self) -> None:
        self.loop.close()
        self.backend.shutdown()


class SyncOwner(Protocol):
    """What the pool asks of the weight sync's owner (:class:`dispo_ray.sync.coordinator.WeightSync`)."""

    @property
    def version(self) -> int:
        """The published version (0: the initial weights every fresh actor loads)."""

    def resync_restarted(self) -> None:
        """Re-form the group and re-broadcast the published version to the restarted actors
        (``needs_sync``); called from the thread that found them, before their prompts are re-issued."""


def split_even(items: Sequence[Any], k: int) -> List[List[Any]]:
    """``k`` contiguous chunks whose sizes differ by at most one (empty ones at the end)."""
    q, r = divmod(len(items), k)
    out, start = [], 0
    for i in range(k):
        size = q + (1 if i < r else 0)
        out.append(list(items[start:start + size]))
        start += size
    return out


class GeneratorPool:
    """``generator.num_actors`` :class:`GeneratorActor` s behind one call. Plain object held by
    the driver (it must run where Ray is initialised)."""

    def __init__(self, cfg: Any, model_path: str, restart_timeout_s: float = 300.0):
        import ray

        g = cfg.generator
        self.cfg, self.model_path, self.restart_timeout_s = cfg, model_path, restart_timeout_s
        self.placement_groups: List[Any] = []
        remote_cls = ray.remote(GeneratorActor)
        self.actors = []
        wait_for_node_resource(g.node_resource, "generator.node_resource", restart_timeout_s)
        for i in range(int(g.num_actors)):
            # max_concurrency: a weight sync or an abort reaches the actor while a collect waits
            # (the engine loop lets them in between two engine steps)
            opts: Dict[str, Any] = dict(max_restarts=MAX_RESTARTS, max_task_retries=0, name=None, max_concurrency=4,
                                        num_cpus=float(g.num_cpus_per_actor), resources=pin(g.node_resource))
            opts.update(self._gpu_options(g))
            self.actors.append(remote_cls.options(**opts).remote(cfg, model_path, i))
        self.incarnations = ray.get([a.ready.remote() for a in self.actors])
        self.needs_sync: set = set()  # actors restarted since the last sync (initial weights)
        self.reissued = 0
        self._ranks: Optional[List[int]] = None
        self.stream = StreamRouter(self)  # streaming rollouts: groups in flight on which actor
        # The owner of the published version (WeightSync attaches itself when it forms the group):
        # asked whether a restarted actor's initial weights are stale, and to re-sync it before its
        # prompts are re-issued. None: every restarted actor is flagged and nothing re-syncs it.
        self.weight_sync: Optional[SyncOwner] = None

    def _gpu_options(self, g: Any) -> Dict[str, Any]:
        """One STRICT_PACK placement group per actor: ``tensor_parallel_size`` bundles of one GPU
        each (TP groups never split across nodes). With TP > 1 the actor holds no GPU itself;
        vLLM's Ray executor starts one worker per bundle (``capture_child_tasks``). Each bundle
        carries the pool's pin (``generator.node_resource``), so the group lands on its own nodes."""
        if float(g.num_gpus_per_actor) <= 0:
            return {}
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
        import ray

        tp = int(g.tensor_parallel_size)
        gpus = 1.0 if tp > 1 else float(g.num_gpus_per_actor)
        pg = placement_group([{"GPU": gpus, "CPU": 1.0, **pin(g.node_resource)}] * tp, strategy="STRICT_PACK")
        ray.get(pg.ready(), timeout=self.restart_timeout_s)
        self.placement_groups.append(pg)
        strategy = PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=0,
                                                    placement_group_capture_child_tasks=True)
        return {"num_gpus": 0 if tp > 1 else gpus, "num_cpus": 0 if tp > 1 else min(1.0, float(g.num_cpus_per_actor)),
                "resources": {} if tp > 1 else pin(g.node_resource), "scheduling_strategy": strategy}

    # --- generation ------------------------------------------------------------------------------
    def generate(self, prompts: Sequence[Any], n: int, sampling: Optional[Dict[str, Any]] = None) -> List[Sample]:
        """Spread ``prompts`` over the actors; ``n`` samples per prompt, in prompt order. A chunk
        whose actor died is re-issued once the actor is back (or on a healthy actor)."""
        import ray

        chunks = split_even(list(prompts), len(self.actors))
        refs = {i: self.actors[i].generate.remote(c, n, sampling) for i, c in enumerate(chunks) if c}
        results: Dict[int, List[Sample]] = {}
        failed: List[int] = []
        for i, ref in refs.items():
            try:
                results[i] = ray.get(ref)
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
                log.warning("generator %d failed (%s); re-issuing its %d prompts", i, type(e).__name__, len(chunks[i]))
                failed.append(i)
        for i in failed:
            self.await_restart(i)
            if self.needs_sync and self.weight_sync is not None:
                self.weight_sync.resync_restarted()  # re-forms the group (clears needs_sync), re-broadcasts
            healthy = [j for j in range(len(self.actors)) if j not in failed and j not in self.needs_sync]
            target = healthy[0] if healthy else i
            results[i] = ray.get(self.actors[target].generate.remote(chunks[i], n, sampling))
            self.reissued += len(chunks[i])
        return [s for i in sorted(results) for s in results[i]]

    def await_restart(self, i: int) -> None:
        """Wait until Ray has restarted actor ``i``; flag it for a weight sync if it now holds
        weights older than the published version (the initial ones are version 0)."""
        import ray

        deadline = time.monotonic() + self.restart_timeout_s
        while True:
            try:
                inc = ray.get(self.actors[i].ready.remote(), timeout=max(1.0, deadline - time.monotonic()))
                break
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError,
                    ray.exceptions.GetTimeoutError) as e:
                if time.monotonic() > deadline or isinstance(e, ray.exceptions.ActorDiedError):
                    raise RuntimeError(f"generator {i} did not come back within {self.restart_timeout_s}s: {e}") from e
                time.sleep(0.5)
        if inc != self.incarnations[i]:
            self.incarnations[i] = inc
            if self.weight_sync is None or self.weight_sync.version != 0:
                self.needs_sync.add(i)

    def check_health(self) -> List[int]:
        """Ping every actor; returns the indices that were restarted (and now need a sync)."""
        for i in range(len(self.actors)):
            self.await_restart(i)
        return sorted(self.needs_sync)

    # --- weights ---------------------------------------------------------------------------------
    def sync_world_size(self) -> int:
        """1 (the learner's rank 0) + every actor's ranks."""
        import ray
        self._ranks = ray.get([a.sync_ranks.remote() for a in self.actors])
        return 1 + sum(self._ranks)

    def init_weight_sync(self, settings: SyncSettings) -> List[Any]:
        """Start every actor joining the group (ranks 1..N in actor order) and return the Ray refs.
        Call :meth:`sync_world_size` *before* (each actor blocks in the join until rank 0 arrives,
        so no other actor call is answered meanwhile; ``settings.world_size`` is its answer); then
        join rank 0 and ``ray.get`` the refs."""
        if getattr(self, "_ranks", None) is None:
            self.sync_world_size()
        if settings.world_size != 1 + sum(self._ranks):
            raise ValueError(f"weight sync: world_size {settings.world_size}, but rank 0 and the actors "
                             f"take {1 + sum(self._ranks)} ranks")
        refs, rank = [], 1
        for a, k in zip(self.actors, self._ranks):
            refs.append(a.init_weight_sync.remote(settings, rank))
            rank += k
        self.needs_sync.clear()
        return refs

    def update_weights(self) -> List[Any]:
        """Start every actor receiving the next broadcast; returns the refs (see :meth:`wait_update`)."""
        return [a.update_weights.remote() for a in self.actors]

    def wait_update(self, refs: Sequence[Any]) -> int:
        """Wait for :meth:`update_weights`; all actors must report the same version (returned, for
        the caller's check against what it sent)."""
        import ray
        versions = set(ray.get(list(refs)))
        if len(versions) != 1:
            raise RuntimeError(f"generators hold different versions after a sync: {sorted(versions)}")
        return versions.pop()

    def close_weight_sync(self) -> None:
        import ray
        ray.get([a.close_weight_sync.remote() for a in self.actors])

    def versions(self) -> List[int]:
        """The version each actor holds now (for checks: the published one is the sync owner's)."""
        import ray
        return ray.get([a.version.remote() for a in self.actors])

    def load(self) -> List[Dict[str, Any]]:
        """Per-actor counters: calls, prompts, samples, tokens, busy seconds, throughput, version."""
        import ray
        return ray.get([a.load.remote() for a in self.actors])

    def shutdown(self) -> None:
        import ray
        for a in self.actors:
            try:
                ray.get(a.shutdown.remote(), timeout=30)
            except Exception:
                pass
            ray.kill(a, no_restart=True)
        for pg in self.placement_groups:
            ray.util.remove_placement_group(pg)
        self.actors, self.placement_groups = [], []
