"""Pinning each actor pool to its own group of nodes with a custom Ray resource.

On a cluster the generator, learner and reward pools have worker groups of their own (different
GPUs, memory, node pools). GPU counts alone do not keep a learner rank off a generator node, so
each group's nodes advertise a custom resource (the Helm chart starts them with
``rayStartParams.resources: '{"dispo_learner": 1}'`` and so on) and a pool whose
``<pool>.node_resource`` names it asks for ``PIN_AMOUNT`` of it per actor, or per placement-group
bundle. The amount is only a token, the CPU and GPU requests do the accounting: one advertised
unit admits 1 / PIN_AMOUNT = 100 actors per node. ``node_resource: null`` places anywhere.
"""
from __future__ import annotations

import os
import time
from typing import Any, Dict, Optional

PIN_AMOUNT = 0.01


def pin(resource: Optional[str]) -> Dict[str, float]:
    """The resource request that keeps one actor (or bundle) on the nodes advertising ``resource``."""
    return {resource: PIN_AMOUNT} if resource else {}


def wait_for_node_resource(resource: Optional[str], key: str, timeout_s: float, poll_s: float = 1.0) -> None:
    """Block until some node of the running Ray cluster advertises ``resource``; a pool pinned to a
    group that never comes up fails here with one line naming ``key``, instead of its actors
    waiting unscheduled forever. Worker pods may join after the driver starts, hence the wait."""
    if not resource:
        return
    import ray

    deadline = time.monotonic() + timeout_s
    while ray.cluster_resources().get(resource, 0.0) <= 0.0:
        if time.monotonic() >= deadline:
            raise RuntimeError(
                f"{key}={resource!r}: no node of the Ray cluster advertises this resource after {timeout_s:.0f} s "
                f"(start that worker group with rayStartParams resources: '{{\"{resource}\": 1}}', "
                f"or set {key}=null to place the pool anywhere)")
        time.sleep(poll_s)


def cluster_address(cfg: Any) -> Optional[str]:
    """Where Ray runs: ``cluster.address`` when set; else ``auto`` (join) when this process is a
    Ray job's entrypoint (``ray job submit`` sets ``RAY_JOB_CONFIG_JSON_ENV_VAR`` and points
    ``RAY_ADDRESS`` at the cluster) or ``RAY_ADDRESS`` is set; else None (start a local Ray)."""
    if cfg.cluster.address:
        return cfg.cluster.address
    if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or os.environ.get("RAY_ADDRESS"):
        return "auto"
    return None
