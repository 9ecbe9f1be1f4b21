"""Typed schema of the run configuration, and where Hydra finds ``conf/``.

Hydra composes ``conf/`` (where every default lives); :func:`load_config` merges the result into
these dataclasses (which rejects unknown keys and wrong types) and checks the rules: a key's range
or choices beside its field (:func:`dispo_ray.infra.rules.key`, choices read from their owners),
rules tying one section's keys together in that section's ``check``, rules across sections in
:func:`dispo_ray.infra.validation.validate`. Every user error becomes one :class:`ConfigError`
line naming the key, the value and what is allowed; ``dispo_ray.main`` prints it and exits
non-zero before Ray starts. ``python -m dispo_ray.infra.config`` prints the key table.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dispo_ray.infra.rules import check, key, owned, reference_table
from dispo_ray.infra.validation import ConfigError, validate  # noqa: F401 - ConfigError is part of this API

RAY_BUILTIN_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")
_ABSENT = object()


def node_resource() -> Any:
    """``<pool>.node_resource``: the custom Ray resource of the nodes a pool may use."""
    return key(test=lambda r: r is None or (bool(r.strip()) and r not in RAY_BUILTIN_RESOURCES),
               allowed=f"null or a custom resource name (not {', '.join(RAY_BUILTIN_RESOURCES)})")


@dataclass
class WindowMaxConfig:
    """The widest each DISPO window may be set at run time (collapse-guard rollback, adaptive windows);
    each at least its configured window, the eps_low ones at most 1 (AlgorithmConfig.check)."""
    eps_low_pos: float = MISSING
    eps_high_pos: float = MISSING
    eps_low_neg: float = MISSING
    eps_high_neg: float = MISSING


@dataclass
class AdaptiveWindowsConfig:
    """Bands of dispo_ray.algorithm.adaptive_windows: a window widens while its signal is out of band."""
    enabled: bool = MISSING
    repetition_max: float = key(ge=0, le=1)  # share of repetitive responses; above: widen eps_high_neg
    length_min: float = key(ge=0)  # mean response length (tokens); below: widen eps_low_neg
    entropy_correct_min: float = key(ge=0)  # entropy of correct responses; below: widen eps_high_pos
    entropy_correct_max: float = MISSING  # above: widen eps_low_pos
    clip_frac_max: float = key(gt=0, le=1, note="1 = never widen for clipping")  # share of a regime clipped
    step_factor: float = key(gt=1)  # per-step widening, in ratio space
    relax: float = key(ge=0, le=1, note="0 = never relax")  # in band: fraction of the way back per step

    def check(self, at: str) -> None:
        check(self.entropy_correct_min < self.entropy_correct_max, f"{at}.entropy_correct_min",
              self.entropy_correct_min, f">= 0 and < {at}.entropy_correct_max={self.entropy_correct_max}")


@dataclass
class AlgorithmConfig:
    name: str = key(choices="dispo_ray.algorithm.losses.registered_losses")
    # DISPO: weight window [1-eps_low_pos, 1+eps_high_pos] for A > 0, [1-eps_low_neg, 1+eps_high_neg] for A < 0.
    eps_low_pos: float = key(ge=0, le=1)
    eps_high_pos: float = key(ge=0)
    eps_low_neg: float = key(ge=0, le=1)
    eps_high_neg: float = key(ge=0)
    # PPO-style window for dapo/grpo (and the single window of cispo): [1-clip_low, 1+clip_high].
    clip_low: float = key(ge=0, le=1)
    clip_high: float = key(ge=0)
    loss_agg_mode: str = key(choices="dispo_ray.algorithm.losses.LOSS_AGG_MODES")
    kl_coef: float = key(ge=0)  # grpo's optional KL-to-reference term (k3 estimator); 0 = off
    group_size: int = key(ge=2, note="group-relative advantages need at least two samples per prompt")  # G
    norm_adv_by_std: bool = MISSING
    adv_eps: float = key(gt=0)
    dynamic_sampling: bool = MISSING  # drop all-correct / all-wrong groups and refill
    # Truncated importance-sampling correction of the generator/learner mismatch: 0 = off,
    # otherwise weight each token by min(pi_learner_old / pi_generator, cap).
    mismatch_is_cap: float = key(ge=0, note="0 = off")
    window_max: WindowMaxConfig = field(default_factory=WindowMaxConfig)
    adaptive_windows: AdaptiveWindowsConfig = field(default_factory=AdaptiveWindowsConfig)

    def check(self, at: str) -> None:
        for k in ("eps_low_pos", "eps_high_pos", "eps_low_neg", "eps_high_neg"):
            v, lo, high = getattr(self.window_max, k), getattr(self, k), k.startswith("eps_high")
            check(lo <= v and (high or v <= 1.0), f"{at}.window_max.{k}", v,
                  f">= {at}.{k}={lo}" + ("" if high else " and <= 1"))
        check(not self.adaptive_windows.enabled or self.name == "dispo", f"{at}.adaptive_windows.enabled",
              self.adaptive_windows.enabled, f"false with {at}.name={self.name} (it moves DISPO's four windows)")


@dataclass
class TinyModelConfig:
    hidden_size: int = key(ge=1)
    num_layers: int = key(ge=1)
    num_heads: int = key(ge=1)
    num_kv_heads: int = key(ge=1)
    intermediate_size: int = key(ge=1)
    max_position_embeddings: int = key(ge=1)

    def check(self, at: str) -> None:
        check(self.hidden_size % self.num_heads == 0, f"{at}.hidden_size", self.hidden_size,
              f"divisible by {at}.num_heads={self.num_heads}")
        check(self.num_heads % self.num_kv_heads == 0, f"{at}.num_kv_heads", self.num_kv_heads,
              f"a divisor of {at}.num_heads={self.num_heads}")


@dataclass
class WarmStartConfig:
    steps: int = key(ge=0)  # at most this many steps
    lr: float = key(gt=0)
    batch_size: int = key(ge=1)
    target_accuracy: float = key(ge=0, le=1)  # stop once the dev slice's greedy accuracy reaches it (0: all steps)
    check_every: int = key(ge=1)
    dev_size: int = key(ge=1)  # first problems of the train split, held out (< data.tiny_task.num_train)


@dataclass
class ModelConfig:
    path: Optional[str] = MISSING  # an HF folder (checked by dispo_ray.data.preflight); null = the tiny model
    dtype: str = key(choices=("float32", "bfloat16", "float16"))
    cache_dir: str = MISSING
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    warmstart: WarmStartConfig = field(default_factory=WarmStartConfig)


@dataclass
class TinyTaskConfig:
    num_train: int = key(ge=1)
    num_val: int = key(ge=1)
    max_digits: int = key(ge=1, le=32)
    ops: List[str] = key(each="dispo_ray.tiny.task.OPS")
    seed: int = key(ge=0)  # problem generation and the train/val split
    style: str = key(choices="dispo_ray.tiny.task.STYLES")  # answer (boxed answer only) | working (additions)
    digits: str = key(choices="dispo_ray.tiny.task.DIGITS")  # uniform (1..max_digits) | longtail (Pareto column count)

    def check(self, at: str) -> None:
        check(self.style != "working" or set(self.ops) == {"+"}, f"{at}.ops", list(self.ops),
              f"[\"+\"] with {at}.style=working (it writes out additions only)")
        check(self.digits != "longtail" or self.max_digits >= 2, f"{at}.max_digits", self.max_digits,
              f">= 2 with {at}.digits=longtail (its column counts run from 2 to max_digits)")


@dataclass
class DataConfig:
    train_files: List[str] = MISSING  # empty = the tiny task built in code
    val_files: List[str] = MISSING
    extra_eval_files: List[str] = MISSING
    prompt_key: str = MISSING
    answer_key: str = MISSING
    data_source_key: str = MISSING
    max_prompt_length: int = key(ge=1)
    skip_bad_rows: bool = MISSING
    shuffle: bool = MISSING
    tiny_task: TinyTaskConfig = field(default_factory=TinyTaskConfig)

    def check(self, at: str) -> None:
        for group in ("train_files", "val_files", "extra_eval_files"):
            for p in getattr(self, group):
                check(os.path.isfile(p), f"{at}.{group}", p, "existing parquet/json/jsonl files")


@dataclass
class GeneratorConfig:
    backend: str = key(choices="actors.backends.BACKENDS")
    num_actors: int = key(ge=1)
    num_cpus_per_actor: float = key(ge=0)
    num_gpus_per_actor: float = key(ge=0)  # whole GPUs when the learner is on GPUs too (validate)
    tensor_parallel_size: int = key(ge=1)
    gpu_memory_utilization: float = key(gt=0, le=1)
    kv_cache_gib: int = key(ge=1)  # CPU vLLM: VLLM_CPU_KVCACHE_SPACE
    cpu_packed_weights: bool = MISSING  # CPU vLLM: oneDNN-packed linears (syncs then re-run a layerwise reload)
    enforce_eager: bool = MISSING
    engine_core: str = key(choices="actors.backends.vllm_backend.ENGINE_CORES")  # vllm only
    temperature: float = key(ge=0)
    top_p: float = key(gt=0, le=1)
    max_new_tokens: int = key(ge=1)
    stop: List[str] = MISSING
    seed: int = MISSING
    partial_rollout: str = key(choices="actors.streaming.PARTIAL_ROLLOUTS")  # stream mode: a sync mid-sample continues | aborts it
    max_inflight_groups: int = key(ge=0, note="0 = 4 x trainer.prompts_per_step")  # stream mode, per actor
    node_resource: Optional[str] = node_resource()


@dataclass
class LearnerConfig:
    num_actors: int = key(ge=1)
    num_cpus_per_actor: float = MISSING
    # NCCL refuses two ranks of one communicator on one GPU ("Duplicate GPU detected" at formation):
    # the DeepSpeed world speaks NCCL whenever the learner is on GPUs (dispo_ray.infra.devices)
    num_gpus_per_actor: float = key(test=lambda v: v >= 0 and (v == 0 or float(v).is_integer()),
                                    allowed="0 or a whole number of GPUs (NCCL refuses two learner ranks on one GPU)")
    zero_stage: int = key(choices=(0, 1, 2, 3))
    lr: float = key(gt=0)
    weight_decay: float = key(ge=0)
    betas: List[float] = key(test=lambda b: len(b) == 2 and all(0 <= x < 1 for x in b),
                             allowed="two numbers in [0, 1)")
    lr_schedule: str = key(choices="actors.deepspeed_setup.LR_SCHEDULES")
    warmup_steps: int = key(ge=0)
    grad_clip: float = key(ge=0, note="0 = off")
    mini_batches: int = key(ge=1)  # optimizer steps per rollout batch
    micro_batch_size: int = key(ge=1)  # per rank, per forward/backward
    # > 0: packed micro-batches of at most this many tokens per rank (dispo_ray.algorithm.packing);
    # validate() wants it >= data.max_prompt_length + generator.max_new_tokens
    max_tokens_per_micro_batch: int = key(ge=0, note="0 = off: micro_batch_size samples, padded")
    logprob_chunk_size: int = key(ge=1)  # tokens per chunk of the log-prob/entropy computation
    sync_bucket_mb: int = key(ge=1)  # weight-broadcast bucket size
    sync_timeout_s: float = key(gt=0)
    gradient_checkpointing: bool = MISSING  # recompute decoder layers in backward
    deepspeed_config: Optional[Dict[str, Any]] = None  # extra DeepSpeed entries (offload, ...)
    node_resource: Optional[str] = node_resource()

    def check(self, at: str) -> None:
        for k, owner in owned("actors.deepspeed_setup.DEEPSPEED_OWNED_KEYS").items():  # entries the learner derives
            node: Any = self.deepspeed_config
            for part in k.split("."):
                node = node.get(part, _ABSENT) if isinstance(node, dict) else _ABSENT
            check(node is _ABSENT, f"{at}.deepspeed_config.{k}", node, f"left out (the learner sets it from {owner})")


@dataclass
class RewardConfig:
    num_workers: int = key(ge=1)
    num_cpus_per_worker: float = key(ge=0)
    timeout_s: float = key(gt=0)
    memory_mb: int = key(ge="dispo_ray.reward.sandbox.MIN_MEMORY_MB")
    correct_reward: float = MISSING
    wrong_reward: float = MISSING
    format_reward: float = MISSING  # added when a \boxed{} answer is present
    overlong_buffer: int = key(ge=0)  # DAPO overlong penalty over the last N tokens (< max_new_tokens); 0 = off
    overlong_penalty: float = key(ge=0)
    max_answer_chars: int = key(ge=1)
    node_resource: Optional[str] = node_resource()
    answer_format: str = key(choices="dispo_ray.reward.scoring.ANSWER_FORMATS")  # boxed | any (math-verify's own)


@dataclass
class CollapseGuardConfig:
    enabled: bool = MISSING
    action: str = key(choices="dispo_ray.algorithm.collapse_guard.ACTIONS")  # rollback: dispo, save_every >= 1
    stop_on_trigger: Optional[bool] = None  # deprecated alias: true = action=stop (resolve_aliases)
    patience: int = key(ge=1)  # consecutive steps a signal must hold
    repetition_max: float = key(ge=0, le=1)
    length_min: float = MISSING
    entropy_min: float = MISSING
    entropy_max: float = MISSING
    reward_fall: float = key(ge=0, lt=1, note="0 = off")  # accuracy below this share of its best 5-step mean
    widen_factor: float = key(gt=1)  # rollback: the signal's window widens by this factor (ratio space)
    max_rollbacks: int = key(ge=0)  # rollbacks per run; later triggers warn

    def check(self, at: str) -> None:
        check(self.entropy_min < self.entropy_max, f"{at}.entropy_min", self.entropy_min,
              f"< {at}.entropy_max={self.entropy_max}")


@dataclass
class TrainerConfig:
    total_steps: int = key(ge=1)
    run_dir: str = key(test=bool, allowed="a non-empty path")
    seed: int = MISSING
    max_staleness: int = key(ge=0)  # 0 = synchronous on-policy; k > 0 = bounded asynchrony
    rollout_mode: str = key(choices="dispo_ray.rollout.streaming.ROLLOUT_MODES")  # batch | stream
    prompts_per_step: int = key(ge=1)  # x algorithm.group_size divisible by learner ranks x mini_batches
    max_resample_rounds: int = key(ge=0)  # dynamic sampling cap per step
    oversample: float = key(ge=1, le=4)  # dynamic sampling: first-round prompts = ceil(prompts_per_step x this)
    eval_every: int = key(ge=0, note="0 = only at the end")
    eval_k: int = key(ge=1)
    eval_greedy: bool = MISSING
    eval_max_prompts: int = MISSING
    save_every: int = key(ge=0)  # 0 = only at the end
    resume: bool = MISSING
    keep_checkpoints: int = key(ge=0, note="0 = keep all")  # newest N kept (+ what a rollback may need)
    save_on_stop: bool = MISSING  # SIGTERM/SIGINT: save a checkpoint before exiting
    max_learner_restarts: int = key(ge=0)  # a dead learner rank: rebuild + restore this many times per run
    export_final: bool = MISSING  # write <run_dir>/final_hf (HF format) when the run completes
    tensorboard: bool = MISSING
    wandb_project: Optional[str] = MISSING
    progress_bar: bool = MISSING
    collapse_guard: CollapseGuardConfig = field(default_factory=CollapseGuardConfig)


@dataclass
class ClusterConfig:
    address: Optional[str] = MISSING  # null = start a local Ray; "auto" = join the running cluster
    num_cpus: Optional[int] = key(ge=1)
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


if __name__ == "__main__":  # the configuration reference: every key, its default in conf/, what it allows
    print(reference_table(compose(sys.argv[1:])))
