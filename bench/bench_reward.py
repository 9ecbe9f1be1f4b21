"""Reward pool: verifications/s with 1 worker and with N workers (N = 2 .. core count) on the same
batch of 2,000 realistic answers, the scaling ratio ``throughput(N) / (N * throughput(1))``
(goal >= 0.8), the p99 latency of a batch containing 1% bombs vs the same batch without, and
verifications/s with the verdict cache vs without on RL-shaped batches (groups of G samples per
prompt that repeat answers): the tiny arithmetic task, and a mixed set with long answers.

Answers are generated from a seed: integers, fractions vs decimals, radicals, sets, intervals and
polynomials, each written in an equivalent form (right) or perturbed (wrong), inside a few hundred
characters of prose, so every (answer, ground truth) pair is distinct; the scaling rows re-score
one batch per round and so run with the verdict cache off. Bombs
are ``\\binom{10^9}{10^8 + k}``, which the cheap pre-filter does not catch: each one runs into the
sandbox deadline (the worst case; exponent towers are rejected in microseconds). Every pool is
warmed up before timing. The machine may be shared: rerun for stable numbers.

The cache rows time two pools of the same size, one with the cache and one without, on the same
fresh batches (a new batch each round, so only repeats within a batch can hit, as in training).
"""
from __future__ import annotations

import os
import random
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_PROSE = ["Let us compute step by step.", "First, simplify the expression.",
          "By the quadratic formula we get", "Substituting back, we verify the result.",
          "Hence the required value is", "Note that the constraint is satisfied."]


def _pair(rng: random.Random) -> Tuple[str, str]:
    """One (model answer, ground truth) pair in a random style; right about half the time."""
    kind = rng.randrange(6)
    right = rng.random() < 0.5
    a, b = rng.randint(1, 999), rng.randint(2, 97)
    if kind == 0:
        gt, ans = str(a * b), str(a * b if right else a * b + rng.choice([-1, 1]))
    elif kind == 1:
        gt = rf"\frac{{{a}}}{{{b * 8}}}"
        ans = f"{a / (b * 8):.6f}".rstrip("0") if right else rf"\frac{{{a + 1}}}{{{b * 8}}}"
    elif kind == 2:
        k = rng.randint(2, 30)
        gt = rf"{k}\sqrt{{{b}}}"
        ans = rf"\sqrt{{{k * k * b}}}" if right else rf"\sqrt{{{k * k * b + 1}}}"
    elif kind == 3:
        s = rng.sample(range(-50, 50), 3)
        gt = r"\{" + ", ".join(map(str, s)) + r"\}"
        t = s[::-1] if right else s[:2] + [s[2] + 1]
        ans = r"\{" + ", ".join(map(str, t)) + r"\}"
    elif kind == 4:
        gt = rf"({a}, {a + b}]"
        ans = gt if right else rf"[{a}, {a + b}]"
    else:
        gt = rf"(x+{a})^2"
        ans = rf"x^2 + {2 * a}x + {a * a}" if right else rf"x^2 + {2 * a}x + {a * a + 1}"
    prose = " ".join(rng.choice(_PROSE) + f" {rng.randint(0, 10**6)}" for _ in range(rng.randint(4, 12)))
    return f"{prose} Therefore the answer is $\\boxed{{{ans}}}$.", gt


def tiny_task_batch(prompts: int, group: int, seed: int) -> List[Dict[str, str]]:
    """Tiny-task groups: ``a <op> b`` with 1-2 digit operands, each sample ``\boxed{n}`` (the
    task's response format), right about half the time, else one of a few near misses."""
    from dispo_ray.tiny.task import solution_text, solve

    rng = random.Random(seed)
    out = []
    for _ in range(prompts):
        a, b, op = rng.randint(0, 99), rng.randint(0, 99), rng.choice("+-*")
        truth = solve(a, op, b)
        wrong = [truth + 1, truth - 1, truth + 10]
        for _ in range(group):
            ans = truth if rng.random() < 0.5 else rng.choice(wrong)
            out.append({"response_text": solution_text(ans), "ground_truth": str(truth),
                        "data_source": "tiny_arith"})
    return out


