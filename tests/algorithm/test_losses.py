"""The policy-loss family against hand-derived values, closed-form and finite-difference gradients."""
from __future__ import annotations

import math

import pytest
import torch

from dispo_ray.algorithm.losses import (REGIMES, aggregate, get_policy_loss, merge_raw_metrics, registered_losses,
                                        summarize_metrics)

DISPO_CFG = {"eps_low_pos": 0.2, "eps_high_pos": 10.0, "eps_low_neg": 0.3, "eps_high_neg": 0.5,
             "clip_low": 0.2, "clip_high": 0.28, "kl_coef": 0.0}


def _batch(ratios, advs, logp=None, dtype=torch.float64):
    """One row per token pattern: log_probs leaf, old_log_probs set so that exp(lp - old) = ratio."""
    ratios = torch.tensor(ratios, dtype=dtype)
    lp = torch.full_like(ratios, -1.3) if logp is None else torch.tensor(logp, dtype=dtype)
    lp = lp.clone().requires_grad_(True)
    old = lp.detach() - torch.log(ratios)
    adv = torch.tensor(advs, dtype=dtype)
    mask = torch.ones_like(ratios)
    return lp, old, adv, mask


def _call(name, lp, old, adv, mask, cfg=DISPO_CFG, **kw):
    return get_policy_loss(name)(log_probs=lp, old_log_probs=old, advantages=adv, response_mask=mask,
                                 config=cfg, **kw)


def test_registry_lists_all_and_rejects_unknown():
    assert set(registered_losses()) == {"dispo", "cispo", "dapo", "grpo"}
    with pytest.raises(ValueError, match="registered: cispo, dapo, dispo, grpo"):
        get_policy_loss("ppo")


WINDOWS = {k: DISPO_CFG[k] for k in ("eps_low_pos", "eps_high_pos", "eps_low_neg", "eps_high_neg")}
OTHER_CFG = dict(DISPO_CFG, eps_low_pos=0.0, eps_high_pos=0.0, eps_low_neg=0.0, eps_high_neg=0.0)


@pytest.mark.parametrize("how", ["config", "windows"])
def test_dispo_value_and_gradient_inside_below_above_each_window(how):
    """The same hand-derived values with the windows in the config or sent with the batch
    (``windows=``, which the config's own eps_* then do not touch)."""
    # A > 0 window [0.8, 11];  A < 0 window [0.7, 1.5]
    ratios = [[0.5, 0.9, 1.5, 12.0], [0.5, 0.9, 1.4, 2.0]]
    advs = [[1.0] * 4, [-2.0] * 4]
    lp, old, adv, mask = _batch(ratios, advs)
    kw = {} if how == "config" else {"cfg": OTHER_CFG, "windows": WINDOWS}
    loss, raw = _call("dispo", lp, old, adv, mask, **kw)
    w = torch.tensor([[0.8, 0.9, 1.5, 11.0], [0.7, 0.9, 1.4, 1.5]], dtype=torch.float64)
    n = 8.0
    expected = -(w * adv * lp.detach()).sum() / n
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    loss.backward()
    # d loss / d log pi_t = - w_t A_t / N  (w is a constant: stop-gradient)
    assert torch.allclose(lp.grad, -w * adv / n, rtol=1e-12)
    # regimes: A>0 r>1: {1.5, 12}, clipped {12}; A>0 r<1: {0.5, 0.9}, clipped {0.5};
    #          A<0 r>1: {1.4, 2.0}, clipped {2.0}; A<0 r<1: {0.5, 0.9}, clipped {0.5}
    s = summarize_metrics(raw)
    for r in ("pos_high", "pos_low", "neg_high", "neg_low"):
        assert s[f"regime/{r}/token_frac"] == pytest.approx(2 / 8)
        assert s[f"regime/{r}/clip_frac"] == pytest.approx(1 / 2)
    assert s["actor/ratio_max"] == pytest.approx(12.0)
    assert s["actor/clip_frac"] == pytest.approx(4 / 8)


