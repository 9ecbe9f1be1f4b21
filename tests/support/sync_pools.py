"""The weight sync alone, as the training loop runs it: a real learner group and generator pool
joined by a :class:`dispo_ray.sync.coordinator.WeightSync` (CPU tests here, the GPU checks in
tests/gpu/). No data, reward pool or warm start."""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, List

from dispo_ray.data.records import PromptRecord


@contextlib.contextmanager
def connected_sync(cfg: Any, model_path: str) -> Iterator[Any]:
    """A connected ``WeightSync`` over fresh pools on ``model_path``; the pools are shut down after."""
    from actors.generator import GeneratorPool
    from actors.learner_group import LearnerGroup
    from dispo_ray.sync.coordinator import WeightSync

    generators = learners = None
    try:
        generators = GeneratorPool(cfg, model_path)
        learners = LearnerGroup(cfg, model_path)
        sync = WeightSync(cfg, learners, generators)
        sync.connect()
        yield sync
    finally:
        for pool in (generators, learners):
            if pool is not None:
                pool.shutdown()


def records(model_path: str, prompts: List[str]) -> List[PromptRecord]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    return [PromptRecord(uid=f"p/{i}", prompt=p, prompt_token_ids=tok(p)["input_ids"], ground_truth="0",
                         data_source="t") for i, p in enumerate(prompts)]
