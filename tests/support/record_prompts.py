"""A training run that also writes, per step, the prompt uids it trained and generated (one JSON
line each to ``argv[1]``), for tests that check no prompt is lost or trained twice across a kill:

    python tests/support/record_prompts.py OUT.jsonl <hydra overrides...>
"""
from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from dispo_ray.infra.config import compose  # noqa: E402
from dispo_ray.rollout.driver import Trainer  # noqa: E402


def main() -> None:
    out = open(sys.argv[1], "a")
    run = os.environ.get("RECORD_RUN", "")

    def hook(batch, metrics):
        out.write(json.dumps({"run": run, "step": batch.step,
                              "trained": sorted({s.prompt_uid for s in batch.samples}),
                              "generated": sorted({s.prompt_uid for s in batch.generated})}) + "\n")
        out.flush()

    trainer = Trainer(compose(sys.argv[2:]), metrics_hook=hook)
    try:
        trainer.fit()
    finally:
        trainer.shutdown()


if __name__ == "__main__":
    main()
