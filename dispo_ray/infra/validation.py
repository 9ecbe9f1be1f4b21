"""The rules every config value must meet, checked before any actor starts (:func:`validate`).

Each failure is one :class:`ConfigError` line naming the key, the value and what is allowed.
"""
from __future__ import annotations

import os
from typing import Any


class ConfigError(ValueError):
    """A user error in the configuration; its message is one line, fit for the console."""


LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
GENERATOR_BACKENDS = ("vllm", "hf")
TASK_STYLES = ("answer", "working")
ENGINE_CORES = ("auto", "in_process", "separate_process")
GUARD_ACTIONS = ("warn", "stop", "rollback")
_ABSENT = object()
RAY_BUILTIN_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")
# DeepSpeed entries derived from other keys (actors/learner.py: ds_config): an override would desync them.
DEEPSPEED_OWNED_KEYS = {
    "train_batch_size": "learner.micro_batch_size * learner.num_actors",
    "train_micro_batch_size_per_gpu": "learner.micro_batch_size",
    "gradient_accumulation_steps": "learner.mini_batches and micro_batch_size",
    "gradient_clipping": "learner.grad_clip", "zero_optimization.stage": "learner.zero_stage",
    "bf16": "model.dtype", "fp16": "model.dtype",
    "optimizer": "learner.lr, betas, weight_decay (torch AdamW)", "scheduler": "learner.lr_schedule, warmup_steps",
}


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}' = {value!r}: must be {allowed}")


