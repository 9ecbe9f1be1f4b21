"""Chunked per-token log-probs / entropy against a naive full-logits computation."""
from __future__ import annotations

import math

import pytest
import torch

from dispo_ray.algorithm.logprobs import causal_token_logprobs, naive_token_logprobs, token_logprobs_from_hidden


def _tiny_model(seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=48, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=96, max_position_embeddings=64,
                      tie_word_embeddings=True)
    return Qwen2ForCausalLM(cfg).float()


class _RecordingHead(torch.nn.Module):
    """The real LM head, recording how many rows each call sees (forward and recomputation)."""

    def __init__(self, head):
        super().__init__()
        self.head, self.rows = head, []

    def forward(self, h):
        self.rows.append(h.shape[0])
        return self.head(h)


def test_hand_computed_two_token_vocab():
    # logits z = W h with W = I (2x2): log p(y) = z_y - log(e^z0 + e^z1), entropy by hand.
    head = torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.eye(2))
    h = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    y = torch.tensor([1, 0])
    lp, ent = token_logprobs_from_hidden(h, head, y, chunk_size=1)
    assert torch.allclose(lp, torch.tensor([math.log(0.5), math.log(0.75)]), atol=1e-6)
    h_34 = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert torch.allclose(ent, torch.tensor([math.log(2.0), h_34]), atol=1e-6)


@pytest.mark.parametrize("chunk", [1, 7, 1000])
@pytest.mark.parametrize("use_mask", [False, True])
def test_matches_naive_values_and_gradients(chunk, use_mask):
    model = _tiny_model()
    B, T = 3, 11
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 48, (B, T), generator=g)
    mask = torch.zeros(B, T)
    mask[0, 4:11] = 1
    mask[1, 2:6] = 1
    mask[2, 8:10] = 1
    coef = torch.randn(B, T, generator=g)

    # naive: full logits, autograd
    model.zero_grad()
    lp_ref, ent_ref = naive_token_logprobs(model(input_ids=ids).logits, ids)
    (lp_ref * coef * mask).sum().backward()
    grads_ref = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad()
    head = _RecordingHead(model.lm_head)
    hidden = model.model(input_ids=ids).last_hidden_state
    lp, ent = causal_token_logprobs(hidden, head, ids, chunk, mask=mask if use_mask else None)
    (lp * coef * mask).sum().backward()

    sel = mask.bool() if use_mask else torch.ones_like(mask).bool()
    sel[:, 0] = False
    assert torch.allclose(lp[sel], lp_ref[sel], atol=1e-5)
    assert torch.allclose(ent[sel], ent_ref[sel], atol=1e-5)
    assert (lp[:, 0] == 0).all() and not ent.requires_grad
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, grads_ref[n], atol=1e-5, rtol=1e-4), n
    # Never more than `chunk` rows through the head at once; with several chunks the backward
    # recomputes each (activation checkpointing) instead of keeping every chunk's logits.
    n_rows = int(mask[:, 1:].sum()) if use_mask else B * (T - 1)
    assert max(head.rows) <= chunk
    assert sum(head.rows) == (2 * n_rows if n_rows > chunk else n_rows)


def test_no_grad_path_and_bad_input():
    model = _tiny_model()
    ids = torch.randint(0, 48, (2, 5))
    with torch.no_grad():
        hidden = model.model(input_ids=ids).last_hidden_state
        lp, _ = causal_token_logprobs(hidden, model.lm_head, ids, 3)
        lp_ref, _ = naive_token_logprobs(model(input_ids=ids).logits, ids)
    assert torch.allclose(lp, lp_ref, atol=1e-5)
    with pytest.raises(ValueError, match="chunk_size"):
        token_logprobs_from_hidden(hidden[0], model.lm_head, ids[0], 0)
    with pytest.raises(ValueError, match="input_ids"):
        causal_token_logprobs(hidden, model.lm_head, ids[:, :3], 3)
