"""The one owner of the weight sync: :class:`WeightSync`.

It holds the backend decision (:func:`dispo_ray.infra.devices.sync_backend`, made once), the group's
:class:`~dispo_ray.sync.settings.SyncSettings` (endpoint and manifest), the readiness gate
(:class:`~dispo_ray.sync.transport.SyncGate`), the lock that makes "train, then publish" one unit,
and **the published version**: the version of the weights every generator holds, the one the
staleness gate admits rollouts by (it reads :attr:`WeightSync.version` and is notified through
:meth:`WeightSync.watch`). Nothing else keeps a version of its own.

Lifecycle::

    connect()            form the group: learner rank 0 (store host) + every generator worker
    publish(version)     broadcast the trained weights as ``version`` (versions only grow)
    restore(version)     broadcast weights loaded from a checkpoint (resume, rollback, recovery):
                         the version may go back
    reform()             re-form the group after a generator restart, re-broadcast the published version
    reconnect(build)     the learner group was rebuilt (recovery): adopt it, form a fresh group
    close()              leave the group on both sides

One broadcast (:meth:`_broadcast`), as numbered steps:

    1. every generator starts receiving (``update_weights``); it may queue behind a long
       ``generate`` call (``max_staleness >= 1``);
    2. the gate waits, without a deadline, until every receiver is ready (a receiver whose call
       already ended, i.e. died, fails the wait), so no sync deadline runs while one is busy;
    3. every learner rank walks the buckets (ZeRO-3: gathers them); rank 0 sends;
    4. every generator reports the version it adopted, which must be the one sent;
    5. on failure: the readiness gate aborts the sync (receivers still waiting fail at once), rank 0's side
       is closed (receivers blocked on it fail now, not at their timeout), receivers are drained,
       and the error is raised.

A generator that died mid-sync is waited for (Ray restarts it with the initial weights); then the
group is re-formed and the broadcast repeated (:meth:`publish`). A generator that died between syncs
is found by its pool, which calls :meth:`resync_restarted` from the producer thread before it
re-issues the dead actor's prompts.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Callable, List, Optional

from dispo_ray.sync.settings import SyncSettings


class WeightSync:
    """Learner rank 0 -> every generator, for the driver. ``learners`` is a
    :class:`~actors.learner_group.LearnerGroup`, ``generators`` a :class:`~actors.generator.GeneratorPool`
    (duck-typed: this layer sits below the actors). ``version`` is the version the generators hold
    when this object is built (0: the initial weights)."""

    def __init__(self, cfg: Any, learners: Any, generators: Any, version: int = 0):
        from dispo_ray.infra.devices import sync_backend

        self.cfg, self.learners, self.generators = cfg, learners, generators
        self.backend = sync_backend(cfg)  # the one decision; both sides get it through the settings
        self.lock = threading.RLock()  # held by the driver over "train, then publish" too
        self.settings: Optional[SyncSettings] = None
        self.readiness: Any = None  # the SyncGate of the formed group (readiness, abort)
        self._version = int(version)
        self._watchers: List[Callable[[], None]] = []

    # ------------------------------------------------------------------ the published version
    @property
    def version(self) -> int:
        """The published version: what every generator holds once the last publish returned."""
        return self._version

    def watch(self, notify: Callable[[], None]) -> None:
        """Call ``notify()`` after every change of :attr:`version` (the staleness gate wakes its waiters)."""
        self._watchers.append(notify)

    def unwatch(self, notify: Callable[[], None]) -> None:
        if notify in self._watchers:
            self._watchers.remove(notify)

    def _notify(self) -> None:
        for notify in list(self._watchers):
            notify()

    # ------------------------------------------------------------------ lifecycle
    def connect(self) -> None:
        """Form the group: learner rank 0 (store host) + every generator worker, all with the one
        backend; then watch its readiness. The pool is attached, so it asks this object (not the
        driver) to re-sync a generator Ray restarted."""
        import ray

        from dispo_ray.sync.transport import SyncGate

        l = self.cfg.learner
        with self.lock:
            # Everything that asks an actor a question comes first: an actor inside the join
            # answers nothing else until every rank has arrived.
            host, port = self.learners.weight_sync_endpoint()
            manifest = self.learners.weight_manifest()
            world = self.generators.sync_world_size()
            self.settings = SyncSettings(host, port, world, manifest, l.sync_bucket_mb << 20,
                                         l.sync_timeout_s, self.backend)
            learner_ref = self.learners.init_weight_sync(self.settings, wait=False)
            gen_refs = self.generators.init_weight_sync(self.settings)
            ray.get([learner_ref, *gen_refs], timeout=l.sync_timeout_s + 60)
            self.readiness = SyncGate(host, port, receivers=world - 1, timeout_s=l.sync_timeout_s)
            self.generators.weight_sync = self

    def publish(self, version: int) -> float:
        """Train-then-publish: broadcast the learners' weights as ``version`` (>= the published one)
        and make it the published version. Returns the seconds it took."""
        if version < self._version:
            raise ValueError(f"versions only grow: {version} < {self._version} (a checkpoint's older "
                             "version goes through WeightSync.restore)")
        return self._sync(version)

    def restore(self, version: int) -> float:
        """Broadcast weights the learners loaded from a checkpoint and publish their ``version``,
        which may be older than the published one (resume, collapse-guard rollback, learner recovery)."""
        return self._sync(version)

    def reform(self) -> None:
        """Re-form the group (a generator was restarted) and broadcast the published version."""
        with self.lock:
            self.learners.close_weight_sync()
            self.generators.close_weight_sync()
            self.connect()
            self._broadcast(self._version)

    def resync_restarted(self) -> None:
        """The pool's call, before a dead actor's prompts are re-issued (producer thread)."""
        with self.lock:
            if self.generators.needs_sync:  # the main thread may have re-synced it already
                self.reform()

    def reconnect(self, build_learners: Callable[[], Any]) -> Any:
        """The learner group died (recovery): close the generators' side, adopt the group
        ``build_learners()`` builds and form a fresh sync group with it. Returns the new group."""
        with self.lock:
            self.generators.close_weight_sync()
            self.learners = build_learners()
            self.connect()
            return self.learners

    def close(self) -> None:
        """Leave the group on both sides (rank 0 first: receivers blocked on it fail now)."""
        with self.lock:
            self.learners.close_weight_sync()
            self.generators.close_weight_sync()
            self.readiness = None

    # ------------------------------------------------------------------ one sync
    def _sync(self, version: int) -> float:
        t0 = time.perf_counter()
        with self.lock:
            try:
                self._broadcast(version)
            except Exception as e:
                restarted = self.generators.check_health()
                if not restarted:
                    raise
                print(f"warning: weight sync of version {version} failed ({type(e).__name__}); generators "
                      f"{restarted} were restarted: re-forming the group", flush=True)
                self._version = version  # what reform() broadcasts
                self.reform()
            self._version = int(version)
        self._notify()  # outside the lock, as the gate's waiters never need it
        return time.perf_counter() - t0

    def _broadcast(self, version: int) -> None:
        """Steps 1-5 of the module docstring."""
        import ray

        gen_refs = self.generators.update_weights()  # 1
        try:
            self.readiness.wait_ready(failed=lambda: _raise_if_done(gen_refs))  # 2
            ray.get(self.learners.broadcast_weights(version, wait=False))  # 3
            got = self.generators.wait_update(gen_refs)  # 4
        except Exception as e:  # 5
            self.readiness.abort(type(e).__name__)
            self.learners.close_weight_sync()
            for ref in gen_refs:
                try:
                    ray.get(ref, timeout=self.cfg.learner.sync_timeout_s)
                except Exception:  # noqa: BLE001 - the failure is re-raised below
                    pass
            raise
        if got != version:
            raise RuntimeError(f"weight sync: generators report version {got}, expected {version}")


def _raise_if_done(refs: List[Any]) -> None:
    """A receiver's update cannot end before its sync has started: raise its error (or say so)."""
    import ray

    done, _ = ray.wait(list(refs), num_returns=len(refs), timeout=0)
    for ref in done:
        ray.get(ref)  # raises the receiver's error
        raise RuntimeError("weight sync: a generator finished its update before the sync started")