def validate(c: Any) -> None:
    """Check every value users can set; raise ConfigError naming the first bad key."""
    from dispo_ray.algorithm.losses import registered_losses  # registry is the source of truth for names

    a = c.algorithm
    names = registered_losses()
    _check(a.name in names, "algorithm.name", a.name, f"one of {', '.join(names)}")
    for k in ("eps_low_pos", "eps_low_neg", "clip_low"):
        v = getattr(a, k)
        _check(0.0 <= v <= 1.0, f"algorithm.{k}", v, "in [0, 1]")
    for k in ("eps_high_pos", "eps_high_neg", "clip_high"):
        v = getattr(a, k)
        _check(v >= 0.0, f"algorithm.{k}", v, ">= 0")
    _check(a.loss_agg_mode in LOSS_AGG_MODES, "algorithm.loss_agg_mode", a.loss_agg_mode,
           f"one of {', '.join(LOSS_AGG_MODES)}")
    _check(a.kl_coef >= 0, "algorithm.kl_coef", a.kl_coef, ">= 0")
    _check(a.group_size >= 2, "algorithm.group_size", a.group_size,
           ">= 2 (group-relative advantages need at least two samples per prompt)")
    _check(a.adv_eps > 0, "algorithm.adv_eps", a.adv_eps, "> 0")
    _check(a.mismatch_is_cap >= 0, "algorithm.mismatch_is_cap", a.mismatch_is_cap, ">= 0 (0 = off)")
    for k in ("eps_low_pos", "eps_high_pos", "eps_low_neg", "eps_high_neg"):
        v, lo = getattr(a.window_max, k), getattr(a, k)
        _check(lo <= v and (k.startswith("eps_high") or v <= 1.0), f"algorithm.window_max.{k}", v,
               f">= algorithm.{k}={lo}" + ("" if k.startswith("eps_high") else " and <= 1"))
    aw = a.adaptive_windows
    _check(not aw.enabled or a.name == "dispo", "algorithm.adaptive_windows.enabled", aw.enabled,
           f"false with algorithm.name={a.name} (it moves DISPO's four windows)")
    _check(0 <= aw.repetition_max <= 1, "algorithm.adaptive_windows.repetition_max", aw.repetition_max, "in [0, 1]")
    _check(aw.length_min >= 0, "algorithm.adaptive_windows.length_min", aw.length_min, ">= 0")
    _check(0 <= aw.entropy_correct_min < aw.entropy_correct_max, "algorithm.adaptive_windows.entropy_correct_min",
           aw.entropy_correct_min, f">= 0 and < algorithm.adaptive_windows.entropy_correct_max={aw.entropy_correct_max}")
    _check(0 < aw.clip_frac_max <= 1, "algorithm.adaptive_windows.clip_frac_max", aw.clip_frac_max,
           "in (0, 1] (1 = never widen for clipping)")
    _check(aw.step_factor > 1, "algorithm.adaptive_windows.step_factor", aw.step_factor, "> 1")
    _check(0 <= aw.relax <= 1, "algorithm.adaptive_windows.relax", aw.relax, "in [0, 1] (0 = never relax)")

    m = c.model
    _check(m.dtype in ("float32", "bfloat16", "float16"), "model.dtype", m.dtype,
           "one of float32, bfloat16, float16")
    # model.path: the folder itself is checked by dispo_ray.data.preflight (config, tokenizer, engine support)
    t = m.tiny
    for k in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
              "max_position_embeddings"):
        _check(getattr(t, k) >= 1, f"model.tiny.{k}", getattr(t, k), ">= 1")
    _check(t.hidden_size % t.num_heads == 0, "model.tiny.hidden_size", t.hidden_size,
           f"divisible by model.tiny.num_heads={t.num_heads}")
    _check(t.num_heads % t.num_kv_heads == 0, "model.tiny.num_kv_heads", t.num_kv_heads,
           f"a divisor of model.tiny.num_heads={t.num_heads}")
    _check(m.warmstart.steps >= 0, "model.warmstart.steps", m.warmstart.steps, ">= 0")
    _check(m.warmstart.lr > 0, "model.warmstart.lr", m.warmstart.lr, "> 0")
    _check(m.warmstart.batch_size >= 1, "model.warmstart.batch_size", m.warmstart.batch_size, ">= 1")
    _check(0 <= m.warmstart.target_accuracy <= 1, "model.warmstart.target_accuracy", m.warmstart.target_accuracy,
           "in [0, 1]")
    _check(m.warmstart.check_every >= 1, "model.warmstart.check_every", m.warmstart.check_every, ">= 1")
    _check(1 <= m.warmstart.dev_size < c.data.tiny_task.num_train, "model.warmstart.dev_size", m.warmstart.dev_size,
           f">= 1 and below data.tiny_task.num_train={c.data.tiny_task.num_train}")

    d = c.data
    for group in ("train_files", "val_files", "extra_eval_files"):
        for p in getattr(d, group):
            _check(os.path.isfile(p), f"data.{group}", p, "existing parquet/json/jsonl files")
    _check(d.max_prompt_length >= 1, "data.max_prompt_length", d.max_prompt_length, ">= 1")
    tt = d.tiny_task
    _check(tt.num_train >= 1, "data.tiny_task.num_train", tt.num_train, ">= 1")
    _check(tt.num_val >= 1, "data.tiny_task.num_val", tt.num_val, ">= 1")
    _check(1 <= tt.max_digits <= 6, "data.tiny_task.max_digits", tt.max_digits, "in [1, 6]")
    bad_ops = [o for o in tt.ops if o not in ("+", "-", "*")]
    _check(bool(tt.ops) and not bad_ops, "data.tiny_task.ops", tt.ops, "a non-empty list of '+', '-', '*'")
    _check(tt.seed >= 0, "data.tiny_task.seed", tt.seed, ">= 0")
    _check(tt.style in TASK_STYLES, "data.tiny_task.style", tt.style, f"one of {', '.join(TASK_STYLES)}")
    _check(tt.style != "working" or set(tt.ops) == {"+"}, "data.tiny_task.ops", list(tt.ops),
           "[\"+\"] with data.tiny_task.style=working (it writes out additions only)")

    g = c.generator
    _check(g.backend in GENERATOR_BACKENDS, "generator.backend", g.backend,
           f"one of {', '.join(GENERATOR_BACKENDS)}")
    _check(g.num_actors >= 1, "generator.num_actors", g.num_actors, ">= 1")
    _check(g.num_cpus_per_actor >= 0, "generator.num_cpus_per_actor", g.num_cpus_per_actor, ">= 0")
    _check(g.num_gpus_per_actor >= 0, "generator.num_gpus_per_actor", g.num_gpus_per_actor, ">= 0")
    _check(g.tensor_parallel_size >= 1, "generator.tensor_parallel_size", g.tensor_parallel_size, ">= 1")
    _check(0 < g.gpu_memory_utilization <= 1, "generator.gpu_memory_utilization",
           g.gpu_memory_utilization, "in (0, 1]")
    _check(g.kv_cache_gib >= 1, "generator.kv_cache_gib", g.kv_cache_gib, ">= 1")
    _check(g.engine_core in ENGINE_CORES, "generator.engine_core", g.engine_core, f"one of {', '.join(ENGINE_CORES)}")
    _check(g.temperature >= 0, "generator.temperature", g.temperature, ">= 0")
    _check(0 < g.top_p <= 1, "generator.top_p", g.top_p, "in (0, 1]")
    _check(g.max_new_tokens >= 1, "generator.max_new_tokens", g.max_new_tokens, ">= 1")

    l = c.learner
    _check(l.num_actors >= 1, "learner.num_actors", l.num_actors, ">= 1")
    # NCCL refuses two ranks of one communicator on one GPU ("Duplicate GPU detected" at formation):
    # the DeepSpeed world speaks NCCL whenever the learner is on GPUs, the weight sync whenever both
    # pools are (dispo_ray.infra.devices.sync_backend)
    _check(l.num_gpus_per_actor >= 0 and (l.num_gpus_per_actor == 0 or float(l.num_gpus_per_actor).is_integer()),
           "learner.num_gpus_per_actor", l.num_gpus_per_actor,
           "0 or a whole number of GPUs (NCCL refuses two learner ranks on one GPU)")
    _check(not (l.num_gpus_per_actor > 0 and g.num_gpus_per_actor > 0) or float(g.num_gpus_per_actor).is_integer(),
           "generator.num_gpus_per_actor", g.num_gpus_per_actor,
           "a whole number of GPUs when learner.num_gpus_per_actor > 0 (the weight sync then speaks NCCL, "
           "which refuses two ranks on one GPU)")
    _check(l.zero_stage in (0, 1, 2, 3), "learner.zero_stage", l.zero_stage, "one of 0, 1, 2, 3")
    _check(l.lr > 0, "learner.lr", l.lr, "> 0")
    _check(l.weight_decay >= 0, "learner.weight_decay", l.weight_decay, ">= 0")
    _check(len(l.betas) == 2 and all(0 <= b < 1 for b in l.betas), "learner.betas", l.betas,
           "two numbers in [0, 1)")
    _check(l.lr_schedule in ("constant", "cosine"), "learner.lr_schedule", l.lr_schedule,
           "one of constant, cosine")
    _check(l.warmup_steps >= 0, "learner.warmup_steps", l.warmup_steps, ">= 0")
    _check(l.grad_clip >= 0, "learner.grad_clip", l.grad_clip, ">= 0 (0 = off)")
    _check(l.mini_batches >= 1, "learner.mini_batches", l.mini_batches, ">= 1")
    _check(l.micro_batch_size >= 1, "learner.micro_batch_size", l.micro_batch_size, ">= 1")
    _check(l.logprob_chunk_size >= 1, "learner.logprob_chunk_size", l.logprob_chunk_size, ">= 1")
    _check(l.sync_bucket_mb >= 1, "learner.sync_bucket_mb", l.sync_bucket_mb, ">= 1")
    _check(l.sync_timeout_s > 0, "learner.sync_timeout_s", l.sync_timeout_s, "> 0")
    for key, owner in DEEPSPEED_OWNED_KEYS.items():
        node: Any = l.deepspeed_config
        for part in key.split("."):
            node = node.get(part, _ABSENT) if isinstance(node, dict) else _ABSENT
        _check(node is _ABSENT, f"learner.deepspeed_config.{key}", node, f"left out (the learner sets it from {owner})")

    r = c.reward
    _check(r.num_workers >= 1, "reward.num_workers", r.num_workers, ">= 1")
    _check(r.num_cpus_per_worker >= 0, "reward.num_cpus_per_worker", r.num_cpus_per_worker, ">= 0")
    _check(r.timeout_s > 0, "reward.timeout_s", r.timeout_s, "> 0")
    _check(r.memory_mb >= 64, "reward.memory_mb", r.memory_mb, ">= 64")
    _check(r.overlong_buffer >= 0, "reward.overlong_buffer", r.overlong_buffer, ">= 0")
    _check(r.overlong_buffer < g.max_new_tokens or r.overlong_buffer == 0, "reward.overlong_buffer",
           r.overlong_buffer, f"< generator.max_new_tokens={g.max_new_tokens}")
    _check(r.overlong_penalty >= 0, "reward.overlong_penalty", r.overlong_penalty, ">= 0")
    _check(r.max_answer_chars >= 1, "reward.max_answer_chars", r.max_answer_chars, ">= 1")
    _check(r.answer_format in ("boxed", "any"), "reward.answer_format", r.answer_format, "one of boxed, any")

    tr = c.trainer
    _check(tr.total_steps >= 1, "trainer.total_steps", tr.total_steps, ">= 1")
    _check(bool(tr.run_dir), "trainer.run_dir", tr.run_dir, "a non-empty path")
    _check(tr.max_staleness >= 0, "trainer.max_staleness", tr.max_staleness, ">= 0")
    _check(tr.prompts_per_step >= 1, "trainer.prompts_per_step", tr.prompts_per_step, ">= 1")
    _check(tr.max_resample_rounds >= 0, "trainer.max_resample_rounds", tr.max_resample_rounds, ">= 0")
    _check(1.0 <= tr.oversample <= 4.0, "trainer.oversample", tr.oversample, "in [1, 4]")
    _check(tr.eval_every >= 0, "trainer.eval_every", tr.eval_every, ">= 0 (0 = only at the end)")
    _check(tr.eval_k >= 1, "trainer.eval_k", tr.eval_k, ">= 1")
    _check(tr.save_every >= 0, "trainer.save_every", tr.save_every, ">= 0")
    _check(tr.keep_checkpoints >= 0, "trainer.keep_checkpoints", tr.keep_checkpoints, ">= 0 (0 = keep all)")
    _check(tr.max_learner_restarts >= 0, "trainer.max_learner_restarts", tr.max_learner_restarts, ">= 0")
    samples = tr.prompts_per_step * a.group_size
    ranks_x_minis = l.num_actors * l.mini_batches
    _check(samples % ranks_x_minis == 0, "trainer.prompts_per_step", tr.prompts_per_step,
           f"such that prompts_per_step * algorithm.group_size ({samples}) is divisible by "
           f"learner.num_actors * learner.mini_batches ({ranks_x_minis})")
    cg = tr.collapse_guard
    _check(cg.patience >= 1, "trainer.collapse_guard.patience", cg.patience, ">= 1")
    _check(cg.action in GUARD_ACTIONS, "trainer.collapse_guard.action", cg.action, f"one of {', '.join(GUARD_ACTIONS)}")
    if cg.action == "rollback":
        _check(a.name == "dispo", "trainer.collapse_guard.action", cg.action,
               f"warn or stop with algorithm.name={a.name} (rollback widens a DISPO window)")
        _check(tr.save_every >= 1, "trainer.save_every", tr.save_every,
               ">= 1 with trainer.collapse_guard.action=rollback (it restores a saved checkpoint)")
    _check(cg.widen_factor > 1, "trainer.collapse_guard.widen_factor", cg.widen_factor, "> 1")
    _check(cg.max_rollbacks >= 0, "trainer.collapse_guard.max_rollbacks", cg.max_rollbacks, ">= 0")
    _check(0 <= cg.repetition_max <= 1, "trainer.collapse_guard.repetition_max", cg.repetition_max, "in [0, 1]")
    _check(0 <= cg.reward_fall < 1, "trainer.collapse_guard.reward_fall", cg.reward_fall, "in [0, 1) (0 = off)")
    _check(cg.entropy_min < cg.entropy_max, "trainer.collapse_guard.entropy_min", cg.entropy_min,
           f"< trainer.collapse_guard.entropy_max={cg.entropy_max}")

    for key, res in (("generator", g.node_resource), ("learner", l.node_resource), ("reward", r.node_resource)):
        _check(res is None or (bool(res.strip()) and res not in RAY_BUILTIN_RESOURCES), f"{key}.node_resource", res,
               f"null or a custom resource name (not {', '.join(RAY_BUILTIN_RESOURCES)})")

    cl = c.cluster
    _check(cl.num_cpus is None or cl.num_cpus >= 1, "cluster.num_cpus", cl.num_cpus, ">= 1 or null")
