"""The long-tail tiny task (``+preset=longtail``, issue 28): a discrete Pareto column count whose
probabilities and draws are checked by hand; correct responses whose token lengths are
hand-counted; the preset's problems, whose correct responses already have p99 / median >= 8; the
warm start's length-bucketed micro-batches, which give the full batch's gradient; and the
warm-started preset model sampled through the real vLLM engine, whose responses keep the ratio."""
from __future__ import annotations

import collections
import hashlib
import json
import math
import re
import statistics
from dataclasses import asdict

import pytest

from dispo_ray.infra.config import compose
from dispo_ray.tiny.task import (_task_hash, longtail_columns, longtail_probability, make_problems,
                                 prompt_text, response_text)

K = 28  # the preset's max_digits


def columns(e) -> int:
    return max(len(str(e["a"])), len(str(e["b"])))


def pctl(sorted_xs, p):
    return sorted_xs[min(len(sorted_xs) - 1, int(p * len(sorted_xs)))]


def test_the_column_law_by_hand():
    assert longtail_probability(2, K) == pytest.approx(2 / 3)
    assert longtail_probability(3, K) == pytest.approx(2 / 15)
    assert longtail_probability(4, K) == pytest.approx(2 / 35)
    assert longtail_probability(K, K) == pytest.approx(1 / 53)  # the whole tail beyond the cap
    assert longtail_probability(1, K) == longtail_probability(K + 1, K) == 0
    assert math.fsum(longtail_probability(k, K) for k in range(K + 2)) == pytest.approx(1)
    for k in range(2, K + 1):  # survival 1/(2k-3): Pareto of index 1
        assert math.fsum(longtail_probability(j, K) for j in range(k, K + 1)) == pytest.approx(1 / (2 * k - 3))
    # n = floor((3 + 1/u) / 2): u = 1 -> 2; u = 1/3 -> 3; u = 1/5 -> 4; just above 1/3 -> 2; tiny u -> the cap
    assert [longtail_columns(u, K) for u in (1.0, 0.5, 0.34, 1 / 3, 0.2, 1e-9)] == [2, 2, 2, 3, 4, K]


def test_hand_counted_response_lengths():
    # one token per character, plus </s>
    assert response_text(10, "+", 0, "working") == "0+0+0=0\n1+0+0=1\n\\boxed{10}"  # 26 characters
    assert len(response_text(10, "+", 0, "working")) + 1 == 27
    # the longest preset response: 28 columns with a carry each ("9+1+0=10", "9+0+1=10" x 27) and a
    # 29-digit sum: 28 x 9 + len("\boxed{}") + 29 = 289 characters, 290 tokens <= max_new_tokens
    longest = response_text(int("9" * K), "+", 1, "working")
    assert longest.splitlines()[:2] == ["9+1+0=10", "9+0+1=10"] and len(longest) == 28 * 9 + 8 + 29
    cfg = compose(["+preset=longtail"])
    assert len(longest) + 1 <= cfg.generator.max_new_tokens
    assert cfg.data.max_prompt_length + cfg.generator.max_new_tokens <= cfg.model.tiny.max_position_embeddings
    assert len(prompt_text(int("9" * K), "+", int("9" * K))) + 1 <= cfg.data.max_prompt_length  # with <s>


def test_preset_problems_follow_the_law_and_their_answers_have_the_long_tail():
    cfg = compose(["+preset=longtail"])
    t = cfg.data.tiny_task
    assert (t.style, t.digits, t.max_digits, list(t.ops)) == ("working", "longtail", K, ["+"])
    splits = make_problems(t)
    rows = splits["val"] + splits["train"]
    keys = {(r["extra_info"]["a"], r["extra_info"]["b"]) for r in rows}
    assert len(keys) == len(rows) == t.num_train + t.num_val  # distinct, so val and train never share one
    counts = collections.Counter(columns(r["extra_info"]) for r in rows)
    assert min(counts) == 2 and max(counts) == K
    for k in (2, 3, 4, K):  # a repeat redraws operands, not the column count: within 4 binomial sds
        p = longtail_probability(k, K)
        assert abs(counts[k] - p * len(rows)) < 4 * math.sqrt(len(rows) * p * (1 - p)), (k, counts[k])
    # the correct responses already carry the tail the preset is for
    lengths = sorted(len(response_text(r["extra_info"]["a"], "+", r["extra_info"]["b"], "working")) + 1
                     for r in splits["train"])
    assert statistics.median(lengths) < 32 and pctl(lengths, 0.99) / statistics.median(lengths) >= 8


