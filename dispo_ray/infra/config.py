"""Typed schema of the run configuration, and where Hydra finds ``conf/``.

Hydra composes ``conf/``; :func:`load_config` merges the result into these dataclasses (which
rejects unknown keys and wrong types) and :func:`dispo_ray.infra.validation.validate` checks ranges,
enums, divisibility and paths. Every user error becomes one :class:`ConfigError` line naming the
key, the value and what is allowed; ``dispo_ray.main`` prints it and exits non-zero before Ray
starts.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dispo_ray.infra.validation import ConfigError, validate  # noqa: F401 - ConfigError is part of this API


@dataclass
class WindowMaxConfig:
    """The widest each DISPO window may be set at run time (collapse-guard rollback, adaptive windows)."""
    eps_low_pos: float = MISSING
    eps_high_pos: float = MISSING
    eps_low_neg: float = MISSING
    eps_high_neg: float = MISSING


@dataclass
class AdaptiveWindowsConfig:
    """Bands of dispo_ray.algorithm.adaptive_windows: a window widens while its signal is out of band."""
    enabled: bool = MISSING
    repetition_max: float = MISSING  # share of repetitive responses; above: widen eps_high_neg
    length_min: float = MISSING  # mean response length (tokens); below: widen eps_low_neg
    entropy_correct_min: float = MISSING  # entropy of correct responses; below: widen eps_high_pos
    entropy_correct_max: float = MISSING  # above: widen eps_low_pos
    clip_frac_max: float = MISSING  # share of its regime's tokens a window clips; above: widen it
    step_factor: float = MISSING  # per-step widening, in ratio space (> 1)
    relax: float = MISSING  # in band: fraction of the way back to the configured value per step


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
    window_max: WindowMaxConfig = field(default_factory=WindowMaxConfig)
    adaptive_windows: AdaptiveWindowsConfig = field(default_factory=AdaptiveWindowsConfig)


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
    steps: int = MISSING  # at most this many steps
    lr: float = MISSING
    batch_size: int = MISSING
    target_accuracy: float = MISSING  # stop once the dev slice's greedy accuracy reaches it (0: run all steps)
    check_every: int = MISSING
    dev_size: int = MISSING  # first problems of the train split, held out from the warm start


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
    style: str = MISSING  # answer (boxed answer only) | working (column-by-column working, additions)


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
    engine_core: str = MISSING  # vllm: auto | in_process | separate_process
    temperature: float = MISSING
    top_p: float = MISSING
    max_new_tokens: int = MISSING
    stop: List[str] = MISSING
    seed: int = MISSING
    node_resource: Optional[str] = MISSING  # custom Ray resource of the nodes this pool may use


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
    node_resource: Optional[str] = MISSING  # custom Ray resource of the nodes this pool may use


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
    node_resource: Optional[str] = MISSING  # custom Ray resource of the nodes this pool may use
    answer_format: str = MISSING  # boxed (the answer must be in a box) | any (math-verify's full extraction)


@dataclass
class CollapseGuardConfig:
    enabled: bool = MISSING
    action: str = MISSING  # warn | stop | rollback (dispo_ray.algorithm.collapse_guard)
    stop_on_trigger: Optional[bool] = None  # deprecated alias: true = action=stop (resolve_aliases)
    patience: int = MISSING  # consecutive steps a signal must hold
    repetition_max: float = MISSING
    length_min: float = MISSING
    entropy_min: float = MISSING
    entropy_max: float = MISSING
    reward_fall: float = MISSING  # batch accuracy below this fraction of its best running mean of up to 5 steps (0 = off)
    widen_factor: float = MISSING  # rollback: the signal's window widens by this factor (ratio space)
    max_rollbacks: int = MISSING  # rollbacks per run; later triggers warn


@dataclass
class TrainerConfig:
    total_steps: int = MISSING
    run_dir: str = MISSING
    seed: int = MISSING
    max_staleness: int = MISSING  # 0 = synchronous on-policy; k > 0 = bounded asynchrony
    prompts_per_step: int = MISSING
    max_resample_rounds: int = MISSING  # dynamic sampling cap per step
    oversample: float = MISSING  # dynamic sampling: first-round prompts = ceil(prompts_per_step x this)
    eval_every: int = MISSING
    eval_k: int = MISSING
    eval_greedy: bool = MISSING
    eval_max_prompts: int = MISSING
    save_every: int = MISSING  # 0 = only at the end
    resume: bool = MISSING
    keep_checkpoints: int = MISSING  # newest N complete checkpoints kept (+ what a rollback may need); 0 = all
    save_on_stop: bool = MISSING  # SIGTERM/SIGINT: save a checkpoint before exiting
    max_learner_restarts: int = MISSING  # a dead learner rank: rebuild + restore this many times per run
    export_final: bool = MISSING  # write <run_dir>/final_hf (HF format) when the run completes
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


FREE_FORM_KEY = "learner.deepspeed_config"  # a mapping the schema does not type, key by key


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
    resolve_aliases(root)
    validate(root)
    return root


def resolve_aliases(root: RootConfig) -> None:
    """The one place deprecated keys are mapped: ``trainer.collapse_guard.stop_on_trigger`` true ->
    ``action=stop``, false -> ``action=warn``; refused when it contradicts an explicit ``action``."""
    cg = root.trainer.collapse_guard
    if cg.stop_on_trigger is None:
        return
    mapped = "stop" if cg.stop_on_trigger else "warn"
    if cg.action not in ("warn", mapped):
        raise ConfigError(f"config key 'trainer.collapse_guard.stop_on_trigger' = {cg.stop_on_trigger!r}: "
                          f"contradicts trainer.collapse_guard.action={cg.action!r}; set only action")
    print(f"warning: trainer.collapse_guard.stop_on_trigger is deprecated; use "
          f"trainer.collapse_guard.action={mapped}", file=sys.stderr)
    cg.action, cg.stop_on_trigger = mapped, None


def _omegaconf_message(e: OmegaConfBaseException) -> str:
    key = getattr(e, "full_key", None)
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return f"config key '{key}': {first}" if key else f"config: {first}"


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
        _check_group_option(ov)
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


def _check_group_option(override: str) -> None:
    """``group=option`` / ``+group=option`` naming a config group (a folder of ``conf/``) must name
    one of its files: one line listing them (Hydra's own message spans a dozen lines)."""
    if "=" not in override:
        return
    group, option = (x.strip() for x in override.lstrip("+").split("=", 1))
    folder = os.path.join(CONF_DIR, group)
    if "." in group or "/" in group or not os.path.isdir(folder) or option in ("null", ""):
        return
    options = sorted(os.path.splitext(f)[0] for f in os.listdir(folder) if f.endswith(".yaml"))
    if option not in options:
        raise ConfigError(f"config group '{group}' has no option '{option}'; choose one of {', '.join(options)}")


def to_dict(c: RootConfig) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(c), resolve=True)


def _conf_dir() -> str:
    """The checkout's ``conf/`` (source tree, editable install), else the copy a wheel ships as
    ``dispo_ray/conf``. This file is ``dispo_ray/infra/config.py``: the package is two levels up."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for d in (os.path.join(os.path.dirname(package), "conf"), os.path.join(package, "conf")):
        if os.path.isfile(os.path.join(d, "config.yaml")):
            return d
    raise ConfigError(f"config: no conf/config.yaml beside {package} (reinstall dispo-ray)")


CONF_DIR = _conf_dir()


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
