"""Typed schema of the run configuration, and validation before anything starts.

Hydra composes ``conf/``; :func:`load_config` merges the result into these dataclasses (which
rejects unknown keys and wrong types) and :func:`validate` checks ranges, enums, divisibility and
paths. Every user error becomes one :class:`ConfigError` line naming the key, the value and what
is allowed; ``dispo_ray.main`` prints it and exits non-zero before Ray starts.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A user error in the configuration; its message is one line, fit for the console."""


@dataclass
class AlgorithmConfig:
    name: str = MISSING
    # DISPO: weight window [1-eps_low_pos, 1+eps_high_pos] for A > 0, [1-eps_low_neg, 1+eps_high_neg] for A < 0.
    eps_low_pos: float = MISSING
    eps_high_pos: float = MISSING
    eps_low_neg: float = MISSING
    eps_high_neg: float = MISSING
    # PPO-style window for dapo/grpo (and the single window of cispo): [1-clip_low, 1+clip_high].
    clip_low: float = MISSING
    clip_high: float = MISSING
    loss_agg_mode: str = MISSING
    kl_coef: float = MISSING  # grpo's optional KL-to-reference term (k3 estimator); 0 = off
    group_size: int = MISSING  # G samples per prompt
    norm_adv_by_std: bool = MISSING
    adv_eps: float = MISSING
    dynamic_sampling: bool = MISSING  # drop all-correct / all-wrong groups and refill
    # Truncated importance-sampling correction of the generator/learner mismatch: 0 = off,
    # otherwise weight each token by min(pi_learner_old / pi_generator, cap).
    mismatch_is_cap: float = MISSING


@dataclass
class TinyModelConfig:
    hidden_size: int = MISSING
    num_layers: int = MISSING
    num_heads: int = MISSING
    num_kv_heads: int = MISSING
    intermediate_size: int = MISSING
    max_position_embeddings: int = MISSING


@dataclass
class WarmStartConfig:
    steps: int = MISSING
    lr: float = MISSING
    batch_size: int = MISSING


@dataclass
class ModelConfig:
    path: Optional[str] = MISSING  # an HF model folder; null = the tiny model built in code
    dtype: str = MISSING
    cache_dir: str = MISSING
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    warmstart: WarmStartConfig = field(default_factory=WarmStartConfig)


@dataclass
class TinyTaskConfig:
    num_train: int = MISSING
    num_val: int = MISSING
    max_digits: int = MISSING
    ops: List[str] = MISSING
    seed: int = MISSING  # problem generation and the train/val split


@dataclass
class DataConfig:
    train_files: List[str] = MISSING  # empty = the tiny task built in code
    val_files: List[str] = MISSING
    extra_eval_files: List[str] = MISSING
    prompt_key: str = MISSING
    answer_key: str = MISSING
    data_source_key: str = MISSING
    max_prompt_length: int = MISSING
    skip_bad_rows: bool = MISSING
    shuffle: bool = MISSING
    tiny_task: TinyTaskConfig = field(default_factory=TinyTaskConfig)


@dataclass
class GeneratorConfig:
    backend: str = MISSING  # vllm | hf
    num_actors: int = MISSING
    num_cpus_per_actor: float = MISSING
    num_gpus_per_actor: float = MISSING
    tensor_parallel_size: int = MISSING
    gpu_memory_utilization: float = MISSING
    kv_cache_gib: int = MISSING  # CPU vLLM: VLLM_CPU_KVCACHE_SPACE
    cpu_packed_weights: bool = MISSING  # CPU vLLM: oneDNN-packed linears (syncs then re-run a layerwise reload)
    enforce_eager: bool = MISSING
    temperature: float = MISSING
    top_p: float = MISSING
    max_new_tokens: int = MISSING
    stop: List[str] = MISSING
    seed: int = MISSING


@dataclass
class LearnerConfig:
    num_actors: int = MISSING
    num_cpus_per_actor: float = MISSING
    num_gpus_per_actor: float = MISSING
    zero_stage: int = MISSING
    lr: float = MISSING
    weight_decay: float = MISSING
    betas: List[float] = MISSING
    lr_schedule: str = MISSING  # constant | cosine
    warmup_steps: int = MISSING
    grad_clip: float = MISSING
    mini_batches: int = MISSING  # optimizer steps per rollout batch
    micro_batch_size: int = MISSING  # per rank, per forward/backward
    logprob_chunk_size: int = MISSING  # tokens per chunk of the log-prob/entropy computation
    sync_bucket_mb: int = MISSING  # weight-broadcast bucket size
    sync_timeout_s: float = MISSING
    gradient_checkpointing: bool = MISSING  # recompute decoder layers in backward
    deepspeed_config: Optional[Dict[str, Any]] = None  # extra DeepSpeed entries (offload, ...)


