"""Weight-sync protocol: learner rank 0 broadcasts the policy to every generator worker.

The group lives outside the DeepSpeed world: rank 0 is learner rank 0 (it hosts the rendezvous
store), ranks 1..N are the generator workers. Backends share one small surface
(:class:`WeightSyncGroup`, in :mod:`dispo_ray.sync.transport` with the readiness gate): ``gloo``
over a private ``TCPStore`` on CPU, ``nccl`` through vLLM's ``StatelessProcessGroup`` +
``PyNcclCommunicator`` on GPU (vLLM 0.32 API). This module is the protocol, the same on both.

One sync, both sides walking the same manifest (names, shapes, dtypes in a fixed order):

    0. readiness         every receiver declares itself ready; the sender waits for all, then
                         releases them (no deadline-bounded collective starts before that)
    1. header broadcast  [version, n_buckets, manifest digest, total bytes, bucket bytes] (int64)
    2. agreement         all-reduce(min) of "my manifest and plan match" -> both sides fail loudly
    3. bucket k = 0..n-1 the bucket's tensors packed into one flat byte buffer, broadcast (a
                         tensor larger than a bucket: in pieces of ``bucket_bytes``)
    4. completion        all-reduce(min) once every rank has every bucket

Buckets are planned greedily in manifest order up to ``bucket_bytes`` (a larger tensor, or on
gloo any tensor of >= 256 KiB, gets a bucket of its own and goes unpacked: :func:`direct_bytes_for`;
the plan lives in :mod:`dispo_ray.sync.buckets`, a receiver's memory plan in :mod:`dispo_ray.sync.memory`),
so the sender can gather one bucket at a time (ZeRO-3) and never holds the whole model. Both sides
pipeline: the sender keeps ``SEND_AHEAD`` broadcasts in flight while it packs the next bucket
into a persistent staging buffer; each receiver keeps ``RECV_AHEAD`` receives posted while its
consumer loads an earlier bucket. Every collective has a deadline; a failure raises
:class:`WeightSyncError` naming the phase, the bucket, the version and this rank, never hangs.
"""
from __future__ import annotations

import collections
import time
from typing import Any, Callable, Deque, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

# One import surface for the protocol's users: the bucket plan, the receive plan and the transport
# (group, readiness gate, errors, ports) are re-exported here.
from dispo_ray.sync.buckets import (RECV_AHEAD, SEND_AHEAD, ParamSpec, bucket_nbytes,  # noqa: F401
                                    direct_bytes_for, make_manifest, manifest_digest, pack, plan_buckets,
                                    unpack, wire_chunks)
from dispo_ray.sync.memory import (RECV_RESERVE_BYTES, ReceivePlan, large_tensor_bytes,  # noqa: F401
                                   max_bucket_bytes, plan_receive, receive_plan_for)
from dispo_ray.sync.transport import (SyncGate, WeightSyncError, WeightSyncGroup,  # noqa: F401
                                      find_free_port, local_ip)


def _guard(group: WeightSyncGroup, phase: str, version: int, fn: Callable[[], None]) -> None:
    try:
        fn()
    except WeightSyncError:
        raise
    except Exception as e:
        raise WeightSyncError(f"weight sync {phase} of version {version} failed on {group.peer}: {e}") from e


def _all_ok(group: WeightSyncGroup, ok: bool, phase: str, version: int) -> bool:
    """All-reduce(min) of every rank's flag: True only if every rank said ok."""
    flag = torch.tensor([1 if ok else 0], dtype=torch.int64, device=group.device)
    _guard(group, phase, version, lambda: group.all_reduce_min(flag, phase))
    return int(flag.item()) == 1


def _agree(group: WeightSyncGroup, ok: bool, version: int) -> None:
    if not _all_ok(group, ok, "manifest agreement", version):
        raise WeightSyncError(f"weight sync of version {version}: manifests differ between sender and "
                              f"receivers (seen on {group.peer}); both sides must walk the same names, "
                              "shapes and dtypes")


def _complete(group: WeightSyncGroup, version: int) -> None:
    """Every rank, after the last bucket: a sent broadcast only means the bytes left this process
    (TCP buffers them), so the sender learns here that every receiver has them all, and a peer
    that died mid-sync fails the sync on the sender too."""
    _all_ok(group, True, "completion", version)


