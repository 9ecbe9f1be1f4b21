"""Refusing an NCCL communicator that vLLM silently disabled, in one line that says why."""
from __future__ import annotations

from typing import Any, Callable, Optional, Tuple

from dispo_ray.sync.errors import WeightSyncError

VLLM_MIN_NCCL = (2, 29, 7)  # vLLM 0.32's NCCL wrapper binds ncclCommSuspend/Resume, new in NCCL 2.29.7


def nccl_version_string(raw: int) -> str:
    """NCCL's ``ncclGetVersion`` code as ``major.minor.patch``: ``major*10000 + minor*100 + patch``
    since NCCL 2.9 (22809 -> 2.28.9), ``major*1000 + minor*100 + patch`` before (2803 -> 2.8.3)."""
    raw = int(raw)
    if raw >= 10000:
        return f"{raw // 10000}.{raw // 100 % 100}.{raw % 100}"
    return f"{raw // 1000}.{raw // 100 % 10}.{raw % 100}"


def pynccl_refusal_message(world_size: int, nccl_version: Optional[str], reason: str) -> str:
    """The one line refusing a communicator vLLM disabled: the loaded NCCL's version and why vLLM
    disabled it (vLLM itself only sets ``disabled`` and says nothing, see :func:`pynccl_disabled_reason`)."""
    msg = (f"vLLM's PyNcclCommunicator is disabled for a world of {world_size}: {reason}; "
           f"loaded NCCL {nccl_version or 'unknown'}")
    need = ".".join(map(str, VLLM_MIN_NCCL))
    try:
        old = nccl_version is not None and tuple(int(x) for x in nccl_version.split(".")) < VLLM_MIN_NCCL
    except ValueError:
        old = False
    if old:
        msg += (f", but vLLM 0.32's NCCL wrapper needs NCCL >= {need} (ncclCommSuspend/ncclCommResume): install "
                f"nvidia-nccl-cu13>={need} or point VLLM_NCCL_SO_PATH at such a libnccl.so.2")
    return msg + "; its collectives would return without moving data"


def pynccl_disabled_reason() -> Tuple[Optional[str], str]:
    """(loaded NCCL version or None, why vLLM disabled its communicator), found by retracing
    ``PyNcclCommunicator.__init__`` (vllm/distributed/device_communicators/pynccl.py): disabled
    when ``VLLM_DISABLE_PYNCCL`` is set, or when ``NCCLLibrary(find_nccl_library())`` raises -- which
    it does (pynccl_wrapper.py) when the library cannot be opened or lacks one of the symbols it
    binds, ``ncclCommSuspend``/``ncclCommResume`` (NCCL < 2.29.7) included; pynccl.py catches that
    and sets ``disabled = True`` without a word."""
    import ctypes

    import vllm.envs as envs

    if envs.VLLM_DISABLE_PYNCCL:
        return None, "VLLM_DISABLE_PYNCCL is set"
    try:
        from vllm.utils.nccl import find_nccl_library
        so_file = find_nccl_library()
    except Exception as e:  # noqa: BLE001 - e.g. a CPU build of torch
        return None, f"no NCCL library to load ({_one_line(e)})"
    version = None
    try:
        code = ctypes.c_int()
        if ctypes.CDLL(so_file).ncclGetVersion(ctypes.byref(code)) == 0:
            version = nccl_version_string(code.value)
    except Exception:  # noqa: BLE001 - unloadable: vLLM's own attempt below says why
        pass
    try:
        from vllm.distributed.device_communicators.pynccl_wrapper import NCCLLibrary
        NCCLLibrary(so_file)
    except Exception as e:  # noqa: BLE001 - exactly what made vLLM disable the communicator
        return version, f"vLLM's NCCLLibrary({so_file!r}) failed: {type(e).__name__}: {_one_line(e)}"
    return version, "the NCCL library loads and binds now (it failed when the communicator was built)"


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def check_communicator(comm: Any, world_size: int,
                       diagnose: Callable[[], Tuple[Optional[str], str]] = pynccl_disabled_reason) -> None:
    """Refuse a PyNccl communicator vLLM disabled: its collectives would return immediately.
    The error names the loaded NCCL version and vLLM's reason (``diagnose``)."""
    if world_size > 1 and getattr(comm, "disabled", True):
        version, reason = diagnose()
        raise WeightSyncError(pynccl_refusal_message(world_size, version, reason))