def _forms(rng: random.Random) -> Tuple[str, List[str]]:
    """A ground truth of a random style and three written answers: two right forms, one wrong."""
    a, b, k = rng.randint(1, 999), rng.randint(2, 97), rng.randint(2, 30)
    kind = rng.randrange(5)
    if kind == 0:
        return str(a * b), [str(a * b), f"{a * b}.0", str(a * b + 1)]
    if kind == 1:
        return (rf"\frac{{{a}}}{{{b * 8}}}", [rf"\dfrac{{{a}}}{{{b * 8}}}", f"{a / (b * 8):.6f}".rstrip("0"),
                                               rf"\frac{{{a + 1}}}{{{b * 8}}}"])
    if kind == 2:
        return rf"{k}\sqrt{{{b}}}", [rf"\sqrt{{{k * k * b}}}", rf"{k}\sqrt{{{b}}}", rf"\sqrt{{{k * k * b + 1}}}"]
    if kind == 3:
        s = rng.sample(range(-50, 50), 3)
        sets = [s, s[::-1], s[:2] + [s[2] + 1]]
        return r"\{" + ", ".join(map(str, s)) + r"\}", [r"\{" + ", ".join(map(str, t)) + r"\}" for t in sets]
    return rf"(x+{a})^2", [rf"x^2 + {2 * a}x + {a * a}", rf"(x + {a})^2", rf"x^2 + {2 * a}x + {a * a + 1}"]


def mixed_long_batch(prompts: int, group: int, seed: int) -> List[Dict[str, str]]:
    """Groups with long answers: per prompt one ground truth of a random style, each sample
    1-3k characters of its own reasoning ending in one of three written answers (two right
    forms, one wrong); a tenth of them box a second answer next to it."""
    rng = random.Random(seed)
    out = []
    for _ in range(prompts):
        gt, answers = _forms(rng)
        for _ in range(group):
            prose = " ".join(rng.choice(_PROSE) + f" {rng.randint(0, 10**6)}"
                             for _ in range(rng.randint(25, 80)))
            tail = rf"$\boxed{{{rng.choice(answers)}}}$"
            if rng.random() < 0.1:
                tail += r" and $\boxed{0}$"
            out.append({"response_text": f"{prose} Therefore the answer is {tail}.", "ground_truth": gt})
    return out


def realistic_batch(n: int, seed: int = 0) -> List[Dict[str, str]]:
    rng = random.Random(seed)
    return [dict(zip(("response_text", "ground_truth"), _pair(rng))) for _ in range(n)]


def _bomb(k: int) -> Dict[str, str]:
    return {"response_text": rf"Thus $\boxed{{\binom{{10^{{9}}}}{{10^{{8}}+{k}}}}}$", "ground_truth": "1"}


def _pool(cfg, n: int, cache_size: Optional[int] = None):
    from actors.reward_pool import CACHE_SIZE, RewardPool

    pool = RewardPool(cfg.reward, max_new_tokens=cfg.generator.max_new_tokens, num_workers=n,
                      cache_size=CACHE_SIZE if cache_size is None else cache_size)
    pool.score(realistic_batch(8 * n, seed=999))  # warm: first parses pull in lazy imports
    return pool


def _throughputs(cfg, ns: List[int], batch, rounds: int) -> Dict[int, float]:
    """Best of ``rounds`` for each pool size; rounds interleave the sizes so that load from
    other processes on a shared machine hits every size alike."""
    pools = {n: _pool(cfg, n, cache_size=0) for n in ns}  # rounds re-score one batch: no cache
    best = {n: 0.0 for n in ns}
    try:
        for _ in range(rounds):
            for n in ns:
                t0 = time.perf_counter()
                pools[n].score(batch)
                best[n] = max(best[n], len(batch) / (time.perf_counter() - t0))
    finally:
        for p in pools.values():
            p.shutdown()
    return best


def _cache_throughputs(cfg, n_workers: int, sets: Dict[str, Callable[[int], list]], rounds: int):
    """``({set: (best verifications/s with the cache, without)}, {cached: sandbox verifications})``:
    two pools, the same fresh batch per round for both, interleaved so that outside load hits
    both alike."""
    pools = {True: _pool(cfg, n_workers), False: _pool(cfg, n_workers, cache_size=0)}
    best = {(name, c): 0.0 for name in sets for c in pools}
    try:
        for r in range(rounds):
            for name, make in sets.items():
                batch = make(1000 + r)
                for cached in (True, False) if r % 2 else (False, True):  # alternate who goes first
                    pool = pools[cached]
                    t0 = time.perf_counter()
                    pool.score(batch)
                    best[name, cached] = max(best[name, cached], len(batch) / (time.perf_counter() - t0))
        verified = {c: sum(w["verified"] for w in p.health()["workers"]) for c, p in pools.items()}
    finally:
        for p in pools.values():
            p.shutdown()
    return {name: (best[name, True], best[name, False]) for name in sets}, verified


def _p99(xs: List[float]) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(0.99 * (len(xs) - 1))))]


