"""The reward / verifier pool: N CPU Ray actors, each owning one :class:`~dispo_ray.reward.sandbox.Sandbox`.

:class:`RewardPool` is a plain object the driver holds (or anyone: ``RewardPool(cfg.reward,
max_new_tokens=...)`` inside a running Ray). ``score(items)`` cuts the batch into chunks and
hands them to idle workers as they free up (so one slow chunk does not stall the batch); each
worker verifies its chunk pipelined through its sandbox child, after looking each (answer span,
gold text) pair up in its verdict cache: a group of G samples repeats answers constantly, and
the span leaves out the prose, so a repeat costs a dictionary lookup. It returns one
:class:`~dispo_ray.reward.scoring.ScoreResult` per item in input order. A worker that dies
(``RayActorError``) or stops answering is killed, replaced, and its chunk re-queued; each chunk's
results are written exactly once, so nothing is lost or duplicated.

This module must stay light to import: every worker imports it, so no torch (``Sample`` is
recognised by its attributes, not imported).
"""
from __future__ import annotations

import collections
import math
import os
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import ray
from ray.exceptions import GetTimeoutError, RayActorError, WorkerCrashedError

from dispo_ray.infra.placement import pin, wait_for_node_resource
from dispo_ray.reward.sandbox import Sandbox
from dispo_ray.reward.scoring import ScoreResult, finalize, prepare

CACHE_SIZE = 65536  # verdicts kept per worker (a few MB): many steps of groups
CACHEABLE = ("ok", "wrong", "no_answer")  # deterministic verdicts; a timeout may be load, not the answer

_NEEDED = ("num_workers", "num_cpus_per_worker", "timeout_s", "memory_mb", "correct_reward",
           "wrong_reward", "format_reward", "overlong_buffer", "overlong_penalty",
           "max_answer_chars", "node_resource", "answer_format")


class VerdictCache:
    """Bounded LRU map ``(text to verify, gold text) -> reason``; ``size == 0`` turns it off
    (every item is then verified, repeats included)."""

    def __init__(self, size: int):
        if size < 0:
            raise ValueError(f"verdict cache size must be >= 0, got {size}")
        self.size = int(size)
        self._d: "collections.OrderedDict[Tuple[str, str], str]" = collections.OrderedDict()
        self.hits = self.misses = 0

    def get(self, key: Tuple[str, str]) -> Optional[str]:
        reason = self._d.get(key) if self.size else None
        if reason is None:
            self.misses += 1
            return None
        self._d.move_to_end(key)
        self.hits += 1
        return reason

    def put(self, key: Tuple[str, str], reason: str) -> None:
        if self.size and reason in CACHEABLE:
            self._d[key] = reason
            self._d.move_to_end(key)
            if len(self._d) > self.size:
                self._d.popitem(last=False)

    def __len__(self) -> int:
        return len(self._d)