def test_windows_sent_with_the_batch_equal_the_same_windows_in_the_config():
    """Today's path (windows written into the config) and the batch's path give the same loss,
    gradient and metrics, bit for bit; different windows give different clip counts."""
    torch.manual_seed(2)
    ratios, advs = torch.exp(torch.randn(4, 9)).tolist(), torch.randn(4, 9).tolist()
    w = {"eps_low_pos": 0.1, "eps_high_pos": 0.3, "eps_low_neg": 0.5, "eps_high_neg": 2.0}
    lp1, old, adv, mask = _batch(ratios, advs)
    lp2 = lp1.detach().clone().requires_grad_(True)
    l1, r1 = _call("dispo", lp1, old, adv, mask, cfg=dict(DISPO_CFG, **w))
    l2, r2 = _call("dispo", lp2, old, adv, mask, cfg=DISPO_CFG, windows=w)
    l1.backward(), l2.backward()
    assert l1.item() == l2.item() and torch.equal(lp1.grad, lp2.grad) and r1 == r2
    _, r3 = _call("dispo", lp2.detach(), old, adv, mask, cfg=DISPO_CFG, windows=WINDOWS)
    assert sum(r3[f"{g}_clipped"] for g in REGIMES) < sum(r1[f"{g}_clipped"] for g in REGIMES)
    for name in ("cispo", "dapo", "grpo"):  # the other losses ignore the windows
        assert _call(name, lp2.detach(), old, adv, mask, windows=w)[1] == _call(name, lp2.detach(), old, adv, mask)[1]


def test_dispo_no_floor_when_eps_low_is_one():
    cfg = dict(DISPO_CFG, eps_low_neg=1.0)
    lp, old, adv, mask = _batch([[0.01, 0.3]], [[-1.0, -1.0]])
    loss, raw = _call("dispo", lp, old, adv, mask, cfg=cfg)
    loss.backward()
    assert torch.allclose(lp.grad, torch.tensor([[0.01, 0.3]], dtype=torch.float64) / 2, rtol=1e-9)
    assert raw["neg_low_clipped"] == 0


def test_cispo_equals_dispo_with_equal_windows():
    torch.manual_seed(0)
    ratios = torch.exp(torch.randn(3, 7)).tolist()
    advs = torch.randn(3, 7).tolist()
    cfg_c = {"clip_low": 0.25, "clip_high": 3.0}
    cfg_d = {"eps_low_pos": 0.25, "eps_high_pos": 3.0, "eps_low_neg": 0.25, "eps_high_neg": 3.0}
    lp1, old, adv, mask = _batch(ratios, advs)
    lp2 = lp1.detach().clone().requires_grad_(True)
    l1, r1 = _call("cispo", lp1, old, adv, mask, cfg=cfg_c)
    l2, r2 = _call("dispo", lp2, old, adv, mask, cfg=cfg_d)
    l1.backward(), l2.backward()
    assert l1.item() == pytest.approx(l2.item(), rel=1e-12)
    assert torch.equal(lp1.grad, lp2.grad)
    assert r1 == r2


def test_dapo_matches_ppo_clip_token_by_token_and_finite_differences():
    torch.manual_seed(1)
    lp, old, adv, mask = _batch(torch.exp(0.5 * torch.randn(4, 6)).tolist(), torch.randn(4, 6).tolist())
    per_token = []
    for b in range(4):
        for t in range(6):
            r = math.exp(lp[b, t].item() - old[b, t].item())
            a = adv[b, t].item()
            per_token.append(-min(r * a, min(max(r, 0.8), 1.28) * a))
    loss, _ = _call("dapo", lp, old, adv, mask)
    assert loss.item() == pytest.approx(sum(per_token) / 24, rel=1e-10)

    def f(x):
        return _call("dapo", x, old, adv, mask)[0]
    # central differences (the loss is piecewise smooth; random ratios avoid the kinks)
    assert torch.autograd.gradcheck(f, (lp,), eps=1e-7, atol=1e-6)


def test_ppo_clip_zeroes_gradient_where_dispo_keeps_it():
    # A>0 with r above 1+clip_high, A<0 with r below 1-clip_low: PPO's min takes the constant.
    lp, old, adv, mask = _batch([[1.6, 0.5, 1.0]], [[1.0, -1.0, 1.0]])
    ld, raw = _call("dapo", lp, old, adv, mask)
    ld.backward()
    assert lp.grad[0, 0] == 0 and lp.grad[0, 1] == 0
    assert lp.grad[0, 2] == pytest.approx(-1.0 / 3)  # r = 1: gradient -A r / N
    assert raw["pos_high_clipped"] == 1 and raw["neg_low_clipped"] == 1
    lp2 = lp.detach().clone().requires_grad_(True)
    ldi, _ = _call("dispo", lp2, old, adv, mask)
    ldi.backward()
    assert lp2.grad[0, 0] == pytest.approx(-1.6 / 3)            # inside [0.8, 11]
    assert lp2.grad[0, 1] == pytest.approx(0.7 / 3)             # clipped up to 0.7, still non-zero


