"""The tiny model of the embedded default, built in code (nothing is downloaded).

* A character-level tokenizer: one token per printable ASCII character (plus space and newline)
  and the specials ``<pad> <s> </s> <unk>``. transformers 5 (and so vLLM, which calls
  ``AutoTokenizer``) *always* rebuilds a ``qwen2`` model's tokenizer as ``Qwen2Tokenizer``: a
  byte-level BPE built from the saved vocab and merges, with Qwen's pre-tokenizer, whatever
  ``tokenizer.json`` says. So the tokenizer is built in exactly that shape -- byte-level characters
  (space is ``Ġ``, newline ``Ċ``), a BPE with *no merges* (every character stays one token, so
  the pre-tokenizer's split cannot matter; unknown characters are dropped, as Qwen2Tokenizer
  does) -- and loads identically whether through ``Qwen2Tokenizer``, ``TokenizersBackend`` or raw
  ``tokenizers``. Saved as an HF folder (``tokenizer.json`` + ``tokenizer_config.json``).
* A small Qwen2 causal LM from a transformers ``Qwen2Config`` whose sizes come from
  ``model.tiny``, randomly initialised under a fixed seed, tied input/output embeddings, saved
  with ``save_pretrained`` (safetensors) in float32.

The folder lives under ``model.cache_dir`` keyed by a hash of the tiny config (and of this file's
format version), and is written to a temporary folder then renamed, so concurrent builders (tests,
actors) never see a half-written model.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, is_dataclass
from typing import Any, Dict, List

# Bump when the tokenizer or the model construction changes: it is part of the cache key.
FORMAT_VERSION = 2

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIALS = [PAD, BOS, EOS, UNK]
# One token per character, in byte-level form: printable ASCII maps to itself, and (GPT-2's
# byte-to-unicode table) space -> U+0120 'Ġ', newline -> U+010A 'Ċ'.
CHARS = [chr(b) for b in range(33, 127)] + [chr(256 + 32), chr(256 + 10)]


def vocab() -> Dict[str, int]:
    """Token -> id; specials first, so ``<pad>`` = 0, ``<s>`` = 1, ``</s>`` = 2, ``<unk>`` = 3."""
    return {tok: i for i, tok in enumerate(SPECIALS + CHARS)}


def _as_dict(model_cfg: Any) -> Dict[str, Any]:
    tiny = model_cfg.tiny
    d = asdict(tiny) if is_dataclass(tiny) else dict(vars(tiny) if hasattr(tiny, "__dict__") else tiny)
    return {k: d[k] for k in sorted(d)}


def tiny_config_hash(model_cfg: Any) -> str:
    """Short hash of ``model.tiny`` + the format version: the cache key of the tiny model."""
    blob = json.dumps({"tiny": _as_dict(model_cfg), "format": FORMAT_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def tiny_model_dir(model_cfg: Any) -> str:
    """Where :func:`build_tiny_model` caches the folder for this ``model`` config."""
    return os.path.join(os.path.expanduser(model_cfg.cache_dir), f"tiny-{tiny_config_hash(model_cfg)}")


def build_tokenizer():
    """The character-level tokenizer as a transformers fast tokenizer (not yet saved)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    v = vocab()
    # No merges: BPE leaves every (byte-level) character a token of its own.
    tok = Tokenizer(models.BPE(vocab=v, merges=[], continuing_subword_prefix="", end_of_word_suffix="",
                               fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        # Without merges any split gives the same tokens; Qwen2Tokenizer's differs, ours is per char.
        pre_tokenizers.Split(Regex("."), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, v[BOS])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        clean_up_tokenization_spaces=False, model_max_length=1 << 16)


def _qwen2_config(model_cfg: Any, tied: bool = True):
    from transformers import Qwen2Config

    t, v = model_cfg.tiny, vocab()
    return Qwen2Config(
        vocab_size=len(v), hidden_size=t.hidden_size, num_hidden_layers=t.num_layers,
        num_attention_heads=t.num_heads, num_key_value_heads=t.num_kv_heads,
        intermediate_size=t.intermediate_size, max_position_embeddings=t.max_position_embeddings,
        tie_word_embeddings=tied, bos_token_id=v[BOS], eos_token_id=v[EOS], pad_token_id=v[PAD],
        rope_theta=10000.0, rms_norm_eps=1e-6, use_sliding_window=False, dtype="float32")


def _complete(path: str) -> bool:
    return all(os.path.isfile(os.path.join(path, f)) for f in
               ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"))


def build_tiny_model(model_cfg: Any, out_dir: str | None = None, seed: int = 0, tied: bool = True) -> str:
    """Write the tiny tokenizer + randomly initialised Qwen2 (seeded) to ``out_dir`` (default:
    :func:`tiny_model_dir`) and return the path. Idempotent: an existing complete folder is reused.
    ``tied=False`` gives the LM head its own weight (tests of engines with an untied head)."""
    import torch
    from transformers import GenerationConfig, Qwen2ForCausalLM

    out_dir = os.path.abspath(os.path.expanduser(out_dir or tiny_model_dir(model_cfg)))
    if _complete(out_dir):
        return out_dir
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tiny-build-", dir=parent)
    try:
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(_qwen2_config(model_cfg, tied)).to(torch.float32)
        v = vocab()
        model.generation_config = GenerationConfig(
            bos_token_id=v[BOS], eos_token_id=v[EOS], pad_token_id=v[PAD])
        model.save_pretrained(tmp, safe_serialization=True)
        build_tokenizer().save_pretrained(tmp)
        _publish(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _publish(tmp: str, out_dir: str) -> None:
    """Atomically move a finished folder into place; if another process won the race, keep theirs."""
    try:
        os.rename(tmp, out_dir)
    except OSError:
        if not _complete(out_dir):
            shutil.rmtree(out_dir, ignore_errors=True)
            os.rename(tmp, out_dir)


def encode(tokenizer, text: str, add_bos: bool = True) -> List[int]:
    """Token ids of ``text`` (with ``<s>`` first when ``add_bos``); a helper for tests and tasks."""
    return tokenizer(text, add_special_tokens=add_bos)["input_ids"]
