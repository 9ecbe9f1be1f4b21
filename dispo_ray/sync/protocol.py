"""Weight-sync protocol: learner rank 0 broadcasts the policy to every generator worker.

The group lives outside the DeepSpeed world: rank 0 is learner rank 0 (it hosts the rendezvous
store), ranks 1..N are the generator workers. Backends share one small surface
(:class:`WeightSyncGroup`, in :mod:`dispo_ray.infra.sync_transport` with the readiness gate): ``gloo``
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
gloo any tensor of >= 256 KiB, gets a bucket of its own and goes unpacked: :func:`direct_bytes_for`),
so the sender can gather one bucket at a time (ZeRO-3) and never holds the whole model. Both sides
pipeline: the sender keeps ``SEND_AHEAD`` broadcasts in flight while it packs the next bucket
into a persistent staging buffer; each receiver keeps ``RECV_AHEAD`` receives posted while its
consumer loads an earlier bucket. Every collective has a deadline; a failure raises
:class:`WeightSyncError` naming the phase, the bucket, the version and this rank, never hangs.
"""
from __future__ import annotations

import collections
import hashlib
import time
from dataclasses import dataclass
from typing import Any, Callable, Deque, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch

# the transport (group, readiness gate, errors) lives in dispo_ray.infra.sync_transport; re-exported here
from dispo_ray.infra.sync_transport import (SyncGate, WeightSyncError, WeightSyncGroup,  # noqa: F401
                                      find_free_port, local_ip)

SEND_AHEAD = 2  # broadcasts the sender keeps in flight while it packs / gathers the next bucket
RECV_AHEAD = 2  # receives a receiver keeps posted while its consumer loads an earlier bucket
_ALIGN = 16  # byte alignment of each tensor in a bucket, so dtype views are always legal


@dataclass(frozen=True)
class ParamSpec:
    name: str
    shape: Tuple[int, ...]
    dtype: str  # torch dtype name without the "torch." prefix, e.g. "float32"

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.torch_dtype).element_size()


def make_manifest(named_tensors: Iterable[Tuple[str, torch.Tensor]]) -> List[ParamSpec]:
    return [ParamSpec(n, tuple(t.shape), str(t.dtype).replace("torch.", "")) for n, t in named_tensors]


def manifest_digest(manifest: Sequence[ParamSpec]) -> int:
    text = "|".join(f"{p.name}:{p.shape}:{p.dtype}" for p in manifest)
    return int.from_bytes(hashlib.sha1(text.encode()).digest()[:7], "little")  # fits int64


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def direct_bytes_for(backend: str) -> int:
    """Tensors of at least this many bytes travel unpacked, each as a bucket of its own (0: none).

    gloo (CPU): packing is a host memcpy (~5 GB/s) that costs about as much as the loopback
    transfer it feeds (~1.5-2 GB/s), while one more collective costs ~40 us: the break-even is
    near 200 KB, so tensors of >= 256 KiB (every weight matrix of a real model) go as they are
    and only norms and biases are packed. Measured on the bench payload: 0.7 of a raw broadcast
    packing everything, 0.9+ with this threshold (bench_sync).
    nccl: packing is a device copy an order of magnitude faster than the link, and fewer, larger
    collectives are what NCCL is fast at, so every bucket is packed up to ``bucket_bytes``.
    """
    return 256 << 10 if backend == "gloo" else 0


def plan_buckets(manifest: Sequence[ParamSpec], bucket_bytes: int,
                 direct_bytes: int = 0) -> List[List[ParamSpec]]:
    """Buckets in manifest order: greedily packed up to ``bucket_bytes``; a tensor larger than
    that, or at least ``direct_bytes`` (when > 0), gets a bucket of its own."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be > 0, got {bucket_bytes}")
    buckets: List[List[ParamSpec]] = []
    current: List[ParamSpec] = []
    size = 0
    for p in manifest:
        need = _aligned(p.nbytes)
        if 0 < direct_bytes <= p.nbytes:
            if current:
                buckets.append(current)
                current, size = [], 0
            buckets.append([p])
            continue
        if current and size + need > bucket_bytes:
            buckets.append(current)
            current, size = [], 0
        current.append(p)
        size += need
    if current:
        buckets.append(current)
    return buckets


def wire_chunks(nbytes: int, bucket_bytes: int) -> List[Tuple[int, int]]:
    """The broadcasts carrying one bucket of ``nbytes``: ``(offset, length)`` pieces of at most
    ``bucket_bytes`` (only a lone tensor larger than a bucket has more than one)."""
    if nbytes <= bucket_bytes:
        return [(0, nbytes)]
    return [(off, min(bucket_bytes, nbytes - off)) for off in range(0, nbytes, bucket_bytes)]


def _packed_size(sizes: Sequence[int]) -> int:
    """Each tensor starts aligned; no padding after the last (a one-tensor bucket is its bytes)."""
    return sum(_aligned(n) for n in sizes[:-1]) + (sizes[-1] if sizes else 0)


def bucket_nbytes(bucket: Sequence[ParamSpec]) -> int:
    return _packed_size([p.nbytes for p in bucket])


def pack(tensors: Sequence[torch.Tensor], device: Optional[torch.device] = None,
         out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Concatenate tensors' bytes (each start aligned) into one flat uint8 buffer (``out``'s
    first bytes when given, else a new one)."""
    device = device or (tensors[0].device if tensors else torch.device("cpu"))
    size = _packed_size([t.numel() * t.element_size() for t in tensors])
    if out is not None and out.numel() < size:
        raise ValueError(f"pack: out has {out.numel()} bytes, the bucket needs {size}")
    flat = out[:size] if out is not None else torch.empty(size, dtype=torch.uint8, device=device)
    off = 0
    for t in tensors:
        n = t.numel() * t.element_size()
        # Copy in the tensor's own dtype (offsets are aligned): about twice a byte-wise copy's speed.
        flat[off:off + n].view(t.dtype).copy_(t.detach().reshape(-1))
        off += _aligned(n)
    return flat