def _bomb_latency(cfg, n_workers: int, batches: int, size: int):
    """Batch wall times and per-item latencies, clean vs 1% bombs, on one warm pool."""
    pool = _pool(cfg, n_workers)
    clean_b, bomb_b, clean_i, bomb_i = [], [], [], []
    try:
        for r in range(batches):
            clean = realistic_batch(size, seed=100 + r)
            bombed = realistic_batch(size, seed=200 + r)
            n_bombs = max(1, size // 100)
            for j in range(n_bombs):
                bombed[(j * size) // n_bombs + size // (2 * n_bombs)] = _bomb(r * 100 + j)
            for batch, walls, items in ((clean, clean_b, clean_i), (bombed, bomb_b, bomb_i)):
                t0 = time.perf_counter()
                res = pool.score(batch)
                walls.append(time.perf_counter() - t0)
                items += [x.elapsed_s for x in res]
        timeouts = pool.health()["timeouts"]
    finally:
        pool.shutdown()
    return clean_b, bomb_b, clean_i, bomb_i, timeouts


def main(quick: bool = False) -> List[dict]:
    import ray

    from dispo_ray.infra.config import compose

    cores = os.cpu_count() or 1
    if not ray.is_initialized():
        ray.init(num_cpus=max(4, cores), include_dashboard=False, log_to_driver=False)
    n_items = 400 if quick else 2000
    timeout_s = 2.0
    cfg = compose([f"reward.timeout_s={timeout_s}", "reward.num_cpus_per_worker=1"])
    batch = realistic_batch(n_items, seed=1)
    rows = []
    rounds = 1 if quick else 3
    thr = _throughputs(cfg, list(range(1, cores + 1)), batch, rounds)
    thr1 = thr[1]
    rows.append({"name": "reward verifications/s, 1 worker", "value": round(thr1, 1),
                 "baseline": "-", "ratio": "-", "goal": "-", "unit": "verifications/s",
                 "notes": f"{n_items} realistic answers (~half right), warm pool, best of {rounds}"})
    for n in range(2, cores + 1):
        rows.append({"name": f"reward scaling, {n} workers: thr(N) / (N * thr(1))",
                     "value": round(thr[n], 1), "baseline": round(n * thr1, 1),
                     "ratio": round(thr[n] / (n * thr1), 3), "goal": ">= 0.8",
                     "unit": "verifications/s",
                     "notes": f"{cores} cores; same batch as 1 worker; best of {rounds}, interleaved"})
    nw = max(1, min(cores, 2))
    group = cfg.algorithm.group_size
    tiny_p, long_p = (32, 16) if quick else (64, 32)
    sets = {"tiny task": lambda s: tiny_task_batch(tiny_p, group, s),
            "mixed long answers": lambda s: mixed_long_batch(long_p, group, s)}
    cached, verified = _cache_throughputs(cfg, nw, sets, max(rounds, 2))
    for name, (on, off) in cached.items():
        n_set = len(sets[name](0))
        rows.append({"name": f"reward verifications/s, {name}: verdict cache vs none",
                     "value": round(on, 1), "baseline": round(off, 1), "ratio": round(on / off, 2),
                     "goal": "-", "unit": "verifications/s",
                     "notes": f"{n_set} items = {n_set // group} prompts x G={group}, {nw} workers, "
                              f"a fresh batch per round, best of {max(rounds, 2)}; the sandboxes ran "
                              f"{verified[True]} verifications with the cache, {verified[False]} without (all sets)"})
    size, batches = (200, 2) if quick else (400, 5)
    cb, bb, ci, bi, timeouts = _bomb_latency(cfg, nw, batches, size)
    rows.append({"name": "reward p99 batch latency, 1% bombs vs none", "value": round(_p99(bb), 3),
                 "baseline": round(_p99(cb), 3), "ratio": round(_p99(bb) / _p99(cb), 2),
                 "goal": "-", "unit": "s",
                 "notes": f"{batches} batches x {size}, {nw} workers, timeout_s={timeout_s}; "
                          f"median {statistics.median(bb):.2f} vs {statistics.median(cb):.2f} s; "
                          f"{timeouts} bombs hit the deadline"})
    rows.append({"name": "reward p99 item latency, 1% bombs vs none", "value": round(_p99(bi), 4),
                 "baseline": round(_p99(ci), 4), "ratio": round(_p99(bi) / _p99(ci), 2),
                 "goal": f"max <= {timeout_s} + overhead", "unit": "s",
                 "notes": f"max item {max(bi):.3f} s (bombs), {max(ci):.3f} s (clean)"})
    return rows


if __name__ == "__main__":
    from bench import print_rows

    print_rows(main(quick="--quick" in sys.argv))
