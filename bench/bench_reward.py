"""Reward pool: verifications/s with 1 worker and with N workers (N = 2 .. core count) on the same
batch of 2,000 realistic answers, the scaling ratio ``throughput(N) / (N * throughput(1))``
(goal >= 0.8), and the p99 latency of a batch containing 1% bombs vs the same batch without.

Answers are generated from a seed: integers, fractions vs decimals, radicals, sets, intervals and
polynomials, each written in an equivalent form (right) or perturbed (wrong), inside a few hundred
characters of prose, so every (answer, ground truth) pair is distinct and no cache helps. Bombs
are ``\\binom{10^9}{10^8 + k}``, which the cheap pre-filter does not catch: each one runs into the
sandbox deadline (the worst case; exponent towers are rejected in microseconds). Every pool is
warmed up before timing. The machine may be shared: rerun for stable numbers.
"""
from __future__ import annotations

import os
import random
import statistics
import sys
import time
from typing import Dict, List, Tuple

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


def realistic_batch(n: int, seed: int = 0) -> List[Dict[str, str]]:
    rng = random.Random(seed)
    return [dict(zip(("response_text", "ground_truth"), _pair(rng))) for _ in range(n)]


def _bomb(k: int) -> Dict[str, str]:
    return {"response_text": rf"Thus $\boxed{{\binom{{10^{{9}}}}{{10^{{8}}+{k}}}}}$", "ground_truth": "1"}


def _pool(cfg, n: int):
    from actors.reward_pool import RewardPool

    pool = RewardPool(cfg.reward, max_new_tokens=cfg.generator.max_new_tokens, num_workers=n)
    pool.score(realistic_batch(8 * n, seed=999))  # warm: first parses pull in lazy imports
    return pool


def _throughputs(cfg, ns: List[int], batch, rounds: int) -> Dict[int, float]:
    """Best of ``rounds`` for each pool size; rounds interleave the sizes so that load from
    other processes on a shared machine hits every size alike."""
    pools = {n: _pool(cfg, n) for n in ns}
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

    from dispo_ray.config import compose

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
    size, batches = (200, 2) if quick else (400, 5)
    nw = max(1, min(cores, 2))
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
