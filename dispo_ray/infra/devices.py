"""Which accelerator each actor computes on and which backend the weight sync speaks, decided in
one place from the configuration (what Ray was asked to grant), never from what a process
happens to see.

Why not ``torch.cuda.is_available()``: Ray leaves ``CUDA_VISIBLE_DEVICES`` alone for an actor
that asked for 0 GPUs, so a CPU actor on a GPU node sees every GPU of the node. Deciding from
that, a CPU learner would take ``cuda:0`` outside Ray's accounting and speak NCCL to generators
that speak gloo (or the reverse), which hangs until a timeout. Here:

* :func:`uses_cuda`: an actor computes on CUDA iff its pool asked Ray for GPUs;
* :func:`sync_backend`: ``nccl`` iff both the learner and the generators compute on CUDA, else
  ``gloo`` (a CUDA side then stages through host memory). The driver calls it once and passes the
  answer to both sides; a rank that joins with another backend fails at group formation with one
  line (:mod:`dispo_ray.infra.sync_transport`), and both sides derive the same bucket plan from it;
* :func:`assigned_cuda_index`: the local CUDA index of the GPU Ray assigned to this process;
* :func:`learner_world_timeout_s`: the DeepSpeed world's collective timeout, longer than any
  weight-sync deadline (see there).
"""
from __future__ import annotations

import os
from typing import Any, Sequence


def uses_cuda(num_gpus_per_actor: float) -> bool:
    return float(num_gpus_per_actor) > 0


def sync_backend(cfg: Any) -> str:
    """The weight-sync backend of this configuration (see the module docstring)."""
    both = uses_cuda(cfg.learner.num_gpus_per_actor) and uses_cuda(cfg.generator.num_gpus_per_actor)
    return "nccl" if both else "gloo"


def cuda_index_of(gpu_id: Any, visible: str | None) -> int:
    """Local CUDA index of the GPU with Ray id ``gpu_id`` given ``CUDA_VISIBLE_DEVICES``.

    Ray's ids are entries of the ``CUDA_VISIBLE_DEVICES`` the node started with. When Ray narrows
    the variable for the actor (its default) the id is the only entry (index 0); with
    ``RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES=1`` the variable is the node's, and the index is
    the id's position in it (or the id itself when the variable is unset)."""
    gid = str(gpu_id).strip()
    entries = [v.strip() for v in visible.split(",") if v.strip()] if visible else []
    if not entries:
        return int(gid)
    if gid not in entries:
        raise RuntimeError(f"Ray assigned GPU {gid}, which is not in CUDA_VISIBLE_DEVICES={visible!r}")
    return entries.index(gid)


def assigned_cuda_index(gpu_ids: Sequence[Any] | None = None) -> int:
    """The CUDA index this process must use: its first Ray-assigned GPU (``ray.get_gpu_ids()``),
    located in ``CUDA_VISIBLE_DEVICES`` by :func:`cuda_index_of`. Outside a Ray worker: the
    current device."""
    import torch

    if gpu_ids is None:
        import ray
        gpu_ids = ray.get_gpu_ids() if ray.is_initialized() else []
    if not gpu_ids:
        if not torch.cuda.is_available():
            raise RuntimeError("no GPU: Ray assigned none to this process and CUDA is not available")
        return torch.cuda.current_device()
    return cuda_index_of(gpu_ids[0], os.environ.get("CUDA_VISIBLE_DEVICES"))


def learner_world_timeout_s(sync_timeout_s: float) -> float:
    """Collective timeout of the DeepSpeed world. Under ZeRO-3 the other learner ranks wait in a
    bucket's all-gather while rank 0 broadcasts the previous one under ``sync_timeout_s``; their
    wait must outlast rank 0's deadline, so that rank 0's error (naming bucket, version, rank) is
    the one raised and no rank gives up on a sync rank 0 is still allowed to finish."""
    return max(300.0, 2.0 * float(sync_timeout_s) + 60.0)
