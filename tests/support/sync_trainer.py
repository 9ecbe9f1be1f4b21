"""A :class:`dispo_ray.rollout.driver.Trainer` with only its weight-sync parts: a real learner group and
generator pool joined by ``Trainer.connect_weight_sync``, so tests drive ``sync_weights`` exactly
as the loop does (CPU tests here, the GPU checks in tests/gpu/)."""
from __future__ import annotations

import threading
from typing import Any, List

from dispo_ray.data.records import PromptRecord


def sync_trainer(cfg: Any, model_path: str):
    from actors.generator import GeneratorPool
    from actors.learner_group import LearnerGroup
    from dispo_ray.rollout.driver import Trainer
    from dispo_ray.rollout.staleness import StalenessGate

    t = Trainer.__new__(Trainer)  # no data, reward pool or warm start: the sync path only
    t.cfg, t.step, t.version, t._sync_lock = cfg, 0, 0, threading.RLock()
    t.gate = StalenessGate(cfg.trainer.max_staleness, version=0)
    t.generators = GeneratorPool(cfg, model_path)
    t.learners = LearnerGroup(cfg, model_path)
    t.connect_weight_sync()
    return t


def records(model_path: str, prompts: List[str]) -> List[PromptRecord]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    return [PromptRecord(uid=f"p/{i}", prompt=p, prompt_token_ids=tok(p)["input_ids"], ground_truth="0",
                         data_source="t") for i, p in enumerate(prompts)]
