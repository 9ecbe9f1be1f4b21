"""Per-token log-probs of the target tokens and token entropy, chunked over tokens.

For hidden states ``h_n`` (one row per token position) and the LM head ``W`` (vocab x hidden),
the logits are ``z_n = W h_n`` and, for the target token ``y_n``,

    log p(y_n) = z_n[y_n] - logsumexp(z_n)
    H_n        = logsumexp(z_n) - sum_v softmax(z_n)_v * z_n[v]      (entropy, in nats)

The logits are computed in float32 (:func:`fp32_logits_head`): a bf16 head rounds logits of size
16-32 to steps of 0.125, and every log-prob -- the ratios DISPO clips, the mismatch metrics -- would
carry that rounding (up to ~0.1 nats). The rows are processed ``chunk_size`` at a time and every chunk is wrapped in activation
checkpointing, so at most one ``[chunk_size, vocab]`` float32 logits tensor exists at any moment,
in the forward and in the backward pass (the chunk is recomputed there; when all rows fit in one
chunk nothing is recomputed, since keeping that one chunk is within the same bound). The gradient flows
through ``log p`` into ``h`` and ``W``; the entropy is a detached metric.

Causal-LM convention (see ``dispo_ray.rollout.samples``): position ``t`` of a ``[B, T]`` batch holds
``log p(input_ids[:, t] | input_ids[:, :t])``, computed from the hidden state at ``t - 1``;
position 0 has no prediction and gets 0.
"""
from __future__ import annotations

import types
from typing import Callable, Optional, Tuple

import torch
from torch.utils.checkpoint import checkpoint


def _fp32_linear_forward(module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    # bf16 x bf16 products are exact in float32; only float32 accumulation rounds (~1e-6 relative)
    bias = module.bias
    return torch.nn.functional.linear(x.float(), module.weight.float(), None if bias is None else bias.float())


def fp32_logits_head(head: torch.nn.Module) -> torch.nn.Module:
    """Make the LM head ``head`` (an ``nn.Linear``) compute float32 logits from its (bf16/fp16)
    weight and the hidden states, instead of logits in the weight's dtype cast afterwards.

    The module is still *called* (its ``forward`` is replaced on the instance), so DeepSpeed
    ZeRO-3's hooks gather its weight exactly as before; called per chunk by
    :func:`token_logprobs_from_hidden`, so one float32 copy of the weight (``vocab x hidden``; 2.2 GB
    at Qwen2.5-7B) and one ``[chunk, vocab]`` float32 block exist at a time. The gradient reaches
    the weight in its own dtype. A float32 head is left as it is."""
    if not isinstance(head, torch.nn.Linear):
        raise TypeError(f"fp32_logits_head: expected the model's nn.Linear LM head, got {type(head).__name__}")
    if head.weight.dtype != torch.float32:
        head.forward = types.MethodType(_fp32_linear_forward, head)
    return head


def _chunk_logprob_entropy(head: Callable[[torch.Tensor], torch.Tensor], h: torch.Tensor,
                           y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    logits = head(h).float()  # [C, V]: the only vocab-sized tensor, one chunk at a time
    lse = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(-1, y.unsqueeze(-1)).squeeze(-1) - lse
    with torch.no_grad():
        probs = torch.softmax(logits, dim=-1)
        ent = lse - (probs * logits).sum(-1)
    return logp, ent


def token_logprobs_from_hidden(hidden: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor],
                               targets: torch.Tensor, chunk_size: int,
                               checkpoint_chunks: Optional[bool] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``hidden [N, H]``, ``targets [N]`` -> ``(log_probs [N] float32, entropy [N] float32, detached)``.

    ``head`` maps ``[n, H] -> [n, V]`` (the model's LM head module, so that ZeRO-3 gathers its
    weight on every call). By default chunks are checkpointed when gradients are needed and there
    is more than one chunk.
    """
    if hidden.dim() != 2 or targets.dim() != 1 or hidden.shape[0] != targets.shape[0]:
        raise ValueError(f"token_logprobs_from_hidden: hidden {tuple(hidden.shape)} and targets "
                         f"{tuple(targets.shape)} must be [N, H] and [N]")
    if chunk_size < 1:
        raise ValueError(f"token_logprobs_from_hidden: chunk_size={chunk_size} must be >= 1")
    if checkpoint_chunks is None:
        checkpoint_chunks = torch.is_grad_enabled() and hidden.requires_grad and hidden.shape[0] > chunk_size
    lps, ents = [], []
    for s in range(0, hidden.shape[0], chunk_size):
        h, y = hidden[s:s + chunk_size], targets[s:s + chunk_size]
        if checkpoint_chunks:
            lp, ent = checkpoint(_chunk_logprob_entropy, head, h, y, use_reentrant=False)
        else:
            lp, ent = _chunk_logprob_entropy(head, h, y)
        lps.append(lp)
        ents.append(ent.detach())
    if not lps:
        z = hidden.new_zeros(0, dtype=torch.float32)
        return z, z
    return torch.cat(lps), torch.cat(ents)


def causal_token_logprobs(hidden: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor],
                          input_ids: torch.Tensor, chunk_size: int,
                          mask: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``hidden [B, T, H]`` of a causal LM, ``input_ids [B, T]`` -> ``(log_probs, entropy)``, ``[B, T]``.

    Entry ``[b, t]`` is ``log p(input_ids[b, t] | input_ids[b, :t])`` from ``hidden[b, t-1]``;
    column 0 is 0. With ``mask [B, T]`` only positions where ``mask > 0`` are computed (the others
    are 0), which skips the LM head on prompt and padding tokens.
    """
    B, T, H = hidden.shape
    if input_ids.shape != (B, T):
        raise ValueError(f"causal_token_logprobs: input_ids {tuple(input_ids.shape)} does not match "
                         f"hidden {tuple(hidden.shape)}")
    h = hidden[:, :-1].reshape(-1, H)
    y = input_ids[:, 1:].reshape(-1)
    if mask is not None:
        idx = (mask[:, 1:].reshape(-1) > 0).nonzero(as_tuple=True)[0]
        h, y = h.index_select(0, idx), y.index_select(0, idx)
    lp, ent = token_logprobs_from_hidden(h, head, y, chunk_size)
    out_lp = torch.zeros(B * (T - 1), dtype=torch.float32, device=hidden.device)
    out_ent = torch.zeros(B * (T - 1), dtype=torch.float32, device=hidden.device)
    if mask is not None:
        out_lp = out_lp.index_put((idx,), lp)
        out_ent = out_ent.index_put((idx,), ent)
    else:
        out_lp, out_ent = lp, ent
    pad = torch.zeros(B, 1, dtype=torch.float32, device=hidden.device)
    return (torch.cat([pad, out_lp.reshape(B, T - 1)], 1),
            torch.cat([pad, out_ent.reshape(B, T - 1)], 1))


def naive_token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Reference: the same quantities from full ``[B, T, V]`` logits (materialises everything)."""
    logp_all = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    lp = logp_all.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    ent = -(logp_all.exp() * logp_all).sum(-1).detach()
    pad = torch.zeros(logits.shape[0], 1, dtype=torch.float32, device=logits.device)
    return torch.cat([pad, lp], 1), torch.cat([pad, ent], 1)
