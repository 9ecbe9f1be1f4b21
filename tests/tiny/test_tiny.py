"""The tiny model and tokenizer built in code: character-level round trips that agree between
raw ``tokenizers``, transformers' AutoTokenizer (which rebuilds qwen2 tokenizers) and the saved
file; a Qwen2 model whose parameter count matches the config arithmetic; seeded, cached builds."""
from __future__ import annotations

import os

import pytest

from dispo_ray.infra.config import compose
from dispo_ray.tiny.model import BOS, EOS, PAD, build_tiny_model, tiny_config_hash, tiny_model_dir, vocab


@pytest.fixture(scope="module")
def model_cfg(tmp_path_factory):
    cfg = compose([f"model.cache_dir={tmp_path_factory.mktemp('tiny_cache')}"])
    return cfg.model


@pytest.fixture(scope="module")
def tiny_dir(model_cfg):
    return build_tiny_model(model_cfg)


TEXTS = ["12+7=", "\\boxed{-19}", "What is 3*4? Answer: 12\nok", "x^2 (a, b); {c}"]


def test_tokenizer_is_character_level_and_loads_the_same_everywhere(tiny_dir):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    auto = AutoTokenizer.from_pretrained(tiny_dir)
    raw = Tokenizer.from_file(os.path.join(tiny_dir, "tokenizer.json"))
    v = vocab()
    assert (auto.bos_token_id, auto.eos_token_id, auto.pad_token_id) == (v[BOS], v[EOS], v[PAD])
    assert auto.chat_template is None  # the data loader then feeds plain text
    for text in TEXTS:
        ids = auto(text)["input_ids"]
        assert ids == raw.encode(text).ids
        # <s> then exactly one token per character, and a lossless round trip
        assert ids[0] == v[BOS] and len(ids) == len(text) + 1
        assert auto.decode(ids, skip_special_tokens=True) == text
    # hand-derived ids: digits are 33..42 shifted by the 4 specials and byte 33 -> index 4
    assert auto("12", add_special_tokens=False)["input_ids"] == [4 + ord("1") - 33, 4 + ord("2") - 33]
    assert auto(" ", add_special_tokens=False)["input_ids"] == [v["\u0120"]]