@dataclass
class RewardConfig:
    num_workers: int = MISSING
    num_cpus_per_worker: float = MISSING
    timeout_s: float = MISSING
    memory_mb: int = MISSING
    correct_reward: float = MISSING
    wrong_reward: float = MISSING
    format_reward: float = MISSING  # added when a \boxed{} answer is present
    overlong_buffer: int = MISSING  # DAPO overlong penalty over the last N tokens; 0 = off
    overlong_penalty: float = MISSING
    max_answer_chars: int = MISSING


@dataclass
class CollapseGuardConfig:
    enabled: bool = MISSING
    stop_on_trigger: bool = MISSING
    patience: int = MISSING  # consecutive steps a signal must hold
    repetition_max: float = MISSING
    length_min: float = MISSING
    entropy_min: float = MISSING
    entropy_max: float = MISSING


@dataclass
class TrainerConfig:
    total_steps: int = MISSING
    run_dir: str = MISSING
    seed: int = MISSING
    max_staleness: int = MISSING  # 0 = synchronous on-policy; k > 0 = bounded asynchrony
    prompts_per_step: int = MISSING
    max_resample_rounds: int = MISSING  # dynamic sampling cap per step
    eval_every: int = MISSING
    eval_k: int = MISSING
    eval_greedy: bool = MISSING
    eval_max_prompts: int = MISSING
    save_every: int = MISSING  # 0 = only at the end
    resume: bool = MISSING
    tensorboard: bool = MISSING
    wandb_project: Optional[str] = MISSING
    progress_bar: bool = MISSING
    collapse_guard: CollapseGuardConfig = field(default_factory=CollapseGuardConfig)


@dataclass
class ClusterConfig:
    address: Optional[str] = MISSING  # null = start a local Ray; "auto" = join the running cluster
    num_cpus: Optional[int] = MISSING
    include_dashboard: bool = MISSING


@dataclass
class RootConfig:
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)




LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
GENERATOR_BACKENDS = ("vllm", "hf")
_ABSENT = object()
FREE_FORM_KEY = "learner.deepspeed_config"  # a mapping the schema does not type, key by key
# DeepSpeed entries derived from other keys (actors/learner.py: ds_config): an override would desync them.
DEEPSPEED_OWNED_KEYS = {
    "train_batch_size": "learner.micro_batch_size * learner.num_actors",
    "train_micro_batch_size_per_gpu": "learner.micro_batch_size",
    "gradient_accumulation_steps": "learner.mini_batches and micro_batch_size",
    "gradient_clipping": "learner.grad_clip", "zero_optimization.stage": "learner.zero_stage",
    "bf16": "model.dtype", "fp16": "model.dtype",
    "optimizer": "learner.lr, betas, weight_decay (torch AdamW)", "scheduler": "learner.lr_schedule, warmup_steps",
}


def load_config(cfg: Any) -> RootConfig:
    """Merge a composed Hydra config (or a plain dict) into the schema, then validate it."""
    try:
        schema = OmegaConf.structured(RootConfig)
        plain = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)
        if "hydra" in plain:
            plain = OmegaConf.masked_copy(plain, [k for k in plain.keys() if k != "hydra"])
        merged = OmegaConf.merge(schema, plain)
        OmegaConf.resolve(merged)
        root: RootConfig = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise ConfigError(_omegaconf_message(e)) from None
    validate(root)
    return root


def _omegaconf_message(e: OmegaConfBaseException) -> str:
    key = getattr(e, "full_key", None)
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return f"config key '{key}': {first}" if key else f"config: {first}"


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}' = {value!r}: must be {allowed}")


