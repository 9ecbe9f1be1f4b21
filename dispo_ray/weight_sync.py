"""Weight-sync protocol: learner rank 0 broadcasts the policy to every generator worker.

The group lives outside the DeepSpeed world: rank 0 is learner rank 0 (it hosts the rendezvous
store), ranks 1..N are the generator workers. Backends share one small surface
(:class:`WeightSyncGroup`): ``gloo`` over a private ``TCPStore`` on CPU, ``nccl`` through vLLM's
``StatelessProcessGroup`` + ``PyNcclCommunicator`` on GPU (vLLM 0.32 API).

One sync, both sides walking the same manifest (names, shapes, dtypes in a fixed order):

    1. header broadcast  [version, n_buckets, manifest digest, total bytes]   (int64)
    2. agreement         all-reduce(min) of "my manifest matches" flags -> both sides fail loudly
    3. bucket k = 0..n-1 the bucket's tensors packed into one flat byte buffer, broadcast
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
import socket
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Deque, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch

SEND_AHEAD = 2  # broadcasts the sender keeps in flight while it packs / gathers the next bucket
RECV_AHEAD = 2  # receives a receiver keeps posted while its consumer loads an earlier bucket
_ALIGN = 16  # byte alignment of each tensor in a bucket, so dtype views are always legal


class WeightSyncError(RuntimeError):
    """A weight-sync collective failed or timed out."""


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


def find_free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def local_ip() -> str:
    """This node's address as Ray sees it (loopback when Ray is not running)."""
    try:
        import ray
        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except Exception:
        pass
    return "127.0.0.1"


class WeightSyncGroup:
    """A broadcast group of ``world_size`` processes; rank 0 hosts the store at ``host:port``."""

    def __init__(self, backend: str, host: str, port: int, rank: int, world_size: int,
                 timeout_s: float = 120.0, device: Optional[torch.device] = None):
        if backend not in ("gloo", "nccl"):
            raise ValueError(f"weight sync backend must be gloo or nccl, got {backend!r}")
        self.backend, self.rank, self.world_size, self.timeout_s = backend, rank, world_size, timeout_s
        self._staging: Dict[int, torch.Tensor] = {}  # slot -> persistent pack buffer (sender)
        self.peer = f"rank {rank}/{world_size} at {host}:{port}"
        try:
            if backend == "gloo":
                self.device = torch.device("cpu")
                store = torch.distributed.TCPStore(host, port, world_size, is_master=(rank == 0),
                                                   timeout=timedelta(seconds=timeout_s))
                self._pg = torch.distributed.ProcessGroupGloo(store, rank, world_size,
                                                              timedelta(seconds=timeout_s))
            else:
                from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
                from vllm.distributed.utils import StatelessProcessGroup

                self.device = device or torch.device("cuda", torch.cuda.current_device())
                self._spg = StatelessProcessGroup.create(host=host, port=port, rank=rank, world_size=world_size,
                                                         store_timeout=int(timeout_s))
                self._comm = PyNcclCommunicator(self._spg, device=self.device)
        except Exception as e:
            raise WeightSyncError(f"weight sync: joining the group failed on {self.peer}: {e}") from e

    def _wait(self, what: str, work=None) -> None:
        if self.backend == "gloo":
            if not work.wait(timedelta(seconds=self.timeout_s)):
                raise TimeoutError(f"{what} timed out after {self.timeout_s}s")
            return
        event = torch.cuda.Event()
        event.record()
        deadline = time.monotonic() + self.timeout_s
        while not event.query():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} timed out after {self.timeout_s}s")
            time.sleep(0.0005)

    def staging(self, slot: int, nbytes: int) -> torch.Tensor:
        """A persistent uint8 buffer of at least ``nbytes`` for ``slot``, kept across syncs.

        Why: a fresh 32 MB CPU buffer per bucket is a fresh mmap whose first touch page-faults
        and zero-fills every page, which costs about twice the pack copy itself."""
        buf = self._staging.get(slot)
        if buf is None or buf.numel() < nbytes:
            buf = self._staging[slot] = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        return buf

    def broadcast_async(self, tensor: torch.Tensor, src: int = 0) -> Any:
        """Start a broadcast; finish it with :meth:`wait`. Lets packing overlap the transfer."""
        if self.backend == "gloo":
            opts = torch.distributed.BroadcastOptions()
            opts.rootRank, opts.rootTensor = src, 0
            return self._pg.broadcast([tensor], opts)
        self._comm.broadcast(tensor, src=src)  # enqueued on the current CUDA stream
        return None

    def wait(self, handle: Any, what: str = "broadcast") -> None:
        self._wait(what, handle)

    def broadcast(self, tensor: torch.Tensor, src: int = 0, what: str = "broadcast") -> None:
        self.wait(self.broadcast_async(tensor, src), what)

    def all_reduce_min(self, tensor: torch.Tensor, what: str = "all_reduce") -> None:
        if self.backend == "gloo":
            opts = torch.distributed.AllreduceOptions()
            opts.reduceOp = torch.distributed.ReduceOp.MIN
            self._wait(what, self._pg.allreduce([tensor], opts))
        else:
            # PyNccl's all_reduce writes to an out tensor; passing the input as out keeps it in place.
            self._comm.all_reduce(tensor, out_tensor=tensor, op=torch.distributed.ReduceOp.MIN)
            self._wait(what)

    def close(self) -> None:
        self._staging.clear()
        for attr in ("_comm", "_spg", "_pg"):
            if hasattr(self, attr):
                delattr(self, attr)


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
    order, then ``end()``. The caller supplies each bucket's tensors, so it can gather lazily."""

    def __init__(self, group: WeightSyncGroup, manifest: Sequence[ParamSpec], bucket_bytes: int,
                 stable: bool = False, direct_bytes: Optional[int] = None):
        if group.rank != 0:
            raise ValueError("SyncSender runs on rank 0 of the weight-sync group")
        self.group, self.manifest = group, list(manifest)
        if direct_bytes is None:
            direct_bytes = direct_bytes_for(group.backend)
        self.buckets = plan_buckets(self.manifest, bucket_bytes, direct_bytes)
        self.digest = manifest_digest(self.manifest)
        self.stable = stable  # tensors stay valid until end(): unpacked ones may stay in flight
        self.version, self._next, self.bytes_sent, self._t0 = -1, 0, 0, 0.0
        self._in_flight: Deque[Tuple[Any, torch.Tensor, int]] = collections.deque()  # (handle, buffer, bucket)

    def begin(self, version: int) -> None:
        self.version, self._next, self.bytes_sent, self._t0 = version, 0, 0, time.perf_counter()
        self._in_flight.clear()
        total = sum(bucket_nbytes(b) for b in self.buckets)
        header = torch.tensor([version, len(self.buckets), self.digest, total], dtype=torch.int64,
                              device=self.group.device)
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
        else:
            # SEND_AHEAD + 1 staging buffers rotate: bucket k packs into one while up to
            # SEND_AHEAD earlier buckets are still in flight from the others.
            staging = self.group.staging(k % (SEND_AHEAD + 1), bucket_nbytes(bucket))
            flat = pack([t.to(self.group.device) for t in tensors], self.group.device, out=staging)
        self._in_flight.append((self._start(flat, k), flat, k))
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
                 bucket_bytes: int, version: int, direct_bytes: Optional[int] = None) -> Dict[str, float]:
    """One-shot sender for a process that holds every tensor (no ZeRO-3 gathering needed)."""
    sender = SyncSender(group, manifest, bucket_bytes, stable=True, direct_bytes=direct_bytes)
    sender.begin(version)
    for bucket in sender.buckets:
        sender.send_bucket([tensors[p.name] for p in bucket])
    return sender.end()