def unpack(flat: torch.Tensor, bucket: Sequence[ParamSpec]) -> Iterator[Tuple[str, torch.Tensor]]:
    """Views of ``flat`` as the bucket's tensors (no copy)."""
    off = 0
    for p in bucket:
        yield p.name, flat[off:off + p.nbytes].view(p.torch_dtype).view(p.shape)
        off += _aligned(p.nbytes)


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
    see :mod:`dispo_ray.infra.sync_transport`), so no deadline-bounded collective starts while a
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


RECV_RESERVE_BYTES = 512 << 20  # device memory a receiver leaves untouched beyond its sync buffers


@dataclass(frozen=True)
class ReceivePlan:
    """How a receiver reassembles a tensor larger than a bucket (it arrives in pieces of
    ``bucket_bytes``): in a device buffer of its own (``large_on_device``), or through the group's
    one persistent host buffer of ``staging_bytes`` (:meth:`WeightSyncGroup.host_staging`)."""
    large_on_device: bool
    staging_bytes: int


def max_bucket_bytes(free_bytes: int, reserve_bytes: int = RECV_RESERVE_BYTES) -> int:
    """The largest bucket a GPU receiver can take with ``free_bytes`` free after its engine's
    allocation: ``RECV_AHEAD + 1`` bucket-sized buffers live at once (posted receives plus the one
    being loaded), beside ``reserve_bytes``."""
    return max(0, (int(free_bytes) - int(reserve_bytes)) // (RECV_AHEAD + 1))


def plan_receive(device_type: str, free_bytes: Optional[int], bucket_bytes: int, large_bytes: Sequence[int],
                 reserve_bytes: int = RECV_RESERVE_BYTES) -> ReceivePlan:
    """A receiver's memory plan for the buckets ``learner.sync_bucket_mb`` gives, within the device
    memory its engine leaves free (``free_bytes``, ``torch.cuda.mem_get_info`` after the engine
    started; vLLM takes ``gpu_memory_utilization`` of the GPU).

    CUDA: ``RECV_AHEAD + 1`` buckets must fit (else one line naming the key and the largest bucket
    that fits). Tensors larger than a bucket (``large_bytes``: a 7B model's embedding and LM head,
    1.1 GB each) are reassembled on the device when two of the largest fit beside them (the one
    being loaded and the next, already receiving), so they never cross host memory; otherwise
    through one persistent pinned host buffer of the largest one's size (one device-to-host and
    one host-to-device copy each, at DMA speed, and no allocation per tensor or per sync).
    Host (gloo): the device is the host; the persistent buffer saves a fresh mmap per tensor,
    whose page faults cost more than the copy."""
    largest = max((int(n) for n in large_bytes), default=0)
    if device_type != "cuda":
        return ReceivePlan(False, largest)
    need = (RECV_AHEAD + 1) * int(bucket_bytes) + int(reserve_bytes)
    if free_bytes is None or free_bytes < need:
        fits = max_bucket_bytes(free_bytes or 0, reserve_bytes) >> 20
        raise WeightSyncError(
            f"config key 'learner.sync_bucket_mb' = {int(bucket_bytes) >> 20}: a weight-sync receiver has "
            f"{(free_bytes or 0) >> 20} MiB of GPU memory free beside its engine and needs {RECV_AHEAD + 1} buckets "
            f"+ {int(reserve_bytes) >> 20} MiB; use sync_bucket_mb <= {fits} or a lower generator.gpu_memory_utilization")
    if largest == 0 or need + 2 * largest <= free_bytes:
        return ReceivePlan(True, 0)
    return ReceivePlan(False, largest)


def large_tensor_bytes(manifest: Sequence[ParamSpec], bucket_bytes: int, direct_bytes: int = 0) -> List[int]:
    """Sizes of the buckets that arrive in more than one piece (a tensor larger than a bucket)."""
    return [n for n in (bucket_nbytes(b) for b in plan_buckets(manifest, bucket_bytes, direct_bytes))
            if n > bucket_bytes]


def receive_plan_for(group: WeightSyncGroup, manifest: Sequence[ParamSpec], bucket_bytes: int,
                     direct_bytes: Optional[int] = None) -> ReceivePlan:
    """:func:`plan_receive` for this group's device, with its free memory measured now."""
    if direct_bytes is None:
        direct_bytes = direct_bytes_for(group.backend)
    free = torch.cuda.mem_get_info(group.device)[0] if group.device.type == "cuda" else None
    return plan_receive(group.device.type, free, bucket_bytes, large_tensor_bytes(manifest, bucket_bytes, direct_bytes))


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
