r"""Policy losses: a registry of DISPO, CISPO, DAPO and GRPO behind one signature.

Notation, per response token t of sample i (``response_mask`` = 1):

    r   = exp(log_probs - old_log_probs) = pi_theta(o_t) / pi_behaviour(o_t)    (importance ratio)
    A   = advantages (group-relative, broadcast over the response)
    sg  = stop-gradient (``detach``)

REINFORCE-style losses (gradient on every token; only the weight is clipped):

    dispo:  l_t = - sg(w) * A * log pi_theta(o_t),
            w = clip(r, 1 - eps_low_pos, 1 + eps_high_pos)   if A > 0   (correct response)
            w = clip(r, 1 - eps_low_neg, 1 + eps_high_neg)   if A < 0   (incorrect response)
            dl_t/dlog pi = - w * A
    cispo:  the same with one window [1 - clip_low, 1 + clip_high] for both signs.

PPO-style losses (a token leaving the trust region in the helpful direction gets zero gradient):

    dapo:   l_t = - min(r * A, clip(r, 1 - clip_low, 1 + clip_high) * A)       (clip-higher)
    grpo:   the same with clip_low = clip_high, plus kl_coef * k3(ref || theta) when kl_coef > 0,
            k3 = exp(ref - log pi) - (ref - log pi) - 1.

Every loss takes the same keyword arguments; ``windows`` (DISPO's four windows in force, sent by
the driver with the batch: :mod:`dispo_ray.algorithm.windows`) is read by dispo only, the others
ignore it, as they ignore ``eps_*`` in ``config``.

Aggregation (``loss_agg_mode``), with m the response mask:

    token-mean:          sum_{i,t} l m / N_tok          N_tok = global_tokens or sum m
    seq-mean-token-mean: sum_i (sum_t l m / sum_t m) / N_seq
    seq-mean-token-sum:  sum_i (sum_t l m) / N_seq       N_seq = global_seqs or #non-empty rows

Passing the token (sequence) count of the whole mini-batch over all data-parallel ranks and
micro-batches as ``global_tokens`` (``global_seqs``) makes the sum of the micro-batch losses the
exact full-batch loss, so the gradient does not depend on how the batch is split.

Metrics are returned *raw* (sums and counts) so that micro-batches and ranks merge exactly with
:func:`merge_raw_metrics`; :func:`summarize_metrics` turns them into fractions and means. The four
DISPO regimes are, over response tokens with A != 0:

    pos_high: A > 0, r > 1     pos_low: A > 0, r < 1     neg_high: A < 0, r > 1     neg_low: A < 0, r < 1

each with its token fraction and the fraction of its tokens that were actually clipped (for the
REINFORCE losses w != r; for PPO-clip the clipped branch of the min was taken, i.e. zero gradient).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import torch

from dispo_ray.algorithm.metric_keys import ACTOR_PREFIX, regime_key
from dispo_ray.algorithm.regimes import REGIME_NAMES

LossFn = Callable[..., Tuple[torch.Tensor, Dict[str, float]]]
_REGISTRY: Dict[str, LossFn] = {}
REGIMES = REGIME_NAMES  # pos_high, pos_low, neg_high, neg_low (dispo_ray.algorithm.regimes)
_MAX_KEYS = {"ratio_max"}


def register_policy_loss(name: str) -> Callable[[LossFn], LossFn]:
    def deco(fn: LossFn) -> LossFn:
        if name in _REGISTRY:
            raise ValueError(f"policy loss '{name}' is already registered")
        _REGISTRY[name] = fn
        return fn
    return deco


def registered_losses() -> Tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


def get_policy_loss(name: str) -> LossFn:
    if name not in _REGISTRY:
        raise ValueError(f"unknown policy loss '{name}'; registered: {', '.join(registered_losses())}")
    return _REGISTRY[name]


def _param(config: Any, key: str) -> float:
    value = config.get(key) if isinstance(config, Mapping) else getattr(config, key, None)
    if value is None:
        raise KeyError(f"policy loss config is missing '{key}'")
    return float(value)


# --------------------------------------------------------------------------- aggregation
LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")  # algorithm.loss_agg_mode's choices


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, mode: str,
              global_tokens: Optional[float] = None, global_seqs: Optional[float] = None) -> torch.Tensor:
    """Reduce a ``[B, T]`` per-token loss to a scalar (see the module docstring)."""
    mask = mask.to(per_token.dtype)
    if mode == "token-mean":
        denom = global_tokens if global_tokens is not None else mask.sum().clamp(min=1.0)
        return (per_token * mask).sum() / denom
    seq_tokens = mask.sum(dim=-1)
    nonempty = (seq_tokens > 0).to(per_token.dtype)
    if mode == "seq-mean-token-mean":
        per_seq = (per_token * mask).sum(dim=-1) / seq_tokens.clamp(min=1.0)
    elif mode == "seq-mean-token-sum":
        per_seq = (per_token * mask).sum(dim=-1)
    else:
        raise ValueError(f"unknown loss_agg_mode '{mode}'; use one of {', '.join(LOSS_AGG_MODES)}")
    denom = global_seqs if global_seqs is not None else nonempty.sum().clamp(min=1.0)
    return (per_seq * nonempty).sum() / denom


# --------------------------------------------------------------------------- metrics
def _raw_metrics(ratio: torch.Tensor, log_ratio: torch.Tensor, advantages: torch.Tensor,
                 mask: torch.Tensor, clipped: torch.Tensor, entropy: Optional[torch.Tensor],
                 correct: Optional[torch.Tensor]) -> Dict[str, float]:
    with torch.no_grad():
        m = mask.bool()
        raw: Dict[str, float] = {
            "n_tokens": float(m.sum()),
            "n_seqs": float((m.sum(-1) > 0).sum()),
            "ratio_sum": float(ratio[m].sum()),
            "ratio_max": float(ratio[m].max()) if m.any() else 0.0,
            # k3 estimate of KL(pi_behaviour || pi_theta) from behaviour samples: E[(r - 1) - log r]
            "kl_sum": float(((ratio - 1.0) - log_ratio)[m].sum()),
        }
        pos, neg = advantages > 0, advantages < 0
        above, below = ratio > 1.0, ratio < 1.0
        for name, sel in (("pos_high", pos & above), ("pos_low", pos & below),
                          ("neg_high", neg & above), ("neg_low", neg & below)):
            sel = sel & m
            raw[f"{name}_n"] = float(sel.sum())
            raw[f"{name}_clipped"] = float((sel & clipped).sum())
        if entropy is not None:
            ent = entropy.detach().to(torch.float32)
            is_correct = (correct.view(-1, 1).expand_as(m) if correct is not None else pos).bool()
            raw["entropy_sum"] = float(ent[m].sum())
            raw["entropy_correct_sum"] = float(ent[m & is_correct].sum())
            raw["entropy_correct_n"] = float((m & is_correct).sum())
            raw["entropy_incorrect_sum"] = float(ent[m & ~is_correct].sum())
            raw["entropy_incorrect_n"] = float((m & ~is_correct).sum())
    return raw


def merge_raw_metrics(*raws: Mapping[str, float]) -> Dict[str, float]:
    """Merge raw metrics of micro-batches / ranks: sums add, maxima take the max."""
    out: Dict[str, float] = {}
    for raw in raws:
        for k, v in raw.items():
            out[k] = max(out[k], v) if (k in _MAX_KEYS and k in out) else out.get(k, 0.0) + v
    return out


def summarize_metrics(raw: Mapping[str, float], prefix: str = ACTOR_PREFIX) -> Dict[str, float]:
    """Fractions and means for logging, from merged raw metrics."""
    n = max(raw.get("n_tokens", 0.0), 1.0)
    out = {
        f"{prefix}ratio_mean": raw.get("ratio_sum", 0.0) / n,
        f"{prefix}ratio_max": raw.get("ratio_max", 0.0),
        f"{prefix}kl_behaviour": raw.get("kl_sum", 0.0) / n,
    }
    clipped_total = 0.0
    for r in REGIMES:
        nr = raw.get(f"{r}_n", 0.0)
        clipped_total += raw.get(f"{r}_clipped", 0.0)
        out[regime_key(r, "token_frac")] = nr / n
        out[regime_key(r, "clip_frac")] = raw.get(f"{r}_clipped", 0.0) / nr if nr else 0.0
    out[f"{prefix}clip_frac"] = clipped_total / n
    if "entropy_sum" in raw:
        out[f"{prefix}entropy"] = raw["entropy_sum"] / n
        for part in ("correct", "incorrect"):
            cnt = raw.get(f"entropy_{part}_n", 0.0)
            out[f"{prefix}entropy_{part}"] = raw.get(f"entropy_{part}_sum", 0.0) / cnt if cnt else float("nan")
    return out


# --------------------------------------------------------------------------- losses
def _finish(per_token: torch.Tensor, ratio: torch.Tensor, log_ratio: torch.Tensor,
            clipped: torch.Tensor, kw: Dict[str, Any]) -> Tuple[torch.Tensor, Dict[str, float]]:
    mask = kw["response_mask"]
    if kw.get("is_weights") is not None:  # truncated IS on engine mismatch, a constant per token
        per_token = per_token * kw["is_weights"].detach()
    loss = aggregate(per_token, mask, kw.get("loss_agg_mode", "token-mean"),
                     kw.get("global_tokens"), kw.get("global_seqs"))
    raw = _raw_metrics(ratio.detach(), log_ratio.detach(), kw["advantages"], mask, clipped,
                       kw.get("entropy"), kw.get("correct"))
    return loss, raw


def _ratio(log_probs: torch.Tensor, old_log_probs: torch.Tensor, mask: torch.Tensor):
    # Off-response positions may hold anything (padding); zero them before exp to avoid inf.
    log_ratio = (log_probs - old_log_probs) * mask
    return torch.exp(log_ratio), log_ratio


def _reinforce_clipped(lo_pos: float, hi_pos: float, lo_neg: float, hi_neg: float,
                       **kw: Any) -> Tuple[torch.Tensor, Dict[str, float]]:
    log_probs, adv, mask = kw["log_probs"], kw["advantages"], kw["response_mask"]
    ratio, log_ratio = _ratio(log_probs, kw["old_log_probs"], mask)
    pos = adv > 0
    lo = torch.where(pos, torch.full_like(ratio, lo_pos), torch.full_like(ratio, lo_neg))
    hi = torch.where(pos, torch.full_like(ratio, hi_pos), torch.full_like(ratio, hi_neg))
    w = torch.minimum(torch.maximum(ratio, lo), hi).detach()
    clipped = (ratio < lo) | (ratio > hi)
    per_token = -w * adv * log_probs
    return _finish(per_token, ratio, log_ratio, clipped, kw)


@register_policy_loss("dispo")
def dispo_loss(*, config: Any, windows: Optional[Mapping[str, float]] = None,
               **kw: Any) -> Tuple[torch.Tensor, Dict[str, float]]:
    """DISPO: the weight window is chosen by the sign of the advantage. ``windows`` holds the four
    ``eps_{low,high}_{pos,neg}`` in force (the learner passes the ones sent with the batch); without
    it they are read from ``config``."""
    src = config if windows is None else windows
    return _reinforce_clipped(1.0 - _param(src, "eps_low_pos"), 1.0 + _param(src, "eps_high_pos"),
                              1.0 - _param(src, "eps_low_neg"), 1.0 + _param(src, "eps_high_neg"), **kw)


@register_policy_loss("cispo")
def cispo_loss(*, config: Any, **kw: Any) -> Tuple[torch.Tensor, Dict[str, float]]:
    """CISPO: DISPO with one window [1 - clip_low, 1 + clip_high] for both signs."""
    lo, hi = 1.0 - _param(config, "clip_low"), 1.0 + _param(config, "clip_high")
    return _reinforce_clipped(lo, hi, lo, hi, **kw)


def _ppo_clip(config: Any, **kw: Any) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    log_probs, adv, mask = kw["log_probs"], kw["advantages"], kw["response_mask"]
    ratio, log_ratio = _ratio(log_probs, kw["old_log_probs"], mask)
    lo, hi = 1.0 - _param(config, "clip_low"), 1.0 + _param(config, "clip_high")
    unclipped = ratio * adv
    clipped_obj = torch.clamp(ratio, lo, hi) * adv
    per_token = -torch.minimum(unclipped, clipped_obj)
    clipped = clipped_obj < unclipped  # min took the constant branch: zero gradient
    return per_token, ratio, log_ratio, clipped


@register_policy_loss("dapo")
def dapo_loss(*, config: Any, **kw: Any) -> Tuple[torch.Tensor, Dict[str, float]]:
    """DAPO: PPO-clip with a decoupled (higher) upper bound."""
    per_token, ratio, log_ratio, clipped = _ppo_clip(config, **kw)
    return _finish(per_token, ratio, log_ratio, clipped, kw)


@register_policy_loss("grpo")
def grpo_loss(*, config: Any, ref_log_probs: Optional[torch.Tensor] = None,
              **kw: Any) -> Tuple[torch.Tensor, Dict[str, float]]:
    """GRPO: PPO-clip with a symmetric window, optional k3 KL to a reference policy."""
    per_token, ratio, log_ratio, clipped = _ppo_clip(config, **kw)
    kl_coef = float(config.get("kl_coef", 0.0) if isinstance(config, Mapping) else getattr(config, "kl_coef", 0.0))
    if kl_coef > 0:
        if ref_log_probs is None:
            raise ValueError("grpo with kl_coef > 0 needs ref_log_probs")
        d = (ref_log_probs - kw["log_probs"]) * kw["response_mask"]
        per_token = per_token + kl_coef * (torch.exp(d) - d - 1.0)
    return _finish(per_token, ratio, log_ratio, clipped, kw)