def validate(c: RootConfig) -> None:
    """Check every value users can set; raise ConfigError naming the first bad key."""
    from dispo_ray.losses import registered_losses  # registry is the source of truth for names

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

    m = c.model
    _check(m.dtype in ("float32", "bfloat16", "float16"), "model.dtype", m.dtype,
           "one of float32, bfloat16, float16")
    if m.path is not None:
        _check(os.path.isdir(m.path), "model.path", m.path, "an existing HF model folder")
        _check(os.path.isfile(os.path.join(m.path, "config.json")), "model.path", m.path,
               "a folder containing config.json")
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
    _check(g.temperature >= 0, "generator.temperature", g.temperature, ">= 0")
    _check(0 < g.top_p <= 1, "generator.top_p", g.top_p, "in (0, 1]")
    _check(g.max_new_tokens >= 1, "generator.max_new_tokens", g.max_new_tokens, ">= 1")

    l = c.learner
    _check(l.num_actors >= 1, "learner.num_actors", l.num_actors, ">= 1")
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

    tr = c.trainer
    _check(tr.total_steps >= 1, "trainer.total_steps", tr.total_steps, ">= 1")
    _check(bool(tr.run_dir), "trainer.run_dir", tr.run_dir, "a non-empty path")
    _check(tr.max_staleness >= 0, "trainer.max_staleness", tr.max_staleness, ">= 0")
    _check(tr.prompts_per_step >= 1, "trainer.prompts_per_step", tr.prompts_per_step, ">= 1")
    _check(tr.max_resample_rounds >= 0, "trainer.max_resample_rounds", tr.max_resample_rounds, ">= 0")
    _check(tr.eval_every >= 0, "trainer.eval_every", tr.eval_every, ">= 0 (0 = only at the end)")
    _check(tr.eval_k >= 1, "trainer.eval_k", tr.eval_k, ">= 1")
    _check(tr.save_every >= 0, "trainer.save_every", tr.save_every, ">= 0")
    samples = tr.prompts_per_step * a.group_size
    ranks_x_minis = l.num_actors * l.mini_batches
    _check(samples % ranks_x_minis == 0, "trainer.prompts_per_step", tr.prompts_per_step,
           f"such that prompts_per_step * algorithm.group_size ({samples}) is divisible by "
           f"learner.num_actors * learner.mini_batches ({ranks_x_minis})")
    cg = tr.collapse_guard
    _check(cg.patience >= 1, "trainer.collapse_guard.patience", cg.patience, ">= 1")
    _check(0 <= cg.repetition_max <= 1, "trainer.collapse_guard.repetition_max", cg.repetition_max, "in [0, 1]")
    _check(cg.entropy_min < cg.entropy_max, "trainer.collapse_guard.entropy_min", cg.entropy_min,
           f"< trainer.collapse_guard.entropy_max={cg.entropy_max}")

    cl = c.cluster
    _check(cl.num_cpus is None or cl.num_cpus >= 1, "cluster.num_cpus", cl.num_cpus, ">= 1 or null")


def _schema_keys(cls: Any = None, prefix: str = "") -> List[str]:
    import dataclasses
    out: List[str] = []
    for f in dataclasses.fields(cls or RootConfig):
        key = prefix + f.name
        out.append(key)
        if dataclasses.is_dataclass(f.default_factory if f.default_factory is not dataclasses.MISSING else None):
            out.extend(_schema_keys(f.default_factory, key + "."))
    return out


def check_override_keys(overrides: List[str]) -> None:
    """Catch a mistyped key in ``key=value`` overrides before Hydra does (its message spans several
    lines): one line naming the key and the closest valid ones."""
    import difflib
    keys = _schema_keys()
    for ov in overrides:
        if "=" not in ov or ov.startswith(("+", "~", "hydra.", "hydra/", "-")):
            continue
        key = ov.split("=", 1)[0].strip()
        if key.startswith(FREE_FORM_KEY + "."):
            raise ConfigError(f"config key '{key}': a new entry inside {FREE_FORM_KEY} needs a leading '+' "
                              f"(+{ov}), or set the whole mapping: {FREE_FORM_KEY}={{...}}")
        if key and key not in keys:
            near = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(near)}?" if near else "; see `--cfg job` for every key"
            raise ConfigError(f"unknown config key '{key}'{hint}")


def to_dict(c: RootConfig) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(c), resolve=True)


CONF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")


def compose(overrides: Optional[List[str]] = None) -> RootConfig:
    """Compose ``conf/`` with Hydra overrides (as on the command line) and validate: for tests,
    benchmarks and library users who do not go through ``dispo_ray.main``."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = hydra_compose(config_name="config", overrides=list(overrides or []))
    except HydraException as e:
        raise ConfigError(f"config: {str(e).strip().splitlines()[0]}") from None
    return load_config(cfg)
