"""The reward pool against hostile model output, through real Ray actors and real sandboxes.

The corpus is generated here (>= 500 items): exponent towers, bombs that slip past the cheap
pre-filter (killed at the deadline), deeply nested fractions, unbalanced braces, 1 MB strings,
unicode junk and code-injection strings. Scored from a temporary working folder, every item must
finish within the deadline plus a margin, nothing may execute, every result carries a reason, and
the pool must be whole and still correct afterwards.
"""
from __future__ import annotations

import os
import random
import threading
import time

import pytest

from dispo_ray.infra.config import compose
from dispo_ray.reward.scoring import REASONS

MARK = "pwned-marker"
TIMEOUT_S = 1.0
MARGIN_S = 1.0  # kill + reap + spare promotion, on 2 busy shared cores


def _hostile_corpus(seed: int = 0):
    """(response_text, expected reason or None) pairs; None = any reason is acceptable."""
    rng = random.Random(seed)
    out = []
    for i in range(80):  # towers and huge powers: the pre-filter's job
        b = rng.randint(3, 99)
        out.append((rf"so \boxed{{{b}^{{{b}^{{{b}^{{{b}}}}}}}+{i}}}", "too_long"))
    for k in range(7, 37):
        out += [(rf"\boxed{{10^{{10^{{{k}}}}}}}", "too_long"), (rf"\boxed{{(10^{{{k}}})!}}", "too_long")]
    for i in range(20):
        out.append((rf"\boxed{{{rng.randint(10, 99)}**{rng.randint(10, 99)}**{rng.randint(10, 99)}}}",
                    "too_long"))
    out.append((r"\boxed{9^{9^{9^{9}}}+1}", "too_long"))
    for depth in list(range(2, 40, 2)) + [65, 100, 500, 3000] * 3:  # nested fractions
        out.append((r"\boxed{" + r"\frac{1}{" * depth + "2" + "}" * depth + "}", None))
    for i in range(80):  # unbalanced braces
        opens, closes = rng.randint(0, 50), rng.randint(0, 50)
        body = "".join(rng.choice(["{", "}", r"\frac{", "1", "^", "_", r"\boxed{", "x"])
                       for _ in range(rng.randint(1, 60)))
        out.append(("{" * opens + r"\boxed{" + body + "}" * closes, None))
    megabyte = 1 << 20
    out += [("a" * megabyte, "no_answer"), (r"\boxed{" + "1" * megabyte + "}", "too_long"),
            (r"\boxed{1}" * (megabyte // 9), None), ("{" * megabyte, "no_answer"),
            (r"\boxed{" * (megabyte // 7), "no_answer"), ("\u202e" * megabyte, "no_answer"),
            (r"\boxed{" + "{" * (megabyte - 9) + "}", None)]
    for i in range(100):  # unicode junk, inside and outside boxes
        junk = "".join(chr(rng.choice([rng.randint(0x80, 0x2FFF), rng.randint(0x1F300, 0x1FAFF),
                                       0x200B, 0x202E, 0xFEFF, rng.randint(0xD800, 0xDFFF)]))
                       for _ in range(rng.randint(1, 200)))
        out.append((rf"\boxed{{{junk}}}" if i % 2 else junk, None))
    injections = [f"__import__('os').system('touch {MARK}')",
                  f"open('{MARK}', 'w').write('x')",
                  f"exec(\"import os; os.system('touch {MARK}')\")",
                  f"eval(\"__import__('subprocess').call(['touch', '{MARK}'])\")",
                  f"().__class__.__base__.__subclasses__()[0]('touch {MARK}')",
                  f"(lambda: __import__('os').system('touch {MARK}'))()",
                  f"\\text{{{{__import__('os').system('touch {MARK}')}}}}",
                  f"Symbol('x') + __import__('pathlib').Path('{MARK}').touch()"]
    for i in range(104):
        inj = injections[i % len(injections)]
        wrap = [inj, rf"\boxed{{{inj}}}", f"$ {inj} $", rf"\boxed{{1}} {inj}"][(i // 8) % 4]
        out.append((wrap, None))
    malformed = [r"\boxed{\frac{}{}}", r"\boxed{\sqrt}", r"\boxed{\left(}", r"\boxed{\begin{matrix}}",
                 r"\boxed{^^^^}", r"\boxed{_{_{_{}}}}", r"\boxed{\\\\\\}", r"\boxed{\frac{1}{0}}",
                 r"\boxed{0^{0}}", r"\boxed{\infty - \infty}", r"\boxed{%}", r"\boxed{$$$}",
                 r"\boxed{\boxed{\boxed{}}}", "", r"\boxed", r"\boxed{\int_{0}^{\infty}}"]
    out += [(m, None) for m in malformed * 4]
    return out


# Bombs the pre-filter does not recognise; only the parent's kill at the deadline stops them.
EVADERS = [rf"\boxed{{\binom{{10^{{9}}}}{{10^{{8}}+{k}}}}}" for k in range(5)]


@pytest.fixture
def pool_factory(ray_cluster):
    from actors.reward_pool import RewardPool

    made = []

    def make(overrides, **kw):
        cfg = compose(overrides)
        p = RewardPool(cfg.reward, max_new_tokens=cfg.generator.max_new_tokens, **kw)
        made.append(p)
        return p

    yield make
    for p in made:
        p.shutdown()


def test_hostile_corpus_through_the_real_pool(pool_factory, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    corpus = _hostile_corpus()
    step = len(corpus) // len(EVADERS)  # spread out, so each kill finds a warm spare ready
    for j, bomb in enumerate(EVADERS):
        corpus.insert(j * step + step // 2, (bomb, "timeout"))
    assert len(corpus) >= 500
    # soft timer off: every evader must be stopped by the hard kill, the real guarantee
    pool = pool_factory([f"reward.timeout_s={TIMEOUT_S}", "reward.num_workers=2"],
                        sandbox_options={"soft_timeout": False})
    items = [{"response_text": t, "ground_truth": "-17", "data_source": "math"}
             for t, _ in corpus]
    t0 = time.monotonic()
    results = pool.score(items)
    wall = time.monotonic() - t0

    assert len(results) == len(corpus)
    for (text, expected), r in zip(corpus, results):
        assert r.reason in REASONS, (text[:80], r)
        assert r.elapsed_s <= TIMEOUT_S + MARGIN_S, (text[:80], r.elapsed_s)
        assert r.reward == 0.0 and not r.correct
        if expected is not None:
            assert r.reason == expected, (text[:80], r)
    # the evaders really went through the kill path, in parallel with everything else
    assert sum(r.reason == "timeout" for r in results) >= len(EVADERS)
    assert wall < len(EVADERS) * (TIMEOUT_S + MARGIN_S) + 60, wall

    health = pool.health()
    assert health["size"] == health["target"] == health["alive"] == 2
    assert sum(w["replacements"] for w in health["workers"]) >= len(EVADERS)
    assert health["stray_files"] == 0  # no file appeared in any child's scratch dir
    places = {str(tmp_path), os.getcwd()} | {w["cwd"] for w in health["workers"]} | {
        w["child_workdir"] for w in health["workers"]}
    for place in places:
        assert not os.path.exists(os.path.join(place, MARK)), place
    assert not (tmp_path / MARK).exists()

    good = pool.score([{"response_text": r"so $\boxed{\frac{1}{2}}$", "ground_truth": "0.5"},
                       {"response_text": r"\boxed{2\sqrt{2}}", "ground_truth": r"\sqrt{8}"}])
    assert [(r.reason, r.correct, r.reward) for r in good] == [("ok", True, 1.0)] * 2


def _numbered_batch(n):
    """Item i has ground truth i; every third answer is off by one."""
    items = [{"response_text": rf"\boxed{{{i if i % 3 else i + 1}}}", "ground_truth": str(i)}
             for i in range(n)]
    expected = ["ok" if i % 3 else "wrong" for i in range(n)]
    return items, expected


def test_dead_worker_is_replaced_and_its_chunk_rescored(pool_factory):
    import ray

    pool = pool_factory(["reward.timeout_s=1.0", "reward.num_workers=2"], chunk_size=4)
    items, expected = _numbered_batch(60)

    victim = pool.workers[0]
    ray.kill(victim, no_restart=True)  # dead before the batch
    assert [r.reason for r in pool.score(items)] == expected
    assert victim not in pool.workers and pool.replaced == 1

    # dead in the middle of a batch kept busy by two slow items
    slow = [{"response_text": EVADERS[0], "ground_truth": "1"}] * 2
    batch = slow + items
    victim = pool.workers[1]
    killer = threading.Timer(0.4, lambda: ray.kill(victim, no_restart=True))
    killer.start()
    results = pool.score(batch)
    killer.join()
    assert len(results) == len(batch)
    assert [r.reason for r in results[2:]] == expected  # nothing lost, nothing shuffled
    assert [r.reason for r in results[:2]] == ["timeout", "timeout"]
    assert victim not in pool.workers and pool.replaced == 2
    h = pool.health()
    assert h["size"] == h["alive"] == 2


def test_score_samples_fills_fields_and_rejects_bad_items(pool_factory):
    from dispo_ray.sample import Sample

    pool = pool_factory(["reward.num_workers=1", "reward.overlong_buffer=8",
                         "generator.max_new_tokens=16"])
    mk = lambda text, gt, n: Sample("p", [1], list(range(n)), [0.0] * n, 0, response_text=text,
                                    ground_truth=gt, data_source="gsm8k")
    samples = [mk(r"\boxed{3}", "3", 4), mk("#### 7", "#### 7", 12), mk("nothing", "3", 16),
               mk(r"\boxed{4}", "3", 10)]
    results = pool.score_samples(samples)
    # overlong: free up to 16 - 8 = 8 tokens, then -(len - 8) / 8
    assert [(s.reward, s.correct, s.reason) for s in samples] == [
        (1.0, True, "ok"), (0.5, True, "ok"), (-1.0, False, "no_answer"), (-0.25, False, "wrong")]
    assert [r.answer for r in results] == ["3", "7", None, "4"]
    assert pool.score([]) == []
    with pytest.raises(ValueError, match="reward item 1: missing key"):
        pool.score([{"response_text": "", "ground_truth": "1"}, {"response_text": "x"}])
    with pytest.raises(TypeError, match="reward item 0"):
        pool.score([42])
    assert len(pool) == pool.size == 1


def test_guided_chunks_shrink_towards_the_end_and_cover_the_batch_once():
    import collections

    from actors.reward_pool import next_chunk

    fresh = collections.deque([(0, 2000)])
    chunks = []
    while fresh:
        chunks.append(next_chunk(fresh, 2))
    sizes = [e - s for s, e in chunks]
    assert sizes[0] == 64 and sizes[-1] <= 4  # 1/(2W) of what is left, clamped to 4..64
    assert sizes == sorted(sizes, reverse=True)
    assert [s for s, _ in chunks] == [0] + [e for _, e in chunks[:-1]] and chunks[-1][1] == 2000
    # remaining 100 with 2 workers: ceil(100 / 4) = 25
    assert next_chunk(collections.deque([(1900, 2000)]), 2) == (1900, 1925)
    assert next_chunk(collections.deque([(0, 5)]), 2, chunk_size=7) == (0, 5)
    rest = collections.deque([(0, 20)])  # a fixed chunk_size overrides the guided size
    assert [next_chunk(rest, 2, chunk_size=7) for _ in range(3)] == [(0, 7), (7, 14), (14, 20)] and not rest


def test_verdict_cache_is_a_bounded_lru_of_deterministic_verdicts():
    from actors.reward_pool import VerdictCache

    c = VerdictCache(2)
    c.put(("a", "1"), "ok")
    c.put(("b", "1"), "wrong")
    assert c.get(("a", "1")) == "ok"  # a is now the most recent
    c.put(("c", "1"), "no_answer")  # evicts b, the least recently used
    assert (c.get(("b", "1")), c.get(("a", "1")), c.get(("c", "1"))) == (None, "ok", "no_answer")
    for reason in ("timeout", "crashed", "too_long"):  # a deadline may be load, not the answer
        c.put(("d", "1"), reason)
        assert c.get(("d", "1")) is None
    assert (c.hits, len(c)) == (3, 2)
    off = VerdictCache(0)
    off.put(("a", "1"), "ok")
    assert off.get(("a", "1")) is None and len(off) == 0
    with pytest.raises(ValueError, match="verdict cache size must be >= 0"):
        VerdictCache(-1)


def test_pool_cache_serves_repeats_and_never_keeps_a_timeout(pool_factory):
    pool = pool_factory([f"reward.timeout_s={TIMEOUT_S}", "reward.num_workers=1"], chunk_size=64)
    # a group of 8 samples: three ways of writing the right answer (the prose differs, the
    # answer span does not), two wrong ones, and a bomb twice
    right = [r"Adding, we find $\boxed{\frac{1}{2}}$.", r"Hence $\boxed{\frac{1}{2}}$.",
             r"So the answer is \boxed{0.5}"]
    group = [right[0], right[1], right[2], right[2], r"so $\boxed{\frac{1}{3}}$", r"so $\boxed{\frac{1}{3}}$",
             EVADERS[0], EVADERS[0]]
    items = [{"response_text": t, "ground_truth": "0.5"} for t in group]
    expected = ["ok"] * 4 + ["wrong", "wrong", "timeout", "timeout"]
    assert [r.reason for r in pool.score(items)] == expected
    h = pool.health()
    # spans: $\boxed{\frac{1}{2}}$ (twice), \boxed{0.5} (twice), the wrong one (twice), the bomb
    # (twice): four verifications, the repeats shared within the chunk; one deadline, not two
    assert (h["cache_hits"], h["timeouts"], h["workers"][0]["verified"]) == (0, 1, 4)
    again = pool.score(items)
    assert [r.reason for r in again] == expected
    h = pool.health()
    assert h["cache_hits"] == 6 and h["timeouts"] == 2  # the bomb was verified (and killed) again
    assert all(r.elapsed_s < 0.5 for r in again[:6])
    with pytest.raises(ValueError, match="cache_size must be >= 0"):
        pool_factory(["reward.num_workers=1"], cache_size=-1)
