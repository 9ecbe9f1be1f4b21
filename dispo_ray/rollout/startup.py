"""Start-up, from the command to step 1: each phase timed, the independent ones at once.

    warm start (cache check) -> data -> ray.init -> { reward pool | generator pool | learner group }
                                                  -> weight-sync group

The three pools need only Ray and the model folder, so they start concurrently: each pool's
constructor blocks on its own actors (engine start-up and KV-cache profiling; DeepSpeed's world and
model load; sandbox workers), one thread per pool. Their wall time is then the slowest pool's, not
the sum. The weight-sync group needs all of them and comes last. Phase seconds go to
``summary.json`` (``startup``) and one log line.
"""
from __future__ import annotations

import os
import random
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, List, Tuple

from dispo_ray.infra.placement import cluster_address


class StartupClock:
    """Seconds per named phase, in the order the phases began."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.seconds: Dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(time.perf_counter() - t, 2)

    def finish(self) -> str:
        """Record ``total`` (since the clock was made) and return the one-line summary."""
        parts = ", ".join(f"{k.replace('_', ' ')} {v:.1f} s" for k, v in self.seconds.items())
        self.seconds["total"] = round(time.perf_counter() - self.t0, 2)
        return f"start-up {self.seconds['total']:.1f} s: {parts}"


def start_concurrently(builders: Dict[str, Callable[[], Any]], clock: StartupClock,
                       on_failure: Callable[[Any], None]) -> Dict[str, Any]:
    """Run every builder in its own thread; time each (``clock.seconds[name]``) and the whole
    (``clock.seconds["pools_concurrent"]``). Waits for all of them, so that when one fails the ones that were
    built are handed to ``on_failure`` (to shut them down) before the first failure, in builder
    order, is raised."""
    built: Dict[str, Any] = {}
    errors: List[Tuple[str, BaseException]] = []
    lock = threading.Lock()

    def run(name: str, build: Callable[[], Any]) -> None:
        t = time.perf_counter()
        try:
            obj = build()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread below
            with lock:
                errors.append((name, e))
            return
        finally:
            clock.seconds[name] = round(time.perf_counter() - t, 2)
        with lock:
            built[name] = obj

    with clock.phase("pools_concurrent"):
        threads = [threading.Thread(target=run, args=(n, b), name=f"start-{n}", daemon=True)
                   for n, b in builders.items()]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    if errors:
        for obj in built.values():
            try:
                on_failure(obj)
            except Exception:  # noqa: BLE001 - the builder's error is the one to report
                pass
        order = list(builders)
        raise min(errors, key=lambda ne: order.index(ne[0]))[1]
    return {name: built[name] for name in builders}


def init_ray(cfg: Any) -> None:
    import ray

    if ray.is_initialized():  # e.g. a notebook or a test that started (or joined) Ray itself
        return
    env = {k: v for k, v in os.environ.items() if k in (
        "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "DS_ACCELERATOR", "DS_BUILD_OPS", "VLLM_CPU_KVCACHE_SPACE",
        "TOKENIZERS_PARALLELISM", "OMP_NUM_THREADS")}
    env.setdefault("HF_HUB_OFFLINE", "1")
    address = cluster_address(cfg)
    if address:  # join a running cluster (ray job submit / KubeRay); its size is the cluster's
        ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=False)
    else:
        ray.init(num_cpus=cfg.cluster.num_cpus or max(os.cpu_count() or 2, 8),
                 include_dashboard=cfg.cluster.include_dashboard, runtime_env={"env_vars": env},
                 log_to_driver=False)


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