class SyncSender:
    """Sender side (rank 0). Call ``begin(version)``, ``send_bucket`` once per planned bucket in
    order, then ``end()``. The caller supplies each bucket's tensors, so it can gather lazily.

    ``begin`` first waits until every receiver is ready (``ready_timeout_s``, None: no deadline;
    see :mod:`dispo_ray.sync.transport`), so no deadline-bounded collective starts while a
    receiver is still busy; every collective after that has the group's ``timeout_s``."""

    def __init__(self, group: WeightSyncGroup, manifest: Sequence[ParamSpec], bucket_bytes: int,
                 stable: bool = False, direct_bytes: Optional[int] = None,
                 ready_timeout_s: Optional[float] = None):
        if group.rank != 0:
            raise ValueError("SyncSender runs on rank 0 of the weight-sync group")
        self.group, self.manifest, self.bucket_bytes = group, list(manifest), int(bucket_bytes)
        if direct_bytes is None:
            direct_bytes = direct_bytes_for(group.backend)
        self.buckets = plan_buckets(self.manifest, bucket_bytes, direct_bytes)
        self.digest = manifest_digest(self.manifest)
        self.stable = stable  # tensors stay valid until end(): unpacked ones may stay in flight
        self.ready_timeout_s = ready_timeout_s
        self.version, self._next, self.bytes_sent, self._t0 = -1, 0, 0, 0.0
        self._in_flight: Deque[Tuple[Any, torch.Tensor, int]] = collections.deque()  # (handle, buffer, bucket)

    @property
    def in_flight(self) -> int:
        """Broadcasts started and not yet completed."""
        return len(self._in_flight)

    def begin(self, version: int) -> None:
        self.version, self._next, self.bytes_sent = version, 0, 0
        self._in_flight.clear()
        self.group.wait_ready_and_go(self.ready_timeout_s)
        self._t0 = time.perf_counter()  # the sync's own time, without the receivers' readiness
        total = sum(bucket_nbytes(b) for b in self.buckets)
        header = torch.tensor([version, len(self.buckets), self.digest, total, self.bucket_bytes],
                              dtype=torch.int64, device=self.group.device)
        _guard(self.group, "header", version, lambda: self.group.broadcast(header, 0, "header"))
        _agree(self.group, True, version)

    def send_bucket(self, tensors: Sequence[torch.Tensor]) -> None:
        k = self._next
        bucket = self.buckets[k]
        if len(tensors) != len(bucket) or any(tuple(t.shape) != p.shape for t, p in zip(tensors, bucket)):
            raise WeightSyncError(f"weight sync: bucket {k} tensors do not match the manifest "
                                  f"({[p.name for p in bucket][:3]}...)")
        direct = len(tensors) == 1 and tensors[0].is_contiguous() and tensors[0].device == self.group.device
        if direct:  # a tensor alone in its bucket goes out as it is, no copy
            flat = tensors[0].detach().reshape(-1).view(torch.uint8)
        elif len(tensors) == 1 and bucket_nbytes(bucket) > self.bucket_bytes:
            # larger than any staging buffer: one contiguous copy of ours on the group's device
            flat = tensors[0].detach().to(self.group.device).contiguous().reshape(-1).view(torch.uint8)
        else:
            # SEND_AHEAD + 1 staging buffers rotate: bucket k packs into one while at most
            # SEND_AHEAD earlier broadcasts are still in flight (none of them from this slot).
            staging = self.group.staging(k % (SEND_AHEAD + 1), bucket_nbytes(bucket))
            flat = pack([t.to(self.group.device) for t in tensors], self.group.device, out=staging)
        for off, n in wire_chunks(flat.numel(), self.bucket_bytes):
            self._in_flight.append((self._start(flat[off:off + n], k), flat, k))
        # the caller may release an unpacked tensor once we return (ZeRO-3 re-partitions a
        # gathered parameter): then it must be on the wire by then
        self._finish_in_flight(keep=0 if direct and not self.stable else SEND_AHEAD)
        self.bytes_sent += flat.numel()
        self._next += 1

    def _start(self, flat: torch.Tensor, k: int) -> Any:
        out: List[Any] = []
        _guard(self.group, f"bucket {k}/{len(self.buckets)}", self.version,
               lambda: out.append(self.group.broadcast_async(flat, 0)))
        return out[0]

    def _finish_in_flight(self, keep: int = 0) -> None:
        while len(self._in_flight) > keep:
            handle, _, k = self._in_flight.popleft()
            _guard(self.group, f"bucket {k}/{len(self.buckets)}", self.version,
                   lambda: self.group.wait(handle, f"bucket {k}"))

    def end(self) -> Dict[str, float]:
        self._finish_in_flight()
        if self._next != len(self.buckets):
            raise WeightSyncError(f"weight sync of version {self.version}: sent {self._next} of "
                                  f"{len(self.buckets)} buckets")
        _complete(self.group, self.version)
        seconds = time.perf_counter() - self._t0
        return {"sync/bytes": float(self.bytes_sent), "sync/seconds": seconds,
                "sync/buckets": float(len(self.buckets))}


