"""Hydra composition of every preset, and one clear line for each kind of bad value."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from dispo_ray.infra.config import ConfigError, compose

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("name,expect", [
    ("dispo", {"eps_low_pos": 0.2, "eps_high_pos": 10.0, "eps_low_neg": 1.0, "eps_high_neg": 100.0}),
    ("cispo", {"clip_low": 1.0, "clip_high": 5.0}),
    ("dapo", {"clip_low": 0.2, "clip_high": 0.28, "loss_agg_mode": "token-mean"}),
    ("grpo", {"clip_low": 0.2, "clip_high": 0.2, "loss_agg_mode": "seq-mean-token-mean",
              "dynamic_sampling": False}),
])
def test_every_algorithm_preset_composes(name, expect):
    cfg = compose([f"algorithm={name}"])
    assert cfg.algorithm.name == name
    for k, v in expect.items():
        assert getattr(cfg.algorithm, k) == v
    assert cfg.generator.backend == "vllm" and cfg.learner.zero_stage in (1, 2, 3)


def test_generator_preset_and_overrides():
    cfg = compose(["generator=hf", "learner.zero_stage=3", "trainer.max_staleness=2",
                   "algorithm.eps_high_neg=55"])
    assert (cfg.generator.backend, cfg.learner.zero_stage, cfg.trainer.max_staleness) == ("hf", 3, 2)
    assert cfg.algorithm.eps_high_neg == 55.0


@pytest.mark.parametrize("override,key,fragment", [
    ("algorithm.eps_low_pos=-0.5", "algorithm.eps_low_pos", "in [0, 1]"),
    ("algorithm.eps_low_neg=1.5", "algorithm.eps_low_neg", "in [0, 1]"),
    ("algorithm.eps_high_pos=-1", "algorithm.eps_high_pos", ">= 0"),
    ("algorithm.name=ppo", "algorithm.name", "one of cispo, dapo, dispo, grpo"),
    ("algorithm.loss_agg_mode=mean", "algorithm.loss_agg_mode", "token-mean"),
    ("algorithm.eps_low_pos=abc", "algorithm.eps_low_pos", "could not be converted"),
    ("+algorithm.eps_low=0.1", "algorithm.eps_low", "not in 'AlgorithmConfig'"),
    ("generator.backend=sglang", "generator.backend", "one of vllm, hf"),
    ("generator.engine_core=thread", "generator.engine_core", "one of auto, in_process, separate_process"),
    ("trainer.oversample=0.5", "trainer.oversample", "in [1, 4]"),
    ("learner.zero_stage=4", "learner.zero_stage", "one of 0, 1, 2, 3"),
    ("data.train_files=[/nonexistent.parquet]", "data.train_files", "existing"),
    ("reward.timeout_s=0", "reward.timeout_s", "> 0"),
    ("learner.deepspeed_config={zero_optimization:{stage:3}}", "learner.deepspeed_config.zero_optimization.stage",
     "the learner sets it from learner.zero_stage"),
    ("learner.deepspeed_config={train_batch_size:64}", "learner.deepspeed_config.train_batch_size", "left out"),
    # choices and bounds read from their owners (scoring, sandbox, learner, tiny task, collapse guard)
    ("reward.answer_format=latex", "reward.answer_format", "one of boxed, any"),
    ("reward.memory_mb=63", "reward.memory_mb", ">= 64"),
    ("learner.lr_schedule=linear", "learner.lr_schedule", "one of constant, cosine"),
    ("data.tiny_task.style=essay", "data.tiny_task.style", "one of answer, working"),
    ("data.tiny_task.ops=[/]", "data.tiny_task.ops", "a non-empty list of '+', '-', '*'"),
    ("trainer.collapse_guard.action=pause", "trainer.collapse_guard.action", "one of warn, stop, rollback"),
    ("cluster.num_cpus=0", "cluster.num_cpus", ">= 1 or null"),
    ("generator.node_resource=GPU", "generator.node_resource", "a custom resource name (not CPU, GPU"),
    # a section's own rules, and rules across sections
    ("model.tiny.hidden_size=130", "model.tiny.hidden_size", "divisible by model.tiny.num_heads=4"),
    ("trainer.collapse_guard.entropy_min=9", "trainer.collapse_guard.entropy_min",
     "< trainer.collapse_guard.entropy_max=5.0"),
    ("model.warmstart.dev_size=5000", "model.warmstart.dev_size", "below data.tiny_task.num_train=4000"),
    ("reward.overlong_buffer=40", "reward.overlong_buffer", "< generator.max_new_tokens=32"),
    ("trainer.collapse_guard.action=rollback", "trainer.save_every", ">= 1 with trainer.collapse_guard.action"),
])
def test_bad_values_name_key_and_allowed_range(override, key, fragment):
    with pytest.raises(ConfigError) as e:
        compose([override])
    msg = str(e.value)
    assert key in msg and fragment in msg and "\n" not in msg


def test_every_rule_names_a_live_owner_and_the_key_table_covers_every_key():
    import dataclasses

    from dispo_ray.infra.config import RootConfig, _schema_keys
    from dispo_ray.infra.rules import owned, reference, reference_table

    def rules(cls):
        for f in dataclasses.fields(cls):
            if "rule" in f.metadata:
                yield f.metadata["rule"]
            if dataclasses.is_dataclass(f.default_factory if f.default_factory is not dataclasses.MISSING else None):
                yield from rules(f.default_factory)
    refs = [getattr(r, a) for r in rules(RootConfig) for a in ("ge", "gt", "le", "lt", "choices", "each")
            if isinstance(getattr(r, a), str)]
    assert len(refs) >= 10
    for ref in refs:  # a renamed owner fails here, not in a user's run
        assert owned(ref) not in (None, (), []), ref
    cfg = compose([])
    leaves = {k for k, *_ in reference(cfg)}
    assert leaves == {k for k in _schema_keys() if not any(o.startswith(k + ".") for o in _schema_keys())}
    table = reference_table(cfg)
    assert "| `reward.answer_format` | `'boxed'` | one of boxed, any |" in table
    assert "| `trainer.oversample` | `1.25` | in [1, 4] |" in table


def test_deepspeed_config_entries_merge_into_the_derived_config():
    from actors.deepspeed_setup import ZERO_BUCKET_ELEMENTS as B, ds_config
    cfg = compose(["learner.zero_stage=3", "learner.micro_batch_size=4", "learner.grad_clip=0.5",
                   "learner.deepspeed_config={zero_optimization:{offload_optimizer:{device:cpu},"
                   "stage3_max_live_parameters:1000},communication_data_type:fp32}"])
    c = ds_config(cfg, world_size=2, overrides={"zero_optimization": {"stage3_param_persistence_threshold": 0}})
    assert c["zero_optimization"] == {"stage": 3, "offload_optimizer": {"device": "cpu"}, "reduce_bucket_size": B,
                                      "allgather_bucket_size": B, "stage3_max_live_parameters": 1000,
                                      "stage3_param_persistence_threshold": 0}
    assert (c["communication_data_type"], c["train_batch_size"], c["gradient_clipping"]) == ("fp32", 8, 0.5)
    # the bucket sizes are defaults, not owned: a user's entry wins
    mine = ds_config(compose(["learner.deepspeed_config={zero_optimization:{reduce_bucket_size:500000000}}"]), 2)
    assert mine["zero_optimization"]["reduce_bucket_size"] == 500_000_000


def test_one_rank_runs_zero_1_and_2_as_stage_0_unless_it_offloads():
    from actors.deepspeed_setup import ds_config
    stage = lambda over, w, ov=None: ds_config(compose(over), w, ov)["zero_optimization"]["stage"]  # noqa: E731
    assert stage([], 2) == 1 and stage([], 1) == 0  # the default learner.zero_stage is 1
    assert stage(["learner.zero_stage=2"], 1) == 0 and stage(["learner.zero_stage=3"], 1) == 3
    offload = "learner.deepspeed_config={zero_optimization:{offload_optimizer:{device:cpu}}}"
    assert stage(["learner.zero_stage=2", offload], 1) == 2  # ZeRO-Offload onto one device keeps its stage
    assert stage([], 1, {"zero_optimization": {"stage": 1}}) == 1  # named by the caller: a checkpoint's layout


def test_a_wheel_install_ships_and_finds_conf(tmp_path):
    """A non-editable install (the wheel, without the checkout on the path) composes the config."""
    import shutil
    site = next(p for p in sys.path if p.endswith("site-packages"))
    src = tmp_path / "src"  # a copy: setuptools writes build/ next to the sources
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "dispo_ray", "actors", "conf"):
        path = os.path.join(REPO, name)
        if os.path.isdir(path):
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(path, src)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "dist"), str(src)], check=True, capture_output=True, timeout=180)
    wheel = next((tmp_path / "dist").glob("dispo_ray-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(tmp_path / "t"),
                    str(wheel)], check=True, capture_output=True, timeout=180)
    code = ("import dispo_ray.infra.config as c; print(c.CONF_DIR); "
            "print(c.compose(['algorithm=cispo']).algorithm.clip_high); "
            "print(c.compose(['+preset=regime_lab']).data.tiny_task.style)")
    # -S: no .pth files, so the editable install of the checkout is not importable
    p = subprocess.run([sys.executable, "-S", "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": f"{tmp_path / 't'}{os.pathsep}{site}"})
    assert p.returncode == 0, p.stderr
    conf_dir, clip_high, lab_style = p.stdout.split()
    assert conf_dir == str(tmp_path / "t" / "dispo_ray" / "conf") and float(clip_high) == 5.0
    assert lab_style == "working"  # the preset group ships too


def test_batch_divisibility_is_checked():
    with pytest.raises(ConfigError, match="trainer.prompts_per_step.*divisible by learner.num_actors"):
        compose(["trainer.prompts_per_step=3", "algorithm.group_size=3", "learner.num_actors=2"])


def _cli(*args, timeout=60):
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "dispo_ray.main", *args], cwd=REPO, capture_output=True,
                       text=True, timeout=timeout)
    return p, time.monotonic() - t0


def test_cli_bad_value_exits_fast_with_one_line(tmp_path):
    p, seconds = _cli("algorithm.eps_low_pos=-0.5", f"trainer.run_dir={tmp_path}/r")
    assert p.returncode == 2
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "eps_low_pos" in lines[0] and "-0.5" in lines[0]
    assert "Traceback" not in p.stderr + p.stdout
    assert seconds < 30  # no Ray, no torch import before validation


@pytest.mark.parametrize("override,fragment", [
    ("+preset=regime_lbe", "config group 'preset' has no option 'regime_lbe'; choose one of gpu, longtail, regime_lab"),
    ("algorithm=ppo", "config group 'algorithm' has no option 'ppo'; choose one of base, cispo, dapo, dispo, grpo"),
])
def test_cli_unknown_group_option_is_one_line(tmp_path, override, fragment):
    p, _ = _cli(override, f"trainer.run_dir={tmp_path}/r")
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2 and lines == [f"error: {fragment}"], p.stderr


def test_cli_cfg_job_shows_clip_overrides():
    p, _ = _cli("--cfg", "job", "algorithm=dispo", "algorithm.eps_low_pos=0.25", "algorithm.eps_high_pos=7",
                "algorithm.eps_low_neg=0.9", "algorithm.eps_high_neg=55")
    assert p.returncode == 0, p.stderr
    for line in ("eps_low_pos: 0.25", "eps_high_pos: 7", "eps_low_neg: 0.9", "eps_high_neg: 55"):
        assert line in p.stdout


def test_cli_mistyped_key_gets_one_line_with_suggestions():
    p, _ = _cli("algorithm.eps_low=0.1")
    assert p.returncode == 2
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert lines == ["error: unknown config key 'algorithm.eps_low'; did you mean algorithm.eps_low_pos, "
                     "algorithm.eps_low_neg, algorithm.clip_low?"]
    p, _ = _cli("learner.deepspeed_config.zero_optimization.stage3_max_live_parameters=1000")
    assert p.returncode == 2 and "needs a leading '+'" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    p, _ = _cli("--cfg", "job", "generator=hf", "trainer.collapse_guard.patience=4",  # valid keys pass
                "+learner.deepspeed_config.zero_optimization.stage3_max_live_parameters=1000")
    assert p.returncode == 0 and "patience: 4" in p.stdout and "stage3_max_live_parameters: 1000" in p.stdout
