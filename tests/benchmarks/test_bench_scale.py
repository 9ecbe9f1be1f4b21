"""bench.bench_scale's arithmetic: the growth exponent fit, the parameter split of the rungs, and
the summary it builds from rows (hand-made numbers; no model runs)."""
from __future__ import annotations

import math

import pytest

from bench.bench_scale import RUNGS, fit_exponent, growth, head_share, param_split


def test_fit_exponent_recovers_a_power_law():
    params = [5e6, 5e7, 5e8]
    b, c = fit_exponent(params, [3e-7 * p ** 0.8 for p in params])
    assert b == pytest.approx(0.8) and c == pytest.approx(3e-7)
    b, _ = fit_exponent([1e6, 1e8], [2.0, 20.0])  # two points: the slope through them
    assert b == pytest.approx(0.5)
    # least squares, not the end points: noise around a slope of 1
    b, _ = fit_exponent([1e6, 1e7, 1e8], [1.0, 10.0 * 1.2, 100.0])
    assert 0.95 < b < 1.05
    assert all(math.isnan(x) for x in fit_exponent([1e6], [1.0]))
    assert all(math.isnan(x) for x in fit_exponent([1e6, 1e6], [1.0, 2.0]))


def test_rungs_have_the_real_vocabulary_and_qwen25_05b_shape():
    from transformers import Qwen2Config, Qwen2ForCausalLM
    import torch

    for name, s in RUNGS.items():
        cfg = Qwen2Config(vocab_size=151_936, hidden_size=s["hidden"], num_hidden_layers=s["layers"],
                          num_attention_heads=s["heads"], num_key_value_heads=s["kv"],
                          intermediate_size=s["inter"], tie_word_embeddings=True)
        with torch.device("meta"):
            n = sum(p.numel() for p in Qwen2ForCausalLM(cfg).parameters())
        emb, body = param_split(s)
        assert emb + body == n, name
        assert s["hidden"] // s["heads"] >= 32  # vLLM's CPU attention kernels
    assert sum(param_split(RUNGS["0.5B"])) == 494_032_768  # Qwen2.5-0.5B
    assert 4e6 < sum(param_split(RUNGS["5M"])) < 6e6 and 4e7 < sum(param_split(RUNGS["50M"])) < 6e7
    assert head_share(RUNGS["5M"]) > 0.99 and 0.2 < head_share(RUNGS["0.5B"]) < 0.3


def test_growth_rows_from_hand_made_measurements():
    rows = []
    for rung, p, gen_s, train_s in (("a", 1e6, 1.0, 2.0), ("b", 1e8, 10.0, 200.0)):
        rows.append({"name": f"scale {rung}: generator tokens/s, hf: x", "_rung": rung, "_params": p,
                     "_seconds": gen_s, "_rss": 1 << 30})
        rows.append({"name": f"scale {rung}: learner step, DeepSpeed W=1 / bare", "_rung": rung, "_params": p,
                     "_seconds": train_s, "_rss": int(16 * p)})
    out, lines, walls = growth(rows)
    by = {r["name"]: r["value"] for r in out}
    assert by["scale growth: generate (hf actor) seconds ~ params^b (log-log least squares)"] == 0.5
    assert by["scale growth: train (DeepSpeed W=1) seconds ~ params^b (log-log least squares)"] == 1.0
    assert by["scale growth: sync (bucketed) seconds ~ params^b (log-log least squares)"] == "-"  # not measured
    assert any("16.0 bytes/param" in w for w in walls)