def send_weights(group: WeightSyncGroup, manifest: Sequence[ParamSpec], tensors: Dict[str, torch.Tensor],
                 bucket_bytes: int, version: int, direct_bytes: Optional[int] = None,
                 ready_timeout_s: Optional[float] = None) -> Dict[str, float]:
    """One-shot sender for a process that holds every tensor (no ZeRO-3 gathering needed)."""
    sender = SyncSender(group, manifest, bucket_bytes, stable=True, direct_bytes=direct_bytes,
                        ready_timeout_s=ready_timeout_s)
    sender.begin(version)
    for bucket in sender.buckets:
        sender.send_bucket([tensors[p.name] for p in bucket])
    return sender.end()


def receive_weights(group: WeightSyncGroup, manifest: Sequence[ParamSpec], bucket_bytes: int,
                    direct_bytes: Optional[int] = None, plan: Optional[ReceivePlan] = None,
                    owned: bool = False) -> Tuple[int, Iterator[Tuple[str, torch.Tensor]]]:
    """Receiver side: declare this rank ready and wait (no deadline) for the sender to start,
    read the header, then yield ``(name, tensor)`` bucket by bucket.

    A bucket that fits ``bucket_bytes`` gets a fresh device buffer and the yielded tensors are
    views into it, so a consumer may keep them. A tensor larger than ``bucket_bytes`` arrives in
    ``bucket_bytes`` pieces and is reassembled as ``plan`` says (default: :func:`receive_plan_for`,
    measured now): in a device buffer of its own, or through the group's one persistent host buffer
    (pieces land in ``RECV_AHEAD + 1`` persistent piece buffers and are copied there). A tensor
    yielded from the persistent buffer is valid only until the consumer asks for the next one
    (``model.load_weights`` copies at once); a consumer that keeps tensors (vLLM's layerwise
    ``reload_weights`` holds a layer's until the layer is complete) passes ``owned=True`` and gets a
    copy. The iterator must be drained: the sender blocks until every bucket is received and the
    completion collective (run when the iterator is exhausted) has joined.
    """
    manifest = list(manifest)
    if direct_bytes is None:
        direct_bytes = direct_bytes_for(group.backend)
    buckets = plan_buckets(manifest, bucket_bytes, direct_bytes)
    if plan is None:
        plan = receive_plan_for(group, manifest, bucket_bytes, direct_bytes)
    group.arrive_and_wait_go()
    header = torch.zeros(5, dtype=torch.int64, device=group.device)
    _guard(group, "header", -1, lambda: group.broadcast(header, 0, "header"))
    version, n_buckets, digest, _, sent_bucket_bytes = (int(x) for x in header.tolist())
    _agree(group, n_buckets == len(buckets) and digest == manifest_digest(manifest)
           and sent_bucket_bytes == bucket_bytes, version)
    # one broadcast per (bucket, byte offset, length): a bucket that fits is one piece
    pieces = [(k, off, n) for k, b in enumerate(buckets) for off, n in wire_chunks(bucket_nbytes(b), bucket_bytes)]
    sizes = [bucket_nbytes(b) for b in buckets]
    staged = [n > bucket_bytes and not plan.large_on_device for n in sizes]
    buffers: Dict[int, torch.Tensor] = {}

    def _post(i: int) -> Tuple[Any, torch.Tensor]:
        k, off, n = pieces[i]
        if staged[k]:  # a piece buffer of its own, copied into the persistent host buffer on arrival
            target = group.staging(f"recv piece {i % (RECV_AHEAD + 1)}", bucket_bytes)[:n]
        else:
            if k not in buffers:
                buffers[k] = torch.empty(sizes[k], dtype=torch.uint8, device=group.device)
            target = buffers[k][off:off + n]
        out: List[Any] = []
        _guard(group, f"bucket {k}/{n_buckets}", version, lambda: out.append(group.broadcast_async(target, 0)))
        return out[0], target

    def _iter() -> Iterator[Tuple[str, torch.Tensor]]:
        # Keep RECV_AHEAD receives posted, so the sender never waits for this side to post one
        # while the consumer loads an earlier bucket into the engine.
        pending = collections.deque(_post(i) for i in range(min(RECV_AHEAD, len(pieces))))
        for i, (k, off, n) in enumerate(pieces):
            handle, target = pending.popleft()
            _guard(group, f"bucket {k}/{n_buckets}", version, lambda: group.wait(handle, f"bucket {k}"))
            if i + RECV_AHEAD < len(pieces):
                pending.append(_post(i + RECV_AHEAD))
            if staged[k]:
                # the consumer is done with the previous tensor from this buffer: it asked for more
                host = group.host_staging(max(plan.staging_bytes, sizes[k]))
                host[off:off + n].copy_(target, non_blocking=target.is_cuda)
                if off + n == sizes[k]:
                    if target.is_cuda:  # the device-to-host copies have landed
                        torch.cuda.current_stream(target.device).synchronize()
                    for name, t in unpack(host[:sizes[k]], buckets[k]):
                        yield name, (t.clone() if owned else t)
            elif off + n == sizes[k]:
                yield from unpack(buffers.pop(k), buckets[k])
        _complete(group, version)

    return version, _iter()
