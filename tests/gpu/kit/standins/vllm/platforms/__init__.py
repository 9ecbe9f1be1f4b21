"""GPU kit stand-in for ``vllm.platforms``: the real one detects the platform through the compiled
extension (``vllm._C``), which the kit does not carry. ``current_platform`` answers the questions
the copied modules ask (pynccl_wrapper, pynccl, utils/torch_utils, utils/platform_utils) for a
CUDA machine, and for CPU (where the kit's CPU test imports the cut)."""
from __future__ import annotations

from typing import Any

import torch


class KitPlatform:
    dispatch_key = "CUDA"
    ray_device_key = "GPU"
    current_stream = None  # torch_utils.current_stream uses torch.cuda on CUDA, a placeholder on CPU

    @property
    def device_name(self) -> str:
        return "cuda" if self.is_cuda() else "cpu"

    device_type = device_name

    def is_cuda(self) -> bool:
        return torch.version.cuda is not None and torch.cuda.is_available()

    def is_cuda_alike(self) -> bool:
        return self.is_cuda()

    def is_rocm(self) -> bool:
        return False

    def is_xpu(self) -> bool:
        return False

    def is_tpu(self) -> bool:
        return False

    def is_cpu(self) -> bool:
        return not self.is_cuda()

    def is_out_of_tree(self) -> bool:
        return False

    def fp8_dtype(self) -> torch.dtype:
        return torch.float8_e4m3fn

    def is_pin_memory_available(self) -> bool:
        return self.is_cuda()

    def manual_seed_all(self, seed: int) -> None:
        torch.manual_seed(seed)
        if self.is_cuda():
            torch.cuda.manual_seed_all(seed)

    def get_device_name(self, device_id: int = 0) -> str:
        return torch.cuda.get_device_name(device_id) if self.is_cuda() else "cpu"

    def num_compute_units(self, device_id: int = 0) -> int:
        return torch.cuda.get_device_properties(device_id).multi_processor_count

    def log_warnings(self) -> None:
        return None

    def stateless_init_device_torch_dist_pg(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("the GPU kit's vllm.platforms stand-in builds no device process group")

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(f"current_platform.{name} is not part of the GPU kit's vllm.platforms stand-in")


current_platform = KitPlatform()
