"""Driver-side run state for checkpoint/resume: step, version, data cursor, RNG of every
component the driver owns, staleness and collapse bookkeeping. The learner saves its own
DeepSpeed checkpoint (model, optimizer, scheduler, RNG) into the same step folder.

Layout: ``<run_dir>/checkpoints/step_<N>/{driver_state.json, learner/}`` and a ``latest`` file
holding the newest complete step folder name (written last, so a crash mid-save never points
at a half-written checkpoint).
"""
from __future__ import annotations

import json
import os
import random
from typing import Any, Dict, Optional

import numpy as np
import torch


def checkpoint_dir(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, "checkpoints", f"step_{step}")


def latest_checkpoint(run_dir: str) -> Optional[str]:
    marker = os.path.join(run_dir, "checkpoints", "latest")
    if not os.path.exists(marker):
        return None
    with open(marker) as f:
        path = os.path.join(run_dir, "checkpoints", f.read().strip())
    return path if os.path.isdir(path) else None


def mark_latest(run_dir: str, step: int) -> None:
    marker = os.path.join(run_dir, "checkpoints", "latest")
    tmp = marker + ".tmp"
    with open(tmp, "w") as f:
        f.write(f"step_{step}")
    os.replace(tmp, marker)


def rng_state() -> Dict[str, Any]:
    np_state = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {"python": [version, list(internal), gauss],
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "torch": torch.get_rng_state().tolist()}


def set_rng_state(state: Dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))


def save_driver_state(path: str, state: Dict[str, Any]) -> None:
    os.makedirs(path, exist_ok=True)
    tmp = os.path.join(path, "driver_state.json.tmp")
    with open(tmp, "w") as f:
        json.dump({**state, "rng": rng_state()}, f)
    os.replace(tmp, os.path.join(path, "driver_state.json"))


def load_driver_state(path: str) -> Dict[str, Any]:
    with open(os.path.join(path, "driver_state.json")) as f:
        state = json.load(f)
    set_rng_state(state.pop("rng"))
    return state