@ray.remote(max_restarts=0, max_concurrency=1)
class RewardWorker:
    """One CPU actor: extraction, pre-filters and the verdict cache here, math-verify in its
    sandbox child."""

    def __init__(self, reward_cfg: Any, max_new_tokens: int, sandbox_options: Dict[str, Any],
                 cache_size: int = CACHE_SIZE):
        self.cfg = reward_cfg
        self.max_new_tokens = int(max_new_tokens)
        self.answer_format = reward_cfg.answer_format
        self.sandbox = Sandbox(reward_cfg.timeout_s, reward_cfg.memory_mb,
                               answer_format=self.answer_format, **sandbox_options)
        self.cache = VerdictCache(cache_size)
        self.scored = 0

    def ready(self) -> int:
        return os.getpid()

    def score(self, items: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
        prepared = []
        for it in items:
            t0 = time.monotonic()
            try:
                answer, text, gt, reason = prepare(it["response_text"], it["ground_truth"],
                                                   it["data_source"], self.cfg.max_answer_chars,
                                                   self.answer_format)
            except Exception:  # a bug in extraction must cost one item, not the batch
                answer, text, gt, reason = None, None, "", "crashed"
            if reason is None:
                reason = self.cache.get((text, gt))
            prepared.append([answer, (text, gt), reason, time.monotonic() - t0])
        # each distinct pair once (repeats within the chunk share it, unless the cache is off)
        waiting: Dict[Any, List[list]] = collections.defaultdict(list)
        for i, p in enumerate(prepared):
            if p[2] is None:
                waiting[p[1] if self.cache.size else i].append(p)
        keys = list(waiting)
        # one pipelined call for the chunk; each verify time excludes waiting for a new child
        for key, (reason, verify_s) in zip(keys, self.sandbox.verify_many(
                [waiting[k][0][1] for k in keys])):
            self.cache.put(waiting[key][0][1], reason)
            for p in waiting[key]:
                p[2], p[3] = reason, p[3] + verify_s
        out = []
        for it, (answer, _key, reason, elapsed) in zip(items, prepared):
            res = finalize(reason, answer, it["response_length"], self.max_new_tokens, self.cfg)
            res.elapsed_s = elapsed
            out.append(res.to_dict())
        self.scored += len(items)
        return out

    def stats(self) -> Dict[str, Any]:
        s = self.sandbox.stats()
        s.update(pid=os.getpid(), cwd=os.getcwd(), scored=self.scored, cache_hits=self.cache.hits,
                 cache_misses=self.cache.misses, cache_entries=len(self.cache))
        return s

    def close(self) -> None:
        self.sandbox.close()


def _as_item(x: Any, i: int) -> Dict[str, Any]:
    """A dict or a rollout ``Sample`` -> the few fields a worker needs (never the token lists)."""
    if isinstance(x, dict):
        missing = [k for k in ("response_text", "ground_truth") if k not in x]
        if missing:
            raise ValueError(f"reward item {i}: missing key(s) {', '.join(missing)}")
        text, gt = x["response_text"], x["ground_truth"]
        src, length = x.get("data_source", ""), x.get("response_length", 0)
    elif hasattr(x, "response_text") and hasattr(x, "ground_truth"):
        text, gt = x.response_text, x.ground_truth
        src, length = getattr(x, "data_source", ""), getattr(x, "response_length", 0)
    else:
        raise TypeError(f"reward item {i}: expected a dict or a Sample, got {type(x).__name__}")
    if not isinstance(text, str):
        raise TypeError(f"reward item {i}: response_text must be str, got {type(text).__name__}")
    if not isinstance(length, int) or length < 0:
        raise ValueError(f"reward item {i}: response_length must be an int >= 0, got {length!r}")
    return {"response_text": text, "ground_truth": str(gt), "data_source": str(src or ""),
            "response_length": length}


def next_chunk(fresh: "collections.deque[Tuple[int, int]]", workers: int,
               chunk_size: Optional[int] = None) -> Tuple[int, int]:
    """Take the next chunk ``(start, end)`` off the unassigned range at the head of ``fresh``
    (the rest goes back). Guided self-scheduling: a chunk is 1/(2W) of what is left (4..64 items),
    so chunks shrink towards the end of a batch and the workers finish together instead of one
    idling while another ends a long chunk; a fixed ``chunk_size`` overrides it."""
    start, end = fresh.popleft()
    size = chunk_size or max(4, min(64, math.ceil((end - start) / (2 * workers))))
    if end - start > size:
        fresh.appendleft((start + size, end))
        end = start + size
    return start, end


class RewardPool:
    """``reward.num_workers`` sandboxed verifier actors behind one batch API."""

    def __init__(self, cfg: Any, max_new_tokens: int, *, num_workers: Optional[int] = None,
                 chunk_size: Optional[int] = None, sandbox_options: Optional[Dict[str, Any]] = None,
                 max_chunk_retries: int = 3, start_timeout_s: float = 180.0,
                 cache_size: int = CACHE_SIZE):
        missing = [k for k in _NEEDED if not hasattr(cfg, k)]
        if missing:
            raise ValueError(f"RewardPool: reward config lacks {', '.join(missing)}")
        # the values of ``cfg`` are checked once, by the config's validation (dispo_ray.infra.config)
        # and the sandbox (memory_mb); here only this class's own arguments
        n = cfg.num_workers if num_workers is None else num_workers
        if n < 1:
            raise ValueError(f"RewardPool: num_workers must be >= 1, got {n}")
        if max_new_tokens < 1:
            raise ValueError(f"RewardPool: max_new_tokens must be >= 1, got {max_new_tokens}")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"RewardPool: chunk_size must be >= 1, got {chunk_size}")
        if cache_size < 0:
            raise ValueError(f"RewardPool: cache_size must be >= 0 (0 = off), got {cache_size}")
        self.cache_size = int(cache_size)
        if not ray.is_initialized():
            raise RuntimeError("RewardPool: Ray is not initialized (call ray.init first)")
        self.cfg = cfg
        self.max_new_tokens = int(max_new_tokens)
        self.target_size = int(n)
        self.chunk_size = chunk_size
        self.sandbox_options = dict(sandbox_options or {})
        self.max_chunk_retries = max_chunk_retries
        self.start_timeout_s = start_timeout_s
        self.replaced = 0
        wait_for_node_resource(cfg.node_resource, "reward.node_resource", start_timeout_s)
        self.workers: List[Any] = [self._spawn() for _ in range(self.target_size)]
        ray.get([w.ready.remote() for w in self.workers], timeout=start_timeout_s)

    # ----------------------------------------------------------- workers
    def _spawn(self) -> Any:
        return RewardWorker.options(num_cpus=self.cfg.num_cpus_per_worker, resources=pin(self.cfg.node_resource)).remote(
            self.cfg, self.max_new_tokens, self.sandbox_options, self.cache_size)

    def _replace(self, i: int) -> None:
        try:
            ray.kill(self.workers[i], no_restart=True)
        except Exception:  # already dead
            pass
        self.workers[i] = self._spawn()
        self.replaced += 1

    def _chunk_deadline(self, n_items: int) -> float:
        # worst case every item of the chunk is a bomb, plus a replacement actor's start-up
        return n_items * (self.cfg.timeout_s + 2.0) + self.start_timeout_s

    # ----------------------------------------------------------- scoring
    def score(self, items: Sequence[Any]) -> List[ScoreResult]:
        """Score dicts (``response_text``, ``ground_truth``, optional ``data_source``,
        ``response_length``) or ``Sample``s; returns results in input order."""
        batch = [_as_item(x, i) for i, x in enumerate(items)]
        n = len(batch)
        if n == 0:
            return []
        w = len(self.workers)
        fresh = collections.deque([(0, n)])  # unassigned items, cut into chunks on dispatch
        retry: collections.deque = collections.deque()  # chunks a dead worker had, as they were
        results: List[Optional[ScoreResult]] = [None] * n
        tries: Dict[Tuple[int, int], int] = collections.defaultdict(int)
        idle = list(range(w))
        inflight: Dict[Any, tuple] = {}  # ref -> (worker index, (start, end), sent at)
        while fresh or retry or inflight:
            while idle and (fresh or retry):
                chunk = retry.popleft() if retry else next_chunk(fresh, w, self.chunk_size)
                wi = idle.pop()
                ref = self.workers[wi].score.remote(batch[chunk[0]:chunk[1]])
                inflight[ref] = (wi, chunk, time.monotonic())
            done, _ = ray.wait(list(inflight), num_returns=1, timeout=1.0)
            for ref in done:
                wi, chunk, _sent = inflight.pop(ref)
                try:
                    out = ray.get(ref)
                except (RayActorError, WorkerCrashedError):
                    self._lost(wi, chunk, tries, retry, results)
                else:
                    for j, r in enumerate(out):
                        results[chunk[0] + j] = ScoreResult(**r)
                idle.append(wi)
            now = time.monotonic()
            for ref, (wi, chunk, sent) in list(inflight.items()):
                if now - sent > self._chunk_deadline(chunk[1] - chunk[0]):  # hung actor
                    inflight.pop(ref)
                    self._lost(wi, chunk, tries, retry, results)
                    idle.append(wi)
        assert all(r is not None for r in results)
        return results  # type: ignore[return-value]

    def _lost(self, wi: int, chunk: Tuple[int, int], tries: Dict[Tuple[int, int], int],
              retry: collections.deque, results: List[Optional[ScoreResult]]) -> None:
        """Worker ``wi`` died on ``chunk``: replace it; re-queue or give up on the chunk."""
        self._replace(wi)
        tries[chunk] += 1
        if tries[chunk] <= self.max_chunk_retries:
            retry.append(chunk)
            return
        for j in range(*chunk):
            results[j] = finalize("crashed", None, 0, self.max_new_tokens, self.cfg)

    def score_samples(self, samples: Sequence[Any]) -> List[ScoreResult]:
        """Score rollout ``Sample``s and fill their ``reward``, ``correct`` and ``reason``."""
        results = self.score(samples)
        for s, r in zip(samples, results):
            s.reward, s.correct, s.reason = r.reward, r.correct, r.reason
        return results

    # ----------------------------------------------------------- health
    def health(self, timeout_s: float = 30.0) -> Dict[str, Any]:
        """Ping every worker, replace the ones that are dead, and report the pool's state."""
        stats: List[Optional[Dict[str, Any]]] = []
        for i, wkr in enumerate(self.workers):
            try:
                stats.append(ray.get(wkr.stats.remote(), timeout=timeout_s))
            except (RayActorError, WorkerCrashedError, GetTimeoutError):
                self._replace(i)
                stats.append(None)
        alive = sum(s is not None for s in stats)
        return {"size": len(self.workers), "target": self.target_size, "alive": alive,
                "replaced": self.replaced, "workers": stats,
                "timeouts": sum(s["timeouts"] for s in stats if s),
                "crashes": sum(s["crashes"] for s in stats if s),
                "cache_hits": sum(s["cache_hits"] for s in stats if s),
                "stray_files": sum(s["stray_files"] + s["child_stray_files"] for s in stats if s)}

    @property
    def size(self) -> int:
        return len(self.workers)

    def __len__(self) -> int:
        return len(self.workers)

    def shutdown(self) -> None:
        """Stop the sandbox children and the actors."""
        for wkr in self.workers:
            try:
                ray.get(wkr.close.remote(), timeout=10)
            except Exception:
                pass
            try:
                ray.kill(wkr, no_restart=True)
            except Exception:
                pass
        self.workers = []