def test_model_matches_config_arithmetic(tiny_dir, model_cfg):
    import torch
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    t, V = model_cfg.tiny, len(vocab())
    h, ff, hd = t.hidden_size, t.intermediate_size, t.hidden_size // t.num_heads
    kv = t.num_kv_heads * hd
    per_layer = (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * ff + 2 * h  # qkv(+bias), o, mlp, norms
    expected = V * h + t.num_layers * per_layer + h  # tied embeddings + final norm
    assert sum(p.numel() for p in m.parameters()) == expected
    assert m.config.tie_word_embeddings and m.config.model_type == "qwen2"
    out = m(torch.tensor([[1, 5, 6]])).logits
    assert out.shape == (1, 3, V) and torch.isfinite(out).all()


def test_build_is_seeded_cached_and_keyed_by_config(tiny_dir, model_cfg, tmp_path):
    from safetensors.torch import load_file

    assert tiny_dir == tiny_model_dir(model_cfg)
    before = os.path.getmtime(os.path.join(tiny_dir, "model.safetensors"))
    assert build_tiny_model(model_cfg) == tiny_dir  # idempotent: reused, not rewritten
    assert os.path.getmtime(os.path.join(tiny_dir, "model.safetensors")) == before

    a = load_file(os.path.join(tiny_dir, "model.safetensors"))
    b = load_file(os.path.join(build_tiny_model(model_cfg, str(tmp_path / "same"), seed=0), "model.safetensors"))
    c = load_file(os.path.join(build_tiny_model(model_cfg, str(tmp_path / "other"), seed=1), "model.safetensors"))
    name = "model.embed_tokens.weight"
    assert (a[name] == b[name]).all() and not (a[name] == c[name]).all()

    bigger = compose([f"model.cache_dir={model_cfg.cache_dir}", "model.tiny.num_layers=3"]).model
    assert tiny_config_hash(bigger) != tiny_config_hash(model_cfg)
    assert tiny_model_dir(bigger) != tiny_dir


def test_warmstart_batch_masks_prompt_tokens():
    from dispo_ray.tiny.warmstart import _batch

    ids, mask, labels = _batch([([1, 5, 6], [7, 2]), ([1, 8], [9, 10, 2])], pad_id=0)
    assert ids.tolist() == [[1, 5, 6, 7, 2], [1, 8, 9, 10, 2]]
    assert labels.tolist() == [[-100, -100, -100, 7, 2], [-100, -100, 9, 10, 2]]  # loss on responses only
    ids, mask, labels = _batch([([1, 5], [2])], pad_id=0)
    assert ids.tolist() == [[1, 5, 2]] and mask.tolist() == [[1, 1, 1]]


def test_warm_start_learns_stays_imperfect_and_is_cached(tmp_path):
    import time

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dispo_ray.tiny.task import make_problems
    from dispo_ray.tiny.warmstart import greedy_accuracy, warm_started_model_dir, warmstart_info

    cfg = compose([f"model.cache_dir={tmp_path}", "model.warmstart.steps=150", "model.warmstart.batch_size=32",
                   "model.warmstart.target_accuracy=0"])  # a fixed step count
    t0 = time.perf_counter()
    path = warm_started_model_dir(cfg)
    built_s = time.perf_counter() - t0
    info = warmstart_info(cfg)
    assert info["steps"] == 150 and info["dev_checks"] == []
    assert info["first_loss"] > 3.0 and info["final_loss"] < info["first_loss"] / 4  # it learned the format
    assert 0.0 <= info["val_greedy_accuracy"] < 0.9  # ... and is clearly imperfect
    # the stored accuracy is reproducible from the saved folder
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(path)
    assert greedy_accuracy(model, tok, make_problems(cfg.data.tiny_task)["val"]) == info["val_greedy_accuracy"]
    # cached: the second call reuses the folder without training
    t0 = time.perf_counter()
    assert warm_started_model_dir(cfg) == path and time.perf_counter() - t0 < min(1.0, built_s / 5)
    longer = compose([f"model.cache_dir={tmp_path}", "model.warmstart.steps=151"])
    from dispo_ray.tiny.warmstart import warmstart_dir
    assert warmstart_dir(longer) != path
    assert warm_started_model_dir(compose([f"model.path={path}"])) == path  # a user's model is used as is


def test_warm_start_stops_at_the_dev_slice_target(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dispo_ray.tiny.task import make_problems
    from dispo_ray.tiny.warmstart import greedy_accuracy, warm_started_model_dir, warmstart_info

    cfg = compose([f"model.cache_dir={tmp_path}", "model.warmstart.steps=2000", "model.warmstart.batch_size=32",
                   "model.warmstart.target_accuracy=0.05", "model.warmstart.check_every=25",
                   "model.warmstart.dev_size=128"])
    info = warmstart_info(cfg)
    checks = info["dev_checks"]
    # stopped at the first check that reached the target, long before the step limit
    assert info["reached_target"] and checks[-1][1] >= 0.05 and all(a < 0.05 for _, a in checks[:-1])
    assert [s for s, _ in checks] == [25 * (i + 1) for i in range(len(checks))] and info["steps"] == checks[-1][0] < 2000
    # the recorded dev accuracy is the saved model's, on the first dev_size train problems
    path = warm_started_model_dir(cfg)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(path)
    splits = make_problems(cfg.data.tiny_task)
    assert greedy_accuracy(model, tok, splits["train"][:128]) == info["dev_greedy_accuracy"] == checks[-1][1]
    assert info["num_dev"] == 128