def receive_weights(group: WeightSyncGroup, manifest: Sequence[ParamSpec], bucket_bytes: int,
                    direct_bytes: Optional[int] = None) -> Tuple[int, Iterator[Tuple[str, torch.Tensor]]]:
    """Receiver side: read the header now, then yield ``(name, tensor)`` bucket by bucket.

    Each bucket gets a fresh buffer and the yielded tensors are views into it, so a consumer may
    keep them. The iterator must be drained: the sender blocks until every bucket is received
    and the completion collective (run when the iterator is exhausted) has joined.
    """
    manifest = list(manifest)
    if direct_bytes is None:
        direct_bytes = direct_bytes_for(group.backend)
    buckets = plan_buckets(manifest, bucket_bytes, direct_bytes)
    header = torch.zeros(4, dtype=torch.int64, device=group.device)
    _guard(group, "header", -1, lambda: group.broadcast(header, 0, "header"))
    version, n_buckets, digest, _ = (int(x) for x in header.tolist())
    _agree(group, n_buckets == len(buckets) and digest == manifest_digest(manifest), version)

    def _post(k: int) -> Tuple[Any, torch.Tensor]:
        flat = torch.empty(bucket_nbytes(buckets[k]), dtype=torch.uint8, device=group.device)
        out: List[Any] = []
        _guard(group, f"bucket {k}/{n_buckets}", version, lambda: out.append(group.broadcast_async(flat, 0)))
        return out[0], flat

    def _iter() -> Iterator[Tuple[str, torch.Tensor]]:
        # Keep RECV_AHEAD receives posted, so the sender never waits for this side to post one
        # while the consumer loads an earlier bucket into the engine.
        pending = collections.deque(_post(k) for k in range(min(RECV_AHEAD, len(buckets))))
        for k, bucket in enumerate(buckets):
            handle, flat = pending.popleft()
            _guard(group, f"bucket {k}/{n_buckets}", version, lambda: group.wait(handle, f"bucket {k}"))
            if k + RECV_AHEAD < len(buckets):
                pending.append(_post(k + RECV_AHEAD))
            yield from unpack(flat, bucket)
        _complete(group, version)

    return version, _iter()
