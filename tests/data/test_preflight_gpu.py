"""GPUs asked for on a machine without an NVIDIA driver: a local run can never get them, so the
preflight says so in one line; joining a cluster, the GPU nodes are elsewhere and it says nothing."""
from __future__ import annotations

import pytest

from dispo_ray.data import preflight
from dispo_ray.infra.config import compose


def test_gpus_on_a_local_ray_without_a_driver_fail_in_one_line(monkeypatch):
    monkeypatch.setattr("dispo_ray.infra.devices.nvidia_driver_version", lambda: None)  # no nvidia-smi here
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    with pytest.raises(preflight.InputError) as e:
        preflight.check_gpu_node(compose(["+preset=gpu"]))
    msg = str(e.value)
    assert msg.startswith("learner.num_gpus_per_actor=1 (e.g. +preset=gpu) asks for GPUs, but this machine has no "
                          "NVIDIA driver (nvidia-smi not found)") and "\n" not in msg
    preflight.check_gpu_node(compose(["+preset=gpu", "cluster.address=auto"]))  # a cluster: not this node's call
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")  # inside `ray job submit`
    preflight.check_gpu_node(compose(["+preset=gpu"]))
    preflight.check_gpu_node(compose([]))  # no GPUs asked for: nothing to check
