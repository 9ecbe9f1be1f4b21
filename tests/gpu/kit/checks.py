"""The GPU kit's checks, one per process: ``python checks.py NAME [--device cuda|cpu] [--small]
--result FILE`` writes ``{"status": "PASSED"|"SKIPPED", "key": "...", "details": {...}}`` to FILE;
an exception (a failed assertion) exits non-zero with its traceback. ``run_kit.py`` runs them in
order under a time budget each, with the kit on PYTHONPATH and DISPO_GPU_KIT=1.

Each check calls the logic of the pytest GPU checks in tests/gpu (``check_a``, ``check_d``,
``deepspeed_step``, ``logprob_peaks``, the generator's ``_setup``/``_run``, ``check_f``, ``check_g``),
so the kit and ``tests/gpu/run.sh`` test the same things; here Ray is the kit's in-process stand-in
and vLLM the kit's cut (NCCL only: no engine). ``--device cpu`` runs the checks that can over gloo
(the kit's CPU test, tests/gpu_on_cpu/test_gpu_kit.py); ``--small`` shrinks their payloads.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Callable, Dict, Tuple

# before torch/NCCL initialise: vLLM's NCCL from torch's own nvidia-nccl wheel when the loader
# cannot find libnccl.so.2 by name (the kit's runner normally sets it already)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_BUILD_OPS", "0")


class Skip(Exception):
    """The check cannot run here (its reason is reported)."""


def _require_cuda(device: str) -> None:
    import torch
    if device == "cuda" and not torch.cuda.is_available():
        raise Skip("needs a CUDA GPU")


def _cuda_only(device: str) -> None:
    if device != "cuda":
        raise Skip("CUDA only (no --device cpu variant)")
    _require_cuda(device)


def _require_nccl(device: str) -> None:
    _require_cuda(device)
    if device == "cuda":
        from test_gpu_weight_sync import _nccl_usable
        why = _nccl_usable()
        if why:
            raise Skip(why)


def _tmp() -> Path:
    return Path(tempfile.mkdtemp(prefix="dispo-gpu-kit-"))


def check_a(device: str, small: bool) -> Tuple[str, dict]:
    _require_nccl(device)
    from test_gpu_weight_sync import check_a as run
    r = run(device, big_mb=32 if small else 512)
    return (f"{r['gbps_warm']:.2f} GB/s warm ({r['gbps_cold']:.2f} cold), {r['mib']:.0f} MiB, bit-exact, "
            f"large tensors reassembled on {r['pieces_on']}"), r


def check_d(device: str, small: bool) -> Tuple[str, dict]:
    _require_nccl(device)
    from test_gpu_weight_sync import check_d as run
    r = run(device, big_mb=16 if small else 64, timeout=5.0 if small else 20.0)
    return f"sender raised after {r['raised_after_s']:.1f}s (timeout {r['timeout_s']:.0f}s), re-formed group synced", r


def _ray():
    import ray
    assert getattr(ray, "IS_STANDIN", False), f"expected the kit's Ray stand-in, got {ray.__file__}"
    ray.init()
    return ray


def check_hf_generator(device: str, small: bool) -> Tuple[str, dict]:
    _require_cuda(device)
    ray = _ray()
    from test_gpu_generator import _run, _setup
    cfg, path, model, recs = _setup(_tmp(), "hf", gpus=1 if device == "cuda" else 0)
    try:
        r = _run(cfg, path, model, recs, "gloo")
    finally:
        ray.shutdown()
    return f"start {r['start_s']:.1f}s, max |logprob diff| vs transformers {r['max_logprob_diff']:.1e}, sync landed", r


def _deepspeed(stage: int, checkpointing: bool, device: str) -> Tuple[str, dict]:
    _cuda_only(device)
    ray = _ray()
    from test_gpu_learner import deepspeed_step
    try:
        m = deepspeed_step(_tmp(), stage, checkpointing)
    finally:
        ray.shutdown()
    return f"loss {m['actor/loss']:.4f}, grad norm {m['actor/grad_norm']:.3f}, bf16 weights changed, HF export loads", m


def check_zero2(device: str, small: bool) -> Tuple[str, dict]:
    return _deepspeed(2, False, device)


def check_zero3(device: str, small: bool) -> Tuple[str, dict]:
    return _deepspeed(3, True, device)


def check_logprob_memory(device: str, small: bool) -> Tuple[str, dict]:
    _cuda_only(device)
    from test_gpu_learner import logprob_peaks
    r = logprob_peaks()
    return (f"peak chunked {r['chunked'] / 2**20:.0f} MiB vs full logits {r['naive'] / 2**20:.0f} MiB "
            f"({r['naive'] / max(r['chunked'], 1):.1f}x)"), r


def check_f(device: str, small: bool) -> Tuple[str, dict]:
    _require_nccl(device)
    from test_gpu_sync_scale import QWEN25_7B, TINY, check_f as run
    r = run(device, spec=TINY if small else QWEN25_7B, buckets_mib=(1, 4) if small else (32, 256, 1024))
    cells = "; ".join(f"{x['bucket_mib']}M/{x['reassembly']} {x['seconds']:.2f}s ({x['staged_gb']:.1f} GB host)"
                      for x in r["rows"])
    return f"{r['gb_per_sync']} GB/sync: {cells}", r


def check_g(device: str, small: bool) -> Tuple[str, dict]:
    _require_nccl(device)
    ray = _ray()
    from test_gpu_sync_scale import QWEN25_0P5B, TINY, check_g as run
    try:
        r = run(_tmp(), device, spec=TINY if small else QWEN25_0P5B)
    finally:
        ray.shutdown()
    return (f"{r['params_m']}M params, {r['gbps_warm']:.2f} GB/s warm in {r['bucket_mib']} MiB buckets, bit-exact "
            f"(setup {r['setup_s']:.0f}s)"), r


CHECKS: Dict[str, Callable[[str, bool], Tuple[str, dict]]] = {
    "a_sync_bit_exact": check_a,
    "d_receiver_killed_mid_sync": check_d,
    "hf_generator": check_hf_generator,
    "deepspeed_zero2_bf16": check_zero2,
    "deepspeed_zero3_bf16": check_zero3,
    "chunked_logprob_memory": check_logprob_memory,
    "f_host_staging_7b_shapes": check_f,
    "g_zero3_0p5b_bit_exact": check_g,
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("name", choices=sorted(CHECKS))
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--result", required=True)
    args = ap.parse_args(argv)
    try:
        key, details = CHECKS[args.name](args.device, args.small)
        out = {"status": "PASSED", "key": key, "details": details}
    except Skip as e:
        out = {"status": "SKIPPED", "key": str(e), "details": {}}
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)  # no waiting on daemon threads (a stuck actor thread or NCCL abort)
    with open(args.result, "w") as f:
        json.dump(out, f, default=str)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
