"""What every member of one weight-sync group must agree on, as one value.

The coordinator (:class:`dispo_ray.sync.coordinator.WeightSync`) builds a :class:`SyncSettings`
once per group formation and hands the same object to every member; each member adds only its own
rank. It crosses process boundaries as it is (Ray pickles it); vLLM's RPC, which serializes plain
values only, gets :meth:`SyncSettings.to_wire` and the worker rebuilds it with
:meth:`SyncSettings.from_wire`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Sequence, Tuple

Wire = Tuple[str, Tuple[int, ...], str]  # one manifest entry: (name, shape, dtype without "torch.")


def manifest_to_wire(manifest: Sequence[Any]) -> Tuple[Wire, ...]:
    """Plain tuples ``(name, shape, dtype)`` from ParamSpecs or tuples already plain."""
    out = []
    for p in manifest:
        name, shape, dtype = (p.name, p.shape, p.dtype) if hasattr(p, "name") else p
        out.append((str(name), tuple(int(d) for d in shape), str(dtype).replace("torch.", "")))
    return tuple(out)


@dataclass(frozen=True)
class SyncSettings:
    """One group: rank 0 (learner rank 0) hosts the rendezvous store at ``host:port``; ``world_size``
    ranks walk ``manifest`` (the tensors of one sync, in order) in buckets of ``bucket_bytes``; every
    collective wait has ``timeout_s``; all speak ``backend`` (``gloo`` | ``nccl``, decided once by
    :func:`dispo_ray.infra.devices.sync_backend`)."""
    host: str
    port: int
    world_size: int
    manifest: Tuple[Wire, ...]
    bucket_bytes: int
    timeout_s: float
    backend: str = "gloo"

    def __post_init__(self) -> None:
        object.__setattr__(self, "manifest", manifest_to_wire(self.manifest))
        if self.backend not in ("gloo", "nccl"):
            raise ValueError(f"weight sync backend must be gloo or nccl, got {self.backend!r}")

    def specs(self) -> List[Any]:
        """The manifest as :class:`~dispo_ray.sync.buckets.ParamSpec` s."""
        from dispo_ray.sync.buckets import ParamSpec
        return [ParamSpec(n, s, d) for n, s, d in self.manifest]

    def to_wire(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_wire(cls, wire: Dict[str, Any]) -> "SyncSettings":
        return cls(**wire)
