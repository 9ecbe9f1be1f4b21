"""The generator pool's side of streaming rollouts: :class:`StreamRouter`.

It places submitted prompt groups on the actor with the fewest groups in flight, long-polls every
busy actor for finished groups (one ``collect`` call outstanding per actor), aborts groups, and
owns the one record of which group is on which actor. That record is what makes a generator
restart lose nothing: when an actor dies mid-stream, the router waits for Ray to restart it, has
the weight sync's owner re-sync it, and re-submits every group the dead actor held (its prompts
are re-queued, none lost; a group is handed out at most once because finished groups are matched
against the record).
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Sequence, Tuple

from actors.streaming import GroupRequest

log = logging.getLogger(__name__)
POLL_S = 0.5  # an actor's collect waits this long for a finished group before answering empty


def _actor_lost(e: BaseException) -> bool:
    import ray
    return isinstance(e, (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError))


class StreamRouter:
    def __init__(self, pool: Any):
        self.pool = pool
        self.where: Dict[str, Tuple[int, GroupRequest]] = {}  # gid -> (actor index, request)
        self._polls: Dict[int, Any] = {}  # actor index -> its outstanding collect ref
        self.requeued = 0  # groups re-submitted after their actor died

    def in_flight(self) -> int:
        return len(self.where)

    def submit(self, groups: Sequence[GroupRequest]) -> None:
        """Place each group on the actor with the fewest groups in flight (ties: lowest index)."""
        import ray

        n = len(self.pool.actors)
        load = [0] * n
        for i, _ in self.where.values():
            load[i] += 1
        usable = [i for i in range(n) if i not in self.pool.needs_sync] or list(range(n))
        batches: Dict[int, List[GroupRequest]] = {}
        for g in groups:
            i = min(usable, key=lambda j: (load[j], j))
            load[i] += 1
            batches.setdefault(i, []).append(g)
            self.where[g.gid] = (i, g)
        refs = {i: self.pool.actors[i].submit.remote(b) for i, b in batches.items()}
        for i, ref in refs.items():
            try:
                ray.get(ref)
            except Exception as e:  # noqa: BLE001 - only a lost actor is recovered
                if not _actor_lost(e):
                    raise
                self._recover(i)

    def collect(self, timeout: float) -> List[Tuple[str, List[Any]]]:
        """Groups that finished, ``(gid, samples)``; waits up to ``timeout`` for the first."""
        import ray

        busy = {i for i, _ in self.where.values()}
        for i in busy:
            if i not in self._polls:
                self._polls[i] = self.pool.actors[i].collect.remote(POLL_S)
        if not self._polls:
            return []
        by_ref = {ref: i for i, ref in self._polls.items()}
        ready, rest = ray.wait(list(by_ref), num_returns=1, timeout=timeout)
        if rest and ready:
            ready += ray.wait(rest, num_returns=len(rest), timeout=0)[0]
        out: List[Tuple[str, List[Any]]] = []
        for ref in ready:
            i = by_ref[ref]
            del self._polls[i]
            try:
                finished = ray.get(ref)
            except Exception as e:  # noqa: BLE001 - only a lost actor is recovered
                if not _actor_lost(e):
                    raise
                self._recover(i)
                continue
            for gid, samples in finished:
                if self.where.pop(gid, None) is not None:  # not aborted meanwhile
                    out.append((gid, samples))
        return out

    def abort(self, gids: Sequence[str]) -> None:
        import ray

        by_actor: Dict[int, List[str]] = {}
        for gid in gids:
            placed = self.where.pop(gid, None)
            if placed is not None:
                by_actor.setdefault(placed[0], []).append(gid)
        refs = [self.pool.actors[i].abort.remote(g) for i, g in by_actor.items()]
        for ref in refs:
            try:
                ray.get(ref)
            except Exception as e:  # noqa: BLE001 - a dead actor holds nothing any more
                if not _actor_lost(e):
                    raise

    def abort_all(self) -> None:
        self.abort(list(self.where))

    def _recover(self, i: int) -> None:
        """Actor ``i`` died: wait for its restart, re-sync it, re-submit the groups it held."""
        self._polls.pop(i, None)
        lost = [g for j, g in self.where.values() if j == i]
        log.warning("generator %d died mid-stream; re-submitting its %d prompt groups", i, len(lost))
        self.pool.await_restart(i)
        if self.pool.needs_sync and self.pool.weight_sync is not None:
            self.pool.weight_sync.resync_restarted()
        for g in lost:
            del self.where[g.gid]
        self.requeued += len(lost)
        self.submit(lost)
