"""A receiver's memory plan: how many bucket buffers its device must hold beside the engine, and
where a tensor larger than a bucket is reassembled (on the device, or through one pinned host
buffer). Decided once at join, so a bucket size that does not fit fails there in one line.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from dispo_ray.sync.buckets import RECV_AHEAD, ParamSpec, bucket_nbytes, direct_bytes_for, plan_buckets
from dispo_ray.sync.errors import WeightSyncError
from dispo_ray.sync.transport import WeightSyncGroup

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
