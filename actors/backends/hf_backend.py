"""The ``hf`` backend: a transformers model with its KV cache, decoded by our own sampling loop.

For machines without vLLM, and as the numerics reference of the vLLM backend. Prompts are
left-padded into one batch with each prompt's ``n`` samples adjacent and in order. Each step runs
the decoder (``model.base_model``) on the last token with the cache, then the LM head on the final
hidden state, ``LOGITS_BUDGET_BYTES`` worth of rows at a time: for rows ``h`` and head ``W``,

    z = W h / T,   z_v = -inf outside the top-p nucleus,   y ~ softmax(z),   logp = z_y - logsumexp(z)

(greedy, ``T = 0``: ``y = argmax W h`` and ``logp`` from the raw logits) -- the same convention as
the vLLM backend (``actors.backends.base``). Only one ``[chunk, vocab]`` logits block exists at a
time, so memory does not grow with ``vocab x steps`` as ``generate(output_scores=True)`` does
(docs/bring-your-own.md), and the model folder's ``generation_config.json`` (a Qwen folder's top_k
20, repetition_penalty 1.05, ...) cannot change what is sampled: only ``generator.*`` settings
apply. A sample ends at its first end token (the tokenizer's eos or one of the generation config's
``eos_token_id``; kept, as vLLM keeps it) or at the token that completes a stop string; otherwise it
ran to ``max_new_tokens`` ("length"). Draws come from the backend's own ``torch.Generator`` (seeded
by ``generator.seed``), or from one seeded by the request's seed.
"""
from __future__ import annotations

import ctypes
import sys
from typing import Any, Iterable, List, Optional, Sequence, Tuple

import torch

from actors.backends.base import Completion, ReceivingBackend, SamplingSpec

MAX_ROWS = 512  # prompts x n per decoding batch, to bound the KV cache
LOGITS_BUDGET_BYTES = 64 << 20  # one float32 [rows, vocab] block of logits at a time


