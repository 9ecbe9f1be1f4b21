"""Streaming generation inside one generator actor: :class:`EngineLoop`.

Instead of one ``generate()`` per batch (which waits for its slowest sample while the engine's
running batch drains), the actor's engine is driven request by request: prompt groups are added
as they are submitted (:meth:`EngineLoop.submit`, one engine request per sample), a thread steps
the engine while anything is unfinished, and a group is handed out (:meth:`EngineLoop.collect`)
as soon as its last sample ends, so new groups enter while others are still decoding.

**Weights between engine steps (partial rollouts).** :meth:`EngineLoop.swap_weights` takes the
engine between two steps, receives the broadcast and then, per ``generator.partial_rollout``:

* ``continue`` (default): every unfinished sample goes on under the new weights. It is aborted in
  the engine and re-added with ``prompt + tokens so far`` as its prompt and the remaining token
  budget, so the new version's KV cache is recomputed (one prefill) and every later token is
  drawn from, and carries the log-prob of, ``pi_new(token | prompt, response so far)``. Each token
  keeps the version and log-prob of the policy that sampled it (``Sample.version_spans``), which is
  what the importance ratio needs; the sample's ``version`` is its oldest token's, which is what
  the staleness bound is checked against. Cost: one re-prefill per in-flight sample and sync.
* ``abort``: every unfinished sample restarts from its prompt under the new weights (its tokens
  so far are discarded). Cost: the discarded decode. Gain: every sample has one version, so a
  sync never makes a sample older than the weights it will be trained against.

A sample's seed is ``hash(group seed, sample index, segment)``: the same request draws the same
tokens whatever else is in the engine (``segment`` counts the re-adds after syncs).

Backends without an engine-level API (``hf``) are wrapped in :class:`BatchStepper`: one "step" is
one whole ``generate`` of everything queued, so a sync waits for it (no partial rollouts there).
"""
from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

from actors.backends.base import Delta, SamplingSpec

PARTIAL_ROLLOUTS = ("continue", "abort")  # generator.partial_rollout's choices


def sample_seed(group_seed: int, index: int, segment: int) -> int:
    return (int(group_seed) * 1_000_003 + index * 7919 + segment * 104_729) % (2 ** 31 - 1)


@dataclass
class GroupRequest:
    """One prompt group to draw: ``n`` samples of ``record`` (a PromptRecord) under ``spec``
    (``spec.seed``: the group's seed). ``gid`` is unique within a run."""
    gid: str
    record: Any
    n: int
    spec: SamplingSpec


@dataclass
class SampleState:
    """One sample in flight: its tokens so far, and which version sampled which of them."""
    group: GroupRequest
    index: int
    segment: int = 0
    token_ids: List[int] = field(default_factory=list)
    logprobs: List[float] = field(default_factory=list)
    spans: List[List[int]] = field(default_factory=list)  # [[version, tokens], ...] in order
    finish_reason: str = ""

    @property
    def key(self) -> str:
        return f"{self.group.gid}#{self.index}.{self.segment}"

    def request(self) -> Tuple[List[int], SamplingSpec]:
        """The engine request that continues this sample from where it is."""
        budget = self.group.spec.max_new_tokens - len(self.token_ids)
        spec = dataclasses.replace(self.group.spec, max_new_tokens=max(budget, 1),
                                   seed=sample_seed(self.group.spec.seed or 0, self.index, self.segment))
        return list(self.group.record.prompt_token_ids) + self.token_ids, spec

    def extend(self, d: Delta, version: int) -> None:
        self.token_ids += d.token_ids
        self.logprobs += d.logprobs
        if d.token_ids:
            if self.spans and self.spans[-1][0] == version:
                self.spans[-1][1] += len(d.token_ids)
            else:
                self.spans.append([version, len(d.token_ids)])
        if d.finished:
            self.finish_reason = d.finish_reason


