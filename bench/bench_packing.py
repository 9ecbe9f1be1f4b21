"""Packed vs padded learner micro-batches: tokens/s of the learner's training step with
``learner.max_tokens_per_micro_batch`` (packed, unpadded, one causal sdpa per sequence) divided by
the padded reference (``micro_batch_size`` samples right-padded to the longest of each micro-batch).

Same process, same DeepSpeed engine (world size 1, so stage 0: actors.deepspeed_setup; one CPU thread), same Qwen2-shaped
random model built in code (hidden 256, 3 layers, 4 heads of 64, 2 KV heads, vocabulary 4096: the
tiny demo model, 0.3 M parameters, is too small to show padding's cost), same samples. Two length
distributions:

* **long tail**: prompt 64 + response log-normal with median ~300 and p95 ~2,000 tokens (sigma 1.15),
  capped at 3,072 (the generator's ``max_new_tokens``), 48 samples a step (16 with --quick); padded micro-batches of
  4 samples vs a budget of 4,096 tokens (~ the padded micro-batch's worst case / 3);
* **demo**: the tiny task's short answers (prompts of 8-14 tokens, responses of 3-11), 128 samples;
  padded micro-batches of 16 (the default) vs a budget of 16 x 24 = 384 tokens.

Steps alternate (padded, packed, padded, ...) after a warm-up of each; the ratio of the medians of
the per-step times is reported (tokens = attention-mask tokens, the same on both sides).
"""
from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from typing import Dict, List

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

BUDGET_S = 600  # run_all's per-module limits (s): the full run took ~6 min on the 2-core VM
BUDGET_QUICK_S = 180
VOCAB = 4096


def _model(folder: str) -> str:
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=256, intermediate_size=704, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    Qwen2ForCausalLM(cfg).save_pretrained(folder)
    return folder


def _samples(kind: str, n: int, seed: int = 0):
    from dispo_ray.sample import Sample
    rng = np.random.default_rng(seed)
    if kind == "long_tail":
        prompts = np.full(n, 64)
        responses = np.clip(rng.lognormal(np.log(300), 1.15, n).round().astype(int), 8, 3072)
    else:
        prompts, responses = rng.integers(8, 15, n), rng.integers(3, 12, n)
    out = []
    for i, (p, r) in enumerate(zip(prompts, responses)):
        out.append(Sample(str(i // 8), rng.integers(4, VOCAB, p).tolist(), rng.integers(4, VOCAB, r).tolist(),
                          (-4.0 + 0.2 * rng.standard_normal(r)).tolist(), 0, correct=i % 2 == 0,
                          advantage=1.0 if i % 2 == 0 else -1.0))
    return out


def _overrides(mbs: int) -> List[str]:
    return ["learner.num_actors=1", "learner.zero_stage=1", "learner.num_cpus_per_actor=1", "learner.mini_batches=1",
            f"learner.micro_batch_size={mbs}", "learner.max_tokens_per_micro_batch=4096",
            "data.max_prompt_length=64", "generator.max_new_tokens=3072"]


def _measure(worker, kind: str, n: int, mbs: int, budget: int, rounds: int) -> Dict[str, float]:
    from dispo_ray.algorithm.packing import packed_shards
    from dispo_ray.infra.config import compose
    from dispo_ray.rollout.samples import collate
    batch = collate(_samples(kind, n), pad_token_id=0)
    m = batch["response_mask"]
    counts = ([float(m.sum())], [float((m.sum(-1) > 0).sum())])
    shard, plan = packed_shards(batch, budget, 1)[0]
    worker.cfg = compose(_overrides(mbs))  # the padded side's micro_batch_size
    sides = {"padded": lambda: worker.train_step([batch], *counts),
             "packed": lambda: worker.train_step([shard], *counts, None, [plan])}
    times: Dict[str, List[float]] = {k: [] for k in sides}
    for i in range(rounds + 1):  # round 0 warms both up
        for side, step in sides.items():
            t0 = time.perf_counter()
            step()
            if i:
                times[side].append(time.perf_counter() - t0)
    tokens = float(batch["attention_mask"].sum())
    lengths = batch["attention_mask"].sum(-1)
    padded_tokens = sum(int(lengths[lo:lo + mbs].max()) * len(lengths[lo:lo + mbs]) for lo in range(0, n, mbs))
    return {"packed": tokens / statistics.median(times["packed"]), "padded": tokens / statistics.median(times["padded"]),
            "tokens": tokens, "padded_tokens": padded_tokens, "micro_batches": len(plan),
            "p50": float(lengths.median()), "p95": float(lengths.float().quantile(0.95)), "max": int(lengths.max())}


def main(quick: bool = False) -> List[dict]:
    from actors.learner import LearnerWorker
    from dispo_ray.infra.config import compose
    from dispo_ray.sync.protocol import find_free_port
    cases = [("long_tail", 16 if quick else 48, 4, 4096), ("demo", 128, 16, 384)]
    rounds = 2 if quick else 5
    with tempfile.TemporaryDirectory(prefix="bench-packing-") as d:
        path = _model(os.path.join(d, "model"))
        worker = LearnerWorker(compose(_overrides(4)), path, 0, 1)
        worker.setup("127.0.0.1", find_free_port())
        torch.set_num_threads(1)
        rows = []
        for kind, n, mbs, budget in cases:
            r = _measure(worker, kind, n, mbs, budget, rounds)
            goal = ">= 1.5" if kind == "long_tail" else ">= 0.95"
            rows.append({
                "name": f"learner packed / padded micro-batches ({kind.replace('_', ' ')})",
                "value": round(r["packed"], 1), "baseline": round(r["padded"], 1),
                "ratio": round(r["packed"] / r["padded"], 3), "goal": goal, "unit": "tokens/s",
                "notes": f"{n} samples, length p50 {r['p50']:.0f} / p95 {r['p95']:.0f} / max {r['max']}; "
                         f"padded {mbs} a micro-batch ({r['padded_tokens']} tokens with padding for "
                         f"{r['tokens']:.0f}), packed {budget}-token budget ({r['micro_batches']} micro-batches); "
                         f"Qwen2 256x3, vocab {VOCAB}, DeepSpeed W=1 (stage 0), 1 thread, median of {rounds} alternating steps"})
        worker.shutdown()
    return rows


if __name__ == "__main__":
    from bench import print_rows

    print_rows(main(quick="--quick" in sys.argv))