def fix_mmap_threshold(nbytes: int = 4 << 20) -> None:
    """Pin glibc's mmap threshold (``mallopt(M_MMAP_THRESHOLD)``, which also stops its dynamic
    adjustment). By default every freed mmapped block of <= 32 MiB raises the threshold to its size,
    so the next logits blocks of that size land in the heap and, interleaved with the decoder's
    small tensors, are never returned: RSS grows with every decoding step (docs/bring-your-own.md)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, int(nbytes))  # -3 = M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc (musl, ...): nothing to pin
        pass


def end_token_ids(tokenizer: Any, generation_config: Any) -> List[int]:
    """The tokenizer's eos plus every ``eos_token_id`` of the model's generation config (vLLM
    stops at the same set)."""
    ids = {tokenizer.eos_token_id}
    extra = getattr(generation_config, "eos_token_id", None) if generation_config is not None else None
    ids.update(extra if isinstance(extra, (list, tuple)) else [extra])
    return sorted(i for i in ids if i is not None)


def sample_rows(logits: torch.Tensor, spec: SamplingSpec, rng: Optional[torch.Generator]) -> Tuple[torch.Tensor, torch.Tensor]:
    """``[rows, vocab]`` logits -> (sampled ids [rows], their log-probs [rows]) under the
    temperature / top-p distribution they are drawn from (raw logits and argmax when greedy)."""
    z = logits.float()
    if spec.temperature == 0:
        tok = z.argmax(-1)
        return tok, z.gather(-1, tok[:, None]).squeeze(-1) - torch.logsumexp(z, -1)
    z = z / spec.temperature
    if spec.top_p < 1.0:  # drop the least likely tokens whose total mass is <= 1 - top_p; keep the top one
        sorted_z, order = z.sort(-1)
        drop = sorted_z.softmax(-1).cumsum(-1) <= 1.0 - spec.top_p
        drop[:, -1] = False
        z = z.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    logp = z.log_softmax(-1)
    # Inverse CDF with one uniform per row (torch.multinomial and an exponential race each cost
    # ~40 ns per vocabulary entry on CPU). right=True lands only on entries of positive mass.
    cdf = logp.exp().cumsum(-1)
    u = torch.rand((z.shape[0], 1), generator=rng, device=z.device, dtype=cdf.dtype) * cdf[:, -1:]
    tok = torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp_(max=z.shape[-1] - 1)
    return tok, logp.gather(-1, tok[:, None]).squeeze(-1)


def trim_completion(ids: List[int], lps: List[float], spec: SamplingSpec, end_ids: Sequence[int],
                    tokenizer: Any) -> Completion:
    """Cut a padded row at its end: first end token of ``end_ids`` (inclusive), else the token
    completing a stop string of ``spec`` (decoded with ``tokenizer``), else the row ran to
    max_new_tokens."""
    ends = set(end_ids)
    end = next((t + 1 for t, i in enumerate(ids) if i in ends), None)
    if spec.stop:
        limit = end or len(ids)
        for t in range(1, limit + 1):
            text = tokenizer.decode(ids[:t], skip_special_tokens=True)
            if any(s in text for s in spec.stop):
                end = t
                break
    if end is not None:
        return Completion(ids[:end], lps[:end], "stop")
    if len(ids) < spec.max_new_tokens:
        raise RuntimeError(f"hf backend: sample stopped after {len(ids)} tokens without an end token or stop string")
    return Completion(ids, lps, "length")


def hf_device(num_gpus_per_actor: float) -> torch.device:
    """The GPU Ray assigned to this actor (``ray.get_gpu_ids()`` in ``CUDA_VISIBLE_DEVICES``,
    :func:`dispo_ray.infra.devices.actor_device`), not ``cuda.current_device()`` (always cuda:0
    in a fresh process, which is another actor's GPU where Ray leaves every GPU visible); the CPU
    when the pool asked for none. GPUs asked for but invisible to torch fail in one line naming
    the NVIDIA driver, instead of generating on the CPU unnoticed."""
    import os

    from dispo_ray.infra.devices import actor_device, check_cuda_startup, uses_cuda

    if not uses_cuda(num_gpus_per_actor):
        return torch.device("cpu")
    check_cuda_startup(num_gpus_per_actor, "the hf generator")
    import ray
    gpu_ids = ray.get_gpu_ids() if ray.is_initialized() else []
    return actor_device(num_gpus_per_actor, gpu_ids, os.environ.get("CUDA_VISIBLE_DEVICES"),
                        torch.cuda.current_device())


def prefix_cache(config: Any, max_len: int) -> Any:
    """A KV cache of ``max_len`` positions per layer, allocated at the first update and written in
    place, whose attention reads only the filled prefix. transformers' ``StaticCache`` hands
    attention all ``max_len`` positions every step (masked), so each step's attention, and the copy
    that repeats the KV heads for grouped-query attention, cost the whole window instead of the
    tokens so far: 2.3x the decode time of ``generate`` on the demo model (0.28x of it through
    the actor, bench_generator, 2026-12-03)."""
    from transformers.cache_utils import Cache, StaticLayer

    class PrefixLayer(StaticLayer):
        def __init__(self, max_cache_len: int):
            super().__init__(max_cache_len=max_cache_len)
            self.filled = 0

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
            keys, values = super().update(key_states, value_states, *args, **kwargs)
            self.filled += key_states.shape[-2]
            return keys[:, :, :self.filled], values[:, :, :self.filled]

        def get_mask_sizes(self, query_length: int) -> Tuple[int, int]:
            return self.filled + query_length, 0

    layers = config.get_text_config(decoder=True).num_hidden_layers
    return Cache(layers=[PrefixLayer(max_len) for _ in range(layers)])


GQA_SDPA = "dispo_gqa_sdpa"  # attn_implementation name of gqa_sdpa_attention


def gqa_sdpa_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: Optional[torch.Tensor], dropout: float = 0.0, scaling: Optional[float] = None,
                       is_causal: Optional[bool] = None, **kwargs: Any) -> Tuple[torch.Tensor, None]:
    """transformers' sdpa attention, minus the copy of the KV heads: with grouped-query attention
    and a mask (a left-padded batch always has one) transformers repeats every key and value head
    before calling sdpa; ``enable_gqa`` reads them in place (the same result to the bit, ~5x
    faster attention on CPU; on CUDA a mask with ``enable_gqa`` would leave the fused kernels, so
    the backend uses this on CPU only)."""
    causal = attention_mask is None and query.shape[2] > 1 and (is_causal is None or is_causal)
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=0.0, scale=scaling, is_causal=causal,
        enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None


def register_gqa_sdpa() -> str:
    """Register :data:`GQA_SDPA` with transformers (attention, and sdpa's own masks); returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    AttentionInterface.register(GQA_SDPA, gqa_sdpa_attention)
    AttentionMaskInterface.register(GQA_SDPA, sdpa_mask)
    return GQA_SDPA


class HFBackend(ReceivingBackend):

    def __init__(self, model_path: str, gen_cfg: Any, dtype: str, max_model_len: int):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        fix_mmap_threshold()
        self.device = hf_device(float(gen_cfg.num_gpus_per_actor))
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype)).to(self.device)
        self.model.eval()
        if self.device.type == "cpu" and self.model.config._attn_implementation == "sdpa":
            self.model.set_attn_implementation(register_gqa_sdpa())
        self.end_ids = end_token_ids(self.tokenizer, getattr(self.model, "generation_config", None))
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.end_ids[0]
        self.max_model_len = max_model_len
        self.rng = torch.Generator(device=self.device).manual_seed(int(gen_cfg.seed))
        self.weight_update = "copy_"  # how a sync loads: into the module's own tensors

    @torch.no_grad()
    def generate(self, prompts: Sequence[List[int]], n: int, spec: SamplingSpec) -> List[List[Completion]]:
        rng = self.rng
        if spec.seed is not None:  # per-request seed: the same request draws the same samples
            rng = torch.Generator(device=self.device).manual_seed(int(spec.seed))
        per_call = max(1, MAX_ROWS // n)
        out: List[List[Completion]] = []
        for s in range(0, len(prompts), per_call):
            out.extend(self._generate_batch(prompts[s:s + per_call], n, spec, rng))
        return out

    def _next_tokens(self, hidden: torch.Tensor, spec: SamplingSpec, rng: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
        head = self.model.get_output_embeddings()
        rows = max(1, LOGITS_BUDGET_BYTES // (4 * int(head.weight.shape[0])))
        parts = [sample_rows(head(hidden[s:s + rows]), spec, rng) for s in range(0, hidden.shape[0], rows)]
        return torch.cat([t for t, _ in parts]), torch.cat([lp for _, lp in parts])

    def _generate_batch(self, prompts: Sequence[List[int]], n: int, spec: SamplingSpec,
                        rng: torch.Generator) -> List[List[Completion]]:
        rows = [p for p in prompts for _ in range(n)]
        R, P = len(rows), max(len(p) for p in prompts)
        total = P + spec.max_new_tokens
        ids = torch.full((R, P), self.pad_id, dtype=torch.long)
        att = torch.zeros((R, total), dtype=torch.long)  # the whole window, filled as tokens arrive
        for b, p in enumerate(rows):
            ids[b, P - len(p):] = torch.tensor(p, dtype=torch.long)
            att[b, P - len(p):P] = 1
        ids, att = ids.to(self.device), att.to(self.device)
        pos = (att[:, :P].cumsum(-1) - 1).clamp(min=0)
        # A cache allocated once for prompt + max_new_tokens (a growing one re-concatenates every
        # layer's keys and values each step, and the freed blocks of ever larger sizes are not
        # reused: RSS grows every step), which attention reads only up to the filled length.
        decoder = self.model.base_model
        cache = prefix_cache(self.model.config, total)
        hidden = decoder(input_ids=ids, attention_mask=att[:, :P], position_ids=pos, past_key_values=cache,
                         cache_position=torch.arange(P, device=self.device), use_cache=True).last_hidden_state[:, -1]
        end = torch.tensor(self.end_ids, device=self.device)
        done = torch.zeros(R, dtype=torch.bool, device=self.device)
        toks, lps = [], []
        for step in range(spec.max_new_tokens):
            tok, lp = self._next_tokens(hidden, spec, rng)
            tok = tok.masked_fill(done, self.pad_id)
            toks.append(tok)
            lps.append(lp)
            done |= torch.isin(tok, end)
            if bool(done.all()) or step + 1 == spec.max_new_tokens:
                break
            att[:, P + step] = 1
            pos = pos[:, -1:] + 1
            hidden = decoder(input_ids=tok[:, None], attention_mask=att[:, :P + step + 1], position_ids=pos,
                             past_key_values=cache,
                             cache_position=torch.tensor([P + step], device=self.device),
                             use_cache=True).last_hidden_state[:, -1]
        gen, lp = torch.stack(toks, 1).cpu(), torch.stack(lps, 1).float().cpu()
        return [[trim_completion(gen[b * n + k].tolist(), lp[b * n + k].tolist(), spec, self.end_ids,
                                 self.tokenizer) for k in range(n)]
                for b in range(len(prompts))]

    # --- weights -------------------------------------------------------------------------------
    def sync_device(self, backend: str) -> Optional[torch.device]:
        return self.device if backend == "nccl" else None

    def receive_weights(self) -> int:
        state = self.model.state_dict()  # includes a tied lm_head.weight, which aliases the embedding

        @torch.no_grad()
        def load(stream: Iterable[Tuple[str, torch.Tensor]]) -> None:
            for name, t in stream:
                if name not in state:
                    raise KeyError(f"weight sync: parameter {name!r} is not in the hf model")
                state[name].copy_(t)

        return self._receive(load)

    def param_sums(self) -> dict:
        return {n: float(p.detach().float().sum()) for n, p in self.model.named_parameters()}

    def shutdown(self) -> None:
        pass
