"""hf generator backend: peak memory of one evaluation-sized call on a 151,936-row vocabulary.

A Qwen2 folder with Qwen's real tokenizer (``tests/user_inputs.py``: head_dim 64, 2 layers,
tied embeddings, float32) generates 64 prompts x 2 samples x 512 new tokens (the eos is masked
out of nothing: a random model rarely samples it, so rows run to the limit) in a fresh child
process. Reported: the growth of the child's peak RSS (``ru_maxrss``) from just before the call to
its end, against what keeping the per-step processed scores would take
(``rows x steps x vocab x 4`` bytes: ``generate(output_scores=True)``, the backend before it
decoded by itself); the goal is a peak growth below 1 GiB, whatever the vocabulary.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUDGET_S = 600
BUDGET_QUICK_S = 240
GOAL_BYTES = 1 << 30

CHILD = r"""
import json, resource, sys, time
sys.path[:0] = [{root!r}, {tests!r}]
from types import SimpleNamespace
from user_inputs import qwen_model_dir
from actors.backends.base import SamplingSpec
from actors.backends.hf_backend import HFBackend
path = qwen_model_dir()
g = SimpleNamespace(num_gpus_per_actor=0, seed=0)
be = HFBackend(path, g, "float32", 4096)
tok = be.tokenizer
prompts = [tok.apply_chat_template([{{"role": "user", "content": f"What is {{i}} + {{2 * i}}? Think step by step."}}],
                                   tokenize=False, add_generation_prompt=True) for i in range({prompts})]
ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
t0 = time.perf_counter()
out = be.generate(ids, {n}, SamplingSpec(1.0, 1.0, {tokens}, [], 1))
secs = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
steps = max(len(c.token_ids) for grp in out for c in grp)
print(json.dumps({{"before": before, "peak": peak, "seconds": secs, "steps": steps,
                  "vocab": be.model.get_output_embeddings().weight.shape[0]}}))
"""


def measure(prompts: int, n: int, tokens: int) -> dict:
    """Run one ``generate`` in a fresh process; returns its RSS before/peak, seconds, steps, vocab."""
    code = CHILD.format(root=ROOT, tests=os.path.join(ROOT, "tests"), prompts=prompts, n=n, tokens=tokens)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=BUDGET_S)
    if out.returncode != 0:
        raise RuntimeError(f"hf memory child failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(quick: bool = False) -> list:
    prompts, n, tokens = 64, 2, (64 if quick else 512)
    r = measure(prompts, n, tokens)
    growth = r["peak"] - r["before"]
    scores = prompts * n * r["steps"] * r["vocab"] * 4
    return [{"name": f"hf generator peak RSS growth, {prompts} prompts x {n} x {r['steps']} tokens, vocab {r['vocab']}",
             "value": round(growth / 2**20, 1), "baseline": round(scores / 2**20, 1),
             "ratio": round(growth / scores, 4), "goal": f"< {GOAL_BYTES >> 20} MiB", "unit": "MiB",
             "met": growth < GOAL_BYTES,
             "notes": f"baseline = per-step full-vocabulary scores generate(output_scores=True) would hold; "
                      f"{r['seconds']:.0f} s for the call"}]


if __name__ == "__main__":
    print(json.dumps(main("--quick" in sys.argv), indent=1))