class BatchStepper:
    """The :class:`~actors.backends.base.Stepping` calls over a backend that only has ``generate``:
    a step generates every queued request (grouped by sampling settings) to the end."""

    def __init__(self, backend: Any):
        self.backend = backend
        self.queue: Dict[str, Tuple[List[int], SamplingSpec]] = {}

    def add(self, key: str, prompt_token_ids: List[int], spec: SamplingSpec) -> None:
        self.queue[key] = (list(prompt_token_ids), spec)

    def abort(self, keys: List[str]) -> None:
        for k in keys:
            self.queue.pop(k, None)

    def has_unfinished(self) -> bool:
        return bool(self.queue)

    def step(self) -> List[Delta]:
        by_spec: Dict[Tuple, List[str]] = {}
        for key, (_, spec) in self.queue.items():
            by_spec.setdefault((spec.temperature, spec.top_p, spec.max_new_tokens, tuple(spec.stop)), []).append(key)
        out = []
        for keys in by_spec.values():
            spec = self.queue[keys[0]][1]  # one call, one seed: the first request's
            groups = self.backend.generate([self.queue[k][0] for k in keys], 1, spec)
            for k, (c,) in zip(keys, groups):
                out.append(Delta(k, c.token_ids, c.logprobs, True, c.finish_reason))
        self.queue.clear()
        return out