def test_parquet_holds_operands_beyond_int64(tmp_path):
    import pyarrow.parquet as pq

    from dispo_ray.tiny.task import tiny_task_files

    cfg = compose(["+preset=longtail", f"model.cache_dir={tmp_path}"])
    train, val = tiny_task_files(cfg)
    rows = pq.read_table(val).to_pylist()
    expect = make_problems(cfg.data.tiny_task)["val"]
    assert [(r["extra_info"]["a"], r["extra_info"]["b"]) for r in rows] == \
        [(str(e["extra_info"]["a"]), str(e["extra_info"]["b"])) for e in expect]  # decimal strings, exact
    assert max(len(r["extra_info"]["a"]) for r in rows) > 18
    default = pq.read_table(tiny_task_files(compose([f"model.cache_dir={tmp_path}"]))[1]).to_pylist()
    assert isinstance(default[0]["extra_info"]["a"], int)  # the default task's files are as they were


def test_uniform_task_hash_is_unchanged_by_the_digits_key():
    """The default's caches (task parquet, warm start) keep their keys: ``digits: uniform`` is left out."""
    t = compose([]).data.tiny_task
    d = asdict(t)
    assert d.pop("digits") == "uniform"
    blob = json.dumps({"task": d, "format": 1}, sort_keys=True, default=list)
    assert _task_hash(t) == hashlib.sha256(blob.encode()).hexdigest()[:12]
    assert _task_hash(compose(["+preset=longtail"]).data.tiny_task) != _task_hash(t)


def test_micro_batches_cut_by_padded_tokens_and_give_the_full_batch_gradient(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from dispo_ray.tiny.model import build_tiny_model
    from dispo_ray.tiny.warmstart import _batch, micro_batches

    pairs = [([1] * 3, [5] * 30), ([1] * 3, [6] * 2), ([1] * 3, [7] * 4), ([1] * 3, [8] * 5)]
    # shortest first: lengths 5, 7, 8 fit 3 x 8 = 24 <= 24; the 33-token row goes alone
    assert [[len(p) + len(y) for p, y in mb] for mb in micro_batches(pairs, 24)] == [[5, 7, 8], [33]]
    assert [[len(p) + len(y) for p, y in mb] for mb in micro_batches(pairs, 15)] == [[5, 7], [8], [33]]

    model = AutoModelForCausalLM.from_pretrained(build_tiny_model(compose([f"model.cache_dir={tmp_path}"]).model),
                                                 dtype=torch.float32)

    def grads(groups, reduction):
        model.zero_grad(set_to_none=True)
        n = sum(len(y) for _, y in pairs)
        for mb in groups:
            ids, mask, labels = _batch(mb, 0)
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                                     ignore_index=-100, reduction=reduction)
            (loss / n if reduction == "sum" else loss).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    assert torch.allclose(grads([pairs], "mean"), grads(micro_batches(pairs, 24), "sum"), atol=1e-6)


def test_warm_started_preset_model_under_vllm_has_the_long_tail():
    """The preset's model (the cached warm start, built here on first use) sampled at temperature 1
    through vLLM on 512 train prompts: p99 / median >= 8 in tokens, and accuracy neither 0 nor 1."""
    import time

    from actors.backends.base import SamplingSpec
    from actors.backends.vllm_backend import VLLMBackend
    from dispo_ray.tiny.warmstart import warm_started_model_dir, warmstart_info

    cfg = compose(["+preset=longtail"])
    t0 = time.perf_counter()
    path = warm_started_model_dir(cfg)
    built_s = time.perf_counter() - t0
    info = warmstart_info(cfg)
    print(f"warm start: {info['steps']} steps, {info['train_seconds']} s training (this call {built_s:.1f} s)")
    rows = make_problems(cfg.data.tiny_task)["train"][cfg.model.warmstart.dev_size:][:512]
    backend = VLLMBackend(path, cfg.generator, "float32", cfg.data.max_prompt_length + cfg.generator.max_new_tokens)
    try:
        tok = backend.tokenizer
        prompts = [tok(prompt_text(r["extra_info"]["a"], "+", r["extra_info"]["b"]), add_special_tokens=True)["input_ids"]
                   for r in rows]
        out = backend.generate(prompts, 1, SamplingSpec.from_config(cfg.generator, {"seed": 0}))
        texts = [tok.decode(g[0].token_ids, skip_special_tokens=True) for g in out]
        lengths = sorted(len(g[0].token_ids) for g in out)
    finally:
        backend.shutdown()
    med, p99 = statistics.median(lengths), pctl(lengths, 0.99)
    correct = [bool(m) and m.group(1) == r["reward_model"]["ground_truth"]
               for r, m in zip(rows, (re.search(r"\\boxed\{([^}]*)\}", x) for x in texts))]
    print(f"median {med} p95 {pctl(lengths, 0.95)} p99 {p99} max {lengths[-1]}; accuracy {sum(correct) / len(rows):.3f}")
    assert p99 / med >= 8
    assert 0 < sum(correct) < len(rows)
