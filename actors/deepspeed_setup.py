"""The learner's DeepSpeed settings, derived in one place from ``cfg.learner`` / ``cfg.model``:
the DeepSpeed config (:func:`ds_config`), the optimizer (:func:`make_optimizer`) and the LR schedule
(:func:`lr_lambda`). :class:`actors.learner.LearnerWorker` hands them to ``deepspeed.initialize``."""
from __future__ import annotations

import math
from typing import Any, Dict, Optional

import torch

# ZeRO-1/2 stage gradients through a reduce bucket and gather parameters through an all-gather
# bucket, each DeepSpeed-default 5e8 ELEMENTS (2 GB in float32), filled whole once a model has
# ~0.5B parameters: two ZeRO-2 ranks of the 0.5B rung passed 11 GB each and Ray's OOM killer took
# one on the 23.5 GiB VM; at 5e7 (200 MB fp32, 100 MB bf16: past the ~64 MB where NCCL and gloo
# reach their bus bandwidth) each peaked at 8.5 GiB (bench_scale, docs/scaling.md). A user's
# entry in learner.deepspeed_config wins.
ZERO_BUCKET_ELEMENTS = 50_000_000

LR_SCHEDULES = ("constant", "cosine")  # learner.lr_schedule's choices (lr_lambda)


def lr_lambda(warmup_steps: int, total_steps: int, schedule: str):
    """LR multiplier at optimizer step s: linear warm-up ``(s+1)/warmup`` for s < warmup, then 1
    (constant) or ``0.5 * (1 + cos(pi * p))`` with p = (s - warmup) / (total - warmup) (cosine to 0)."""
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        p = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * p))
    return f


def _deep_merge(base: Dict[str, Any], over: Dict[str, Any]) -> Dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# The DeepSpeed entries ds_config derives from other keys (entry -> those keys): an override in
# learner.deepspeed_config would desync them, so the config refuses these (LearnerConfig.check).
DEEPSPEED_OWNED_KEYS = {
    "train_batch_size": "learner.micro_batch_size * learner.num_actors",
    "train_micro_batch_size_per_gpu": "learner.micro_batch_size",
    "gradient_accumulation_steps": "learner.mini_batches and micro_batch_size",
    "gradient_clipping": "learner.grad_clip", "zero_optimization.stage": "learner.zero_stage",
    "bf16": "model.dtype", "fp16": "model.dtype",
    "optimizer": "learner.lr, betas, weight_decay (torch AdamW)", "scheduler": "learner.lr_schedule, warmup_steps",
}


def ds_config(cfg: Any, world_size: int, overrides: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The DeepSpeed config derived from ``cfg.learner`` / ``cfg.model``, then ``learner.deepspeed_config``
    (the user's extra entries, e.g. ZeRO offload; keys the learner owns are rejected by the config)
    and ``overrides`` merged over it, nested dicts key by key.

    At ``world_size == 1`` a ``learner.zero_stage`` of 1 or 2 without offload runs as stage 0:
    ZeRO-1/2 shard optimizer state and gradients over the data-parallel ranks, so one rank keeps
    everything anyway, plus DeepSpeed's flat fp32 copy of the parameters and its gradient buckets
    (bench_scale, 0.5B, float32: 22.1 s and 17.9 GiB a step at ZeRO-1 against 12.9 s and 10.5 GiB
    at stage 0; bare AdamW 11.7 s). Offload (ZeRO-Offload onto one GPU) keeps the stage, as does
    a stage named in ``overrides`` (a checkpoint written at stage 1, :meth:`LearnerWorker.load_checkpoint`)."""
    l = cfg.learner
    c: Dict[str, Any] = {
        "train_micro_batch_size_per_gpu": l.micro_batch_size,
        "gradient_accumulation_steps": 1,  # the boundary is set by hand per mini-batch
        "train_batch_size": l.micro_batch_size * world_size,
        "gradient_clipping": l.grad_clip,
        "zero_optimization": {"stage": l.zero_stage, "reduce_bucket_size": ZERO_BUCKET_ELEMENTS,
                              "allgather_bucket_size": ZERO_BUCKET_ELEMENTS},
        "zero_allow_untested_optimizer": True,  # torch AdamW as client optimizer (no JIT build)
        "bf16": {"enabled": cfg.model.dtype == "bfloat16"},
        "fp16": {"enabled": cfg.model.dtype == "float16"},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    out = _deep_merge(_deep_merge(c, dict(l.deepspeed_config or {})), overrides or {})
    z = out["zero_optimization"]
    forced = "stage" in (overrides or {}).get("zero_optimization", {})
    if world_size == 1 and z["stage"] in (1, 2) and not forced and not offloads(z):
        out["zero_optimization"] = {**z, "stage": 0}
    return out


def offloads(zero: Dict[str, Any]) -> bool:
    """Whether a ``zero_optimization`` section moves optimizer state or parameters off the device."""
    return any((zero.get(k) or {}).get("device", "none") != "none" for k in ("offload_optimizer", "offload_param"))


def make_optimizer(params, l: Any, config: Dict[str, Any]) -> torch.optim.Optimizer:
    """AdamW from ``learner.lr / betas / weight_decay``: torch's, or DeepSpeedCPUAdam (the same
    update, vectorised on the host) when the DeepSpeed config offloads the optimizer, as DeepSpeed
    demands of an offloaded client optimizer. The latter JIT-compiles once (~45 s, then cached)."""
    offload = (config.get("zero_optimization", {}).get("offload_optimizer") or {}).get("device", "none")
    kw = dict(lr=l.lr, betas=tuple(l.betas), weight_decay=l.weight_decay)
    if offload != "none":
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        return DeepSpeedCPUAdam(params, adamw_mode=True, **kw)
    return torch.optim.AdamW(params, **kw)
