"""Shared fixtures: one local Ray cluster per test session (starting Ray costs ~4 s and ~0.8 GB),
and the environment every test needs (offline hub, CPU DeepSpeed, small vLLM KV cache)."""
from __future__ import annotations

import os
import sys

import pytest

# Helpers shared by the test folders (tests/support/): the small real run, user-like inputs.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "support"))

TEST_NODE_RESOURCE = "dispo_test_group"  # what a KubeRay worker group advertises (see dispo_ray/infra/placement.py)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("DS_BUILD_OPS", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def call_on(actors, fn) -> list:
    """``fn(actor_instance)`` run inside each actor, results in order."""
    import ray
    return ray.get([a.__ray_call__.remote(fn) for a in actors])


def assigned_resources(actor) -> dict:
    """The resources Ray granted a running actor (what it asked for, as scheduled)."""
    import ray
    return call_on([actor], lambda _: ray.get_runtime_context().get_assigned_resources())[0]


def _has_cuda() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray with more logical CPUs than cores, so fractional actors of every pool fit. The
    node advertises the custom resource TEST_NODE_RESOURCE, so pools can be pinned to it."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False, resources={TEST_NODE_RESOURCE: 1},
                 runtime_env={"env_vars": {k: os.environ[k] for k in (
                     "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "DS_ACCELERATOR", "DS_BUILD_OPS",
                     "VLLM_CPU_KVCACHE_SPACE", "TOKENIZERS_PARALLELISM")}})
    yield ray
    ray.shutdown()
