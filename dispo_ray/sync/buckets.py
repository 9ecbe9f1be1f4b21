"""The manifest and the bucket plan both sides of a sync derive from it: which tensors travel
together, in which byte layout (each tensor 16-byte aligned in a flat uint8 buffer), and in how many
pieces a tensor larger than a bucket crosses the wire. Pure functions of the manifest, the bucket
size and the backend, so sender and receivers agree without talking (the header checks they did).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterable, Iterator, List, Optional, Sequence, Tuple

import torch

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

    gloo (CPU): packing is a host memcpy that costs about as much as the loopback transfer it
    feeds, while one more collective is cheap, so tensors of >= 256 KiB (every weight matrix of a
    real model) go as they are and only norms and biases are packed (measured: docs/architecture.md).
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
