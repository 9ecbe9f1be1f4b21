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
  line (:mod:`dispo_ray.sync.transport`), and both sides derive the same bucket plan from it;
* :func:`assigned_cuda_index`: the local CUDA index of the GPU Ray assigned to this process;
* :func:`learner_world_timeout_s`: the DeepSpeed world's collective timeout, longer than any
  weight-sync deadline and than rank 0's lone checkpoint / HF-export writes (see there);
* :func:`actor_device`: the device an actor computes on (the GPU Ray assigned, never
  ``cuda.current_device()``);
* :func:`cuda_startup_error` / :func:`check_cuda_startup`: a process asked for GPUs that torch
  cannot see fails at start-up in one line naming the NVIDIA driver version (the CUDA 13 wheels
  of torch 2.13 and vLLM 0.32 need a driver >= 580).
"""
from __future__ import annotations

import os
import shutil
import subprocess
from typing import Any, Optional, Sequence

MIN_DRIVER_MAJOR = 580  # PyPI torch 2.13.0 / vllm 0.32.0 are CUDA 13 builds (cuda-toolkit 13.0.x)


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


TORCH_DEFAULT_PG_TIMEOUT_S = 1800.0  # torch.distributed.constants.default_pg_timeout (30 min; NCCL's own: 10)
SLOW_WRITE_BYTES_PER_S = 50e6  # a conservative write speed: a network volume under load (50 MB/s)
OPTIMIZER_BYTES_PER_PARAM = 12  # fp32 master weight + Adam's two fp32 moments


def learner_world_timeout_s(sync_timeout_s: float, num_params: int = 0, param_bytes: int = 2,
                            write_bytes_per_s: float = SLOW_WRITE_BYTES_PER_S,
                            floor_s: float = TORCH_DEFAULT_PG_TIMEOUT_S) -> float:
    """Collective timeout of the DeepSpeed world: the largest of

    * ``floor_s``: torch's own default (30 min), never less;
    * ``2 * sync_timeout_s + 60``: under ZeRO-3 the other learner ranks wait in a bucket's
      all-gather while rank 0 broadcasts the previous one under ``sync_timeout_s``; their wait
      must outlast rank 0's deadline, so that rank 0's error (naming bucket, version, rank) is the
      one raised and no rank gives up on a sync rank 0 is still allowed to finish;
    * ``2 * io + 300``, ``io = num_params * (param_bytes + 12) / write_bytes_per_s``: the other
      ranks wait in a barrier while rank 0 alone writes -- the HF export (``num_params *
      param_bytes``) or a checkpoint, where rank 0 may hold the whole optimizer (ZeRO-0: fp32
      master + two Adam moments, 12 bytes a parameter) beside the weights. Twice that at a slow
      volume's speed, plus five minutes. Qwen2.5-7B in bf16 (7.62e9 parameters): 107 GB,
      2132 s at 50 MB/s, so 4565 s (76 min).
    """
    sync = 2.0 * float(sync_timeout_s) + 60.0
    io = float(num_params) * (int(param_bytes) + OPTIMIZER_BYTES_PER_PARAM) / float(write_bytes_per_s)
    return max(float(floor_s), sync, 2.0 * io + 300.0 if num_params > 0 else 0.0)


def model_folder_params(path: str) -> int:
    """Parameters stored in an HF model folder: summed from the safetensors headers (shapes only,
    nothing loaded); other weight files count as 2 bytes a parameter (an over-estimate for fp32
    files, which only lengthens a timeout)."""
    import json
    import struct

    total = 0
    for name in sorted(os.listdir(path)) if os.path.isdir(path) else []:
        f = os.path.join(path, name)
        if name.endswith(".safetensors"):
            with open(f, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(n))
            for key, v in header.items():
                if key != "__metadata__":
                    count = 1
                    for d in v["shape"]:
                        count *= int(d)
                    total += count
        elif name.endswith((".bin", ".pt", ".pth")):
            total += os.path.getsize(f) // 2
    return total


def actor_device(num_gpus_per_actor: float, gpu_ids: Sequence[Any] = (), visible: Optional[str] = None,
                 current: Optional[int] = None):
    """The device an actor computes on: the CPU when its pool asked Ray for no GPU, else the GPU
    Ray assigned (``gpu_ids`` = ``ray.get_gpu_ids()``, located in ``CUDA_VISIBLE_DEVICES`` =
    ``visible`` by :func:`cuda_index_of`); outside Ray (no ids) the current device ``current``."""
    import torch

    if not uses_cuda(num_gpus_per_actor):
        return torch.device("cpu")
    if gpu_ids:
        return torch.device("cuda", cuda_index_of(gpu_ids[0], visible))
    if current is None:
        raise RuntimeError("no GPU: Ray assigned none to this process and no current CUDA device is known")
    return torch.device("cuda", int(current))


def nvidia_driver_version() -> Optional[str]:
    """The NVIDIA driver version ``nvidia-smi`` reports (first GPU), or None without one."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = [ln.strip() for ln in out.stdout.splitlines() if ln.strip()]
    return lines[0] if out.returncode == 0 and lines else None


def _driver_major(version: str) -> Optional[int]:
    try:
        return int(version.strip().split(".")[0])
    except ValueError:
        return None


def cuda_startup_error(gpus_requested: float, cuda_available: bool, driver_version: Optional[str],
                       torch_cuda: Optional[str] = "13.0", what: str = "this run") -> Optional[str]:
    """The one-line error for a process that asked for GPUs torch cannot see, or None when all is
    well (no GPUs asked for, or torch sees them). Names the driver version ``nvidia-smi`` reported
    (``driver_version``, None: no driver / no nvidia-smi) against the ">= 580 (CUDA 13 wheels)"
    requirement, and a CPU build of torch (``torch_cuda`` = ``torch.version.cuda`` is None)."""
    if not uses_cuda(gpus_requested) or cuda_available:
        return None
    need = f"needs >= {MIN_DRIVER_MAJOR} (CUDA 13 wheels: torch 2.13, vllm 0.32)"
    head = f"{what} asks for GPUs (num_gpus_per_actor={gpus_requested:g}) but torch sees none"
    if torch_cuda is None:
        return (f"{head}: this torch is a CPU build (torch.version.cuda is None); install the CUDA 13 wheels "
                f"(the gpu extra); NVIDIA driver {driver_version or 'not found'}, {need}")
    if driver_version is None:
        return f"{head}: no NVIDIA driver found (nvidia-smi missing or lists no GPU); the driver {need}"
    major = _driver_major(driver_version)
    if major is not None and major < MIN_DRIVER_MAJOR:
        return f"{head}: NVIDIA driver {driver_version} is too old, the driver {need}"
    return (f"{head}: NVIDIA driver {driver_version} (the driver {need}: met) -- check CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r} and the container's GPU runtime")


def check_cuda_startup(gpus_requested: float, what: str) -> None:
    """Raise ``RuntimeError`` with :func:`cuda_startup_error`'s line when GPUs were requested and
    torch cannot see them. Costs nothing (no nvidia-smi call) when none were asked for."""
    if not uses_cuda(gpus_requested):
        return
    import torch

    if torch.cuda.is_available():
        return
    msg = cuda_startup_error(gpus_requested, False, nvidia_driver_version(), torch.version.cuda, what)
    if msg:
        raise RuntimeError(msg)