class EngineLoop:
    """Drives one backend request by request from its own thread (see the module docstring).

    ``make_sample(state, version)`` turns a finished :class:`SampleState` into a ``Sample``.
    Every engine call happens under one condition variable; callers that need the engine
    (:meth:`engine`) are let in between two steps.
    """

    def __init__(self, backend: Any, partial_rollout: str, make_sample: Callable[[SampleState], Any],
                 version: int = 0):
        if partial_rollout not in PARTIAL_ROLLOUTS:
            raise ValueError(f"generator.partial_rollout = {partial_rollout!r}: must be one of {', '.join(PARTIAL_ROLLOUTS)}")
        self.engine_api = backend if hasattr(backend, "step") else BatchStepper(backend)
        self.partial_rollout, self.make_sample, self.version = partial_rollout, make_sample, int(version)
        self._cv = threading.Condition()
        self._waiting = 0  # callers queued for the engine: the loop lets them in before its next step
        self._waiting_lock = threading.Lock()
        self._samples: Dict[str, SampleState] = {}  # engine key -> sample in flight
        self._groups: Dict[str, List[Optional[Any]]] = {}  # gid -> its finished samples (None: running)
        self._done: List[Tuple[str, List[Any]]] = []  # finished groups not yet collected
        self._private: set = set()  # gids only a collect naming them returns
        self._error: Optional[BaseException] = None
        self._closed = False
        self.stats = {"steps": 0, "tokens": 0, "busy_s": 0.0, "resumed": 0, "restarted": 0, "discarded_tokens": 0}
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ callers
    @contextlib.contextmanager
    def engine(self) -> Iterator[None]:
        """Exclusive use of the engine, between two steps."""
        with self._waiting_lock:
            self._waiting += 1
        with self._cv:
            with self._waiting_lock:
                self._waiting -= 1
            yield
            self._cv.notify_all()

    def submit(self, groups: List[GroupRequest], private: bool = False) -> None:
        """``private``: only a :meth:`collect` that names their gids returns these groups (an
        in-actor caller waiting for its own, beside the stream)."""
        with self.engine():
            for g in groups:
                if g.gid in self._groups:
                    raise ValueError(f"group {g.gid} submitted twice")
                self._groups[g.gid] = [None] * g.n
                if private:
                    self._private.add(g.gid)
                for i in range(g.n):
                    self._add(SampleState(g, i))

    def collect(self, wait_s: float, gids: Optional[set] = None, linger: float = 0.02) -> List[Tuple[str, List[Any]]]:
        """Finished groups ``(gid, samples)``, waiting up to ``wait_s`` for the first: those in
        ``gids``, or when None every one that is not private (then, once one is there, ``linger``
        seconds more for others while groups are still decoding); the others stay for the next call."""
        deadline = time.monotonic() + wait_s
        wanted = (lambda gid: gid not in self._private) if gids is None else (lambda gid: gid in gids)
        with self._cv:
            while True:
                if self._error is not None:
                    raise RuntimeError(f"engine loop failed: {self._error}") from self._error
                mine = [d for d in self._done if wanted(d[0])]
                left = deadline - time.monotonic()
                if mine and gids is None and self._groups and linger > 0:
                    # groups tend to finish a few engine steps apart: one answer for several saves
                    # the caller a round trip (and a reward call) per group
                    self._cv.wait(linger)
                    linger = 0.0
                    continue
                if mine or left <= 0:
                    self._done = [d for d in self._done if not wanted(d[0])]
                    self._private.difference_update(d[0] for d in mine)
                    return mine
                self._cv.wait(left)

    def abort(self, gids: List[str]) -> int:
        """Drop these groups wherever they are (running, or finished and not collected)."""
        gids = set(gids)
        with self.engine():
            keys = [k for k, s in self._samples.items() if s.group.gid in gids]
            self.engine_api.abort(keys)
            for k in keys:
                del self._samples[k]
            self._done = [d for d in self._done if d[0] not in gids]
            for g in gids:
                self._groups.pop(g, None)
            return len(keys)

    def in_flight(self) -> int:
        """Groups submitted and not yet collected."""
        with self._cv:
            return len(self._groups)

    def swap_weights(self, receive: Callable[[], int]) -> int:
        """Between two engine steps: ``receive()`` the broadcast (returns its version), then
        continue or restart every unfinished sample under it (``generator.partial_rollout``)."""
        with self.engine():
            running = list(self._samples.values())
            unsent = getattr(self.engine_api, "unsent", None)  # tokens drawn since a request last reported
            for key, (ids, lps) in (unsent([s.key for s in running]) if unsent else {}).items():
                self._samples[key].extend(Delta(key, ids, lps, False), self.version)
                self.stats["tokens"] += len(ids)
            self.engine_api.abort([s.key for s in running])
            self._samples.clear()
            self.version = int(receive())
            for s in running:
                if self.partial_rollout == "abort" and s.token_ids:
                    self.stats["discarded_tokens"] += len(s.token_ids)
                    s.token_ids, s.logprobs, s.spans = [], [], []
                    self.stats["restarted"] += 1
                elif s.token_ids:
                    self.stats["resumed"] += 1
                s.segment += 1
                self._add(s)
            return self.version

    def close(self) -> None:
        with self.engine():
            self.engine_api.abort(list(self._samples))
            self._samples.clear()
            self._closed = True

    # ------------------------------------------------------------------ the loop
    def _add(self, s: SampleState) -> None:
        prompt, spec = s.request()
        self._samples[s.key] = s
        self.engine_api.add(s.key, prompt, spec)

    def _run(self) -> None:
        try:
            while True:
                with self._cv:
                    self._cv.wait_for(lambda: self._closed or (self._waiting == 0 and bool(self._samples)))
                    if self._closed:
                        return
                    t0 = time.perf_counter()
                    deltas = self.engine_api.step()
                    self.stats["steps"] += 1
                    self.stats["busy_s"] += time.perf_counter() - t0
                    if self._apply(deltas):
                        self._cv.notify_all()
        except BaseException as e:  # noqa: BLE001 - surfaced to the next collect()
            with self._cv:
                self._error = e
                self._cv.notify_all()

    def _apply(self, deltas: List[Delta]) -> bool:
        finished_group = False
        for d in deltas:
            s = self._samples.get(d.key)
            if s is None:  # aborted meanwhile
                continue
            s.extend(d, self.version)
            self.stats["tokens"] += len(d.token_ids)
            if not d.finished:
                continue
            del self._samples[d.key]
            slots = self._groups.get(s.group.gid)
            if slots is None:
                continue
            slots[s.index] = self.make_sample(s)
            if all(x is not None for x in slots):
                del self._groups[s.group.gid]
                self._done.append((s.group.gid, slots))
                finished_group = True
        return finished_group
