"""What every generation backend shares: sampling settings, the per-sample result, and the
receiving end of the weight broadcast.

A backend only wraps its engine's calls: ``generate(prompt_token_ids, n, spec)`` returning, per
prompt, ``n`` :class:`Completion` (sampled ids, the log-prob of each sampled token, finish
reason) in sample order; joining the weight-sync group; receiving one broadcast into the running
engine. Everything else (records, versions, accounting) lives once in ``actors.generator``.

A backend with an engine-level API (``vllm``) also offers the :class:`Stepping` calls that
streaming rollouts drive (``actors.streaming``): add one sample's request, advance the engine one
step (every running request gains a token; :class:`Delta` s come back), abort requests. A backend
without one (``hf``) is driven through its ``generate`` by ``actors.streaming.BatchStepper``.

Log-prob convention (both backends): ``log softmax`` of the logits *after* temperature and top-p
(the distribution the token was actually drawn from), at the sampled token; with temperature 0
(greedy) the raw logits. With ``temperature = 1, top_p = 1`` this is ``log pi_theta(token)``
exactly as a plain forward pass computes it.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch

from dispo_ray.sync.protocol import WeightSyncGroup, receive_plan_for, receive_weights
from dispo_ray.sync.settings import SyncSettings


@dataclass
class SamplingSpec:
    temperature: float
    top_p: float
    max_new_tokens: int
    stop: List[str] = field(default_factory=list)
    seed: Optional[int] = None  # per-request seed: the same request draws the same samples

    @classmethod
    def from_config(cls, gen_cfg: Any, overrides: Optional[Dict[str, Any]] = None) -> "SamplingSpec":
        """``generator.*`` sampling defaults, with per-call ``overrides`` (e.g. ``{"temperature": 0}``)."""
        base = {f.name: getattr(gen_cfg, f.name) for f in fields(cls)}
        for k, v in (overrides or {}).items():
            if k not in base:
                raise ValueError(f"sampling override {k!r}: must be one of {', '.join(base)}")
            base[k] = v
        if "seed" not in (overrides or {}):
            base["seed"] = None  # generator.seed seeds the engine; a request seed is per call
        spec = cls(float(base["temperature"]), float(base["top_p"]), int(base["max_new_tokens"]),
                   list(base["stop"] or []), None if base["seed"] is None else int(base["seed"]))
        if spec.temperature < 0 or not 0 < spec.top_p <= 1 or spec.max_new_tokens < 1:
            raise ValueError(f"sampling {spec}: need temperature >= 0, top_p in (0, 1], max_new_tokens >= 1")
        return spec


@dataclass
class Completion:
    token_ids: List[int]
    logprobs: List[float]
    finish_reason: str  # "stop" (eos or a stop string) | "length"


@dataclass
class Delta:
    """What one engine step added to one request: the new tokens and their log-probs; on the
    step that ends it, ``finished`` and the reason ("stop" | "length")."""
    key: str
    token_ids: List[int]
    logprobs: List[float]
    finished: bool
    finish_reason: str = ""


class Stepping:
    """The engine-level calls (one request = one sample, ``n = 1``)."""

    def add(self, key: str, prompt_token_ids: List[int], spec: SamplingSpec) -> None:
        raise NotImplementedError

    def step(self) -> List[Delta]:
        raise NotImplementedError

    def abort(self, keys: List[str]) -> None:
        raise NotImplementedError

    def has_unfinished(self) -> bool:
        raise NotImplementedError


class WeightReceiver:
    """One generator rank of the weight-sync group (rank 0 is the learner).

    :meth:`receive` reads one broadcast and hands ``(name, tensor)`` pairs to ``load`` as they
    arrive bucket by bucket; names in ``skip`` (e.g. a tied ``lm_head.weight``) are received but
    not loaded. The stream is always drained, so the sender never blocks on this rank.
    """

    def __init__(self, settings: SyncSettings, rank: int, device: Optional[torch.device] = None):
        self.manifest = settings.specs()
        self.bucket_bytes, self.rank = int(settings.bucket_bytes), rank
        self.group = WeightSyncGroup.for_settings(settings, rank, device=device)
        # measured once the engine holds its memory: a bucket size that does not fit fails here,
        # at join, in one line naming learner.sync_bucket_mb
        try:
            self.plan = receive_plan_for(self.group, self.manifest, self.bucket_bytes)
        except Exception:
            self.group.close()
            raise

    def receive(self, load: Callable[[Iterable[Tuple[str, torch.Tensor]]], Any],
                skip: Iterable[str] = (), owned: bool = False) -> int:
        """``owned``: ``load`` keeps the tensors it is given beyond the next one (see
        :func:`dispo_ray.sync.protocol.receive_weights`)."""
        skip = set(skip)
        version, stream = receive_weights(self.group, self.manifest, self.bucket_bytes, plan=self.plan, owned=owned)
        load((name, t) for name, t in stream if name not in skip)
        for _ in stream:  # whatever ``load`` left unread
            pass
        return version

    def close(self) -> None:
        self.group.close()


class ReceivingBackend:
    """The receiving end every backend shares (the one receiver-side implementation): join the group
    as rank ``rank`` (:meth:`init_weight_sync`), read one broadcast into the engine
    (:meth:`_receive`, called by the backend's ``receive_weights`` with its own ``load``), leave it
    (:meth:`close_weight_sync`). A backend whose model runs in this process (``hf``) uses it as it
    is; one whose model runs in engine workers (``vllm``) forwards the same calls to them, where a
    :class:`WeightReceiver` does the work (``actors.backends.vllm_worker_ext``)."""

    sync_ranks = 1  # ranks of the weight-sync group this backend takes (one per model worker)
    receiver: Optional[WeightReceiver] = None

    def sync_device(self, backend: str) -> Optional[torch.device]:
        """The device an ``nccl`` group binds to (None: the group's default)."""
        return None

    def init_weight_sync(self, settings: SyncSettings, rank: int) -> List[int]:
        """Join as ranks ``rank .. rank + sync_ranks - 1``; blocks until every rank joined."""
        self.receiver = WeightReceiver(settings, rank, device=self.sync_device(settings.backend))
        return [rank]

    def _receive(self, load: Callable[[Iterable[Tuple[str, torch.Tensor]]], Any], **kw: Any) -> int:
        if self.receiver is None:
            raise RuntimeError("receive_weights before init_weight_sync")
        return self.receiver.receive(load, **kw)

    def close_weight_sync(self) -> None:
        if self.receiver is not None:
            self.receiver.close()
            self.receiver = None