def test_grpo_symmetric_window_and_k3_kl_term():
    cfg = {"clip_low": 0.2, "clip_high": 0.2, "kl_coef": 0.1}
    lp, old, adv, mask = _batch([[1.0, 1.0]], [[1.0, -1.0]], logp=[[-1.0, -2.0]])
    ref = torch.tensor([[-1.5, -1.0]], dtype=torch.float64)
    loss, _ = _call("grpo", lp, old, adv, mask, cfg=cfg, ref_log_probs=ref)
    d = ref - lp.detach()
    k3 = torch.exp(d) - d - 1
    expected = ((-1.0 + 1.0) + 0.1 * k3.sum()) / 2  # r = 1: pg terms -A cancel
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    with pytest.raises(ValueError, match="ref_log_probs"):
        _call("grpo", lp, old, adv, mask, cfg=cfg)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
@pytest.mark.parametrize("name", ["dispo", "dapo"])
def test_split_invariance_with_global_counts(mode, name):
    """Micro-batches (as ranks x accumulation) with global counts sum to the full-batch loss/grad."""
    torch.manual_seed(2)
    B, T = 6, 9
    lp, old, adv, _ = _batch(torch.exp(0.3 * torch.randn(B, T)).tolist(), torch.randn(B, T).tolist())
    lengths = torch.tensor([9, 3, 5, 1, 7, 4])
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(torch.float64)
    full, _ = _call(name, lp, old, adv, mask, loss_agg_mode=mode)
    full.backward()
    g_full = lp.grad.clone()
    lp.grad = None
    n_tok, n_seq = mask.sum().item(), float(B)
    total = 0.0
    for idx in ([0, 1], [2], [3, 4, 5]):  # uneven splits
        part, _ = _call(name, lp[idx], old[idx], adv[idx], mask[idx], loss_agg_mode=mode,
                        global_tokens=n_tok, global_seqs=n_seq)
        part.backward()
        total += part.item()
    assert total == pytest.approx(full.item(), rel=1e-12)
    assert torch.allclose(lp.grad, g_full, rtol=1e-12, atol=1e-15)


def test_aggregation_modes_by_hand():
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert aggregate(per_token, mask, "token-mean").item() == pytest.approx(10 / 4)
    assert aggregate(per_token, mask, "seq-mean-token-mean").item() == pytest.approx((2 + 4) / 2)
    assert aggregate(per_token, mask, "seq-mean-token-sum").item() == pytest.approx((6 + 4) / 2)
    with pytest.raises(ValueError, match="loss_agg_mode"):
        aggregate(per_token, mask, "mean")


def test_padding_positions_ignored_even_with_garbage():
    lp, old, adv, _ = _batch([[1.2, 0.9, 1.0]], [[1.0, 1.0, 1.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]], dtype=torch.float64)
    old = old.clone()
    old[0, 2] = -1e9  # a padded position with an absurd behaviour log-prob
    loss, raw = _call("dispo", lp, old, adv, mask)
    assert math.isfinite(loss.item()) and raw["n_tokens"] == 2 and raw["ratio_max"] == pytest.approx(1.2)


def test_entropy_metrics_split_correct_incorrect_and_merge_exactly():
    lp, old, adv, mask = _batch([[1.0, 1.0], [1.0, 1.0]], [[1.0, 1.0], [-1.0, -1.0]])
    ent = torch.tensor([[0.2, 0.4], [1.0, 2.0]], dtype=torch.float64)
    _, raw_a = _call("dispo", lp[:1], old[:1], adv[:1], mask[:1], entropy=ent[:1])
    _, raw_b = _call("dispo", lp[1:], old[1:], adv[1:], mask[1:], entropy=ent[1:])
    s = summarize_metrics(merge_raw_metrics(raw_a, raw_b))
    assert s["actor/entropy_correct"] == pytest.approx(0.3)
    assert s["actor/entropy_incorrect"] == pytest.approx(1.5)
    assert s["actor/entropy"] == pytest.approx(0.9)
    # explicit correctness flags override the advantage sign
    _, raw = _call("dispo", lp, old, adv, mask, entropy=ent, correct=torch.tensor([False, True]))
    assert summarize_metrics(raw)["actor/entropy_correct"] == pytest.approx(1.5)


def test_kl_behaviour_estimate_is_k3():
    lp, old, adv, mask = _batch([[2.0, 0.5]], [[1.0, 1.0]])
    _, raw = _call("dispo", lp, old, adv, mask)
    expected = ((2.0 - 1 - math.log(2.0)) + (0.5 - 1 - math.log(0.5))) / 2
    assert summarize_metrics(raw)["actor/kl_behaviour"] == pytest.approx(expected)


def test_is_weights_scale_each_token():
    lp, old, adv, mask = _batch([[1.0, 1.0]], [[1.0, 1.0]])
    loss, _ = _call("dispo", lp, old, adv, mask, is_weights=torch.tensor([[0.5, 2.0]], dtype=torch.float64))
    loss.backward()
    assert torch.allclose(lp.grad, torch.tensor([[-0.25, -1.0]], dtype=torch.float64))
