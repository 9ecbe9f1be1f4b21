"""Packed, token-budget micro-batches (``learner.max_tokens_per_micro_batch``) against the padded path.

* the plan: token balance over ranks, budgets, equal micro-batch counts (split, else empty), the
  too-long sequence's one-line error;
* function level (one process): packed rows through a real Qwen2 (sdpa and eager attention) give
  the padded log-probs, and the loss, raw metrics and gradients of every registered loss;
* a hand-derived token-mean over 2 ranks x several micro-batches;
* the real 2-rank learner with ZeRO 1, 2 and 3 against a single-process padded reference, one loss
  after the other (dispo, cispo, dapo, grpo), including a mini-batch that needs an empty micro-batch.
"""
from __future__ import annotations

import pytest
import torch

from conftest import call_on
from dispo_ray.algorithm.logprobs import naive_token_logprobs
from dispo_ray.algorithm.losses import get_policy_loss, registered_losses
from dispo_ray.algorithm.packing import (PACKED_SDPA, pack_rows, packed_forward, plan_packed_micro_batches,
                                        register_packed_sdpa, select_rows, unpack)
from dispo_ray.infra.config import compose
from dispo_ray.infra.rules import ConfigError
from dispo_ray.rollout.samples import collate
from dispo_ray.sample import Sample
from test_learner import OVERRIDES, ZERO3_PARTITION_ALL, _lr, model_path, reference_update  # noqa: F401 - fixture

LOSSES = ("dispo", "cispo", "dapo", "grpo")
BUDGET = 14
PACKED = [f"learner.max_tokens_per_micro_batch={BUDGET}", "data.max_prompt_length=4", "generator.max_new_tokens=10"]
# one mini-batch of 4 whose plan over 2 ranks needs an empty micro-batch (13 | 5+5, 5), then mixed ones
LENGTHS = [[13, 5, 5, 5], [9, 6, 4, 11], [7, 7, 8, 3], [12, 4, 6, 5], [6, 10, 5, 9], [8, 3, 7, 12],
           [5, 9, 4, 6], [11, 7, 3, 6]]


def test_plan_balances_tokens_fits_budgets_and_equalises_counts():
    lengths = [300, 40, 2000, 120, 80, 900, 60, 500, 35, 700, 220, 1500]
    plan = plan_packed_micro_batches(lengths, 2048, 2)
    assert sorted(i for rank in plan for mb in rank for i in mb) == list(range(len(lengths)))
    assert len(plan[0]) == len(plan[1])
    for rank in plan:
        assert all(sum(lengths[i] for i in mb) <= 2048 for mb in rank)
    load = [sum(lengths[i] for mb in rank for i in mb) for rank in plan]
    assert abs(load[0] - load[1]) <= max(lengths)  # LPT: within the longest sequence
    # 13 | 5 5 5 with a budget of 14: rank 1 packs [5 5] [5], rank 0 cannot split its one sequence
    assert plan_packed_micro_batches([13, 5, 5, 5], 14, 2) == [[[0], []], [[1, 2], [3]]]
    assert plan_packed_micro_batches([3, 3], 10, 4)[2:] == [[[]], [[]]]  # more ranks than sequences


def test_a_sequence_longer_than_the_budget_is_one_line():
    with pytest.raises(ValueError, match=r"^learner.max_tokens_per_micro_batch=100 is below a sequence of "
                                         r"101 tokens \(prompt \+ response\); set it to at least 101$"):
        plan_packed_micro_batches([50, 101, 3], 100, 2)
    with pytest.raises(ConfigError, match="learner.max_tokens_per_micro_batch.*max_new_tokens"):
        from dispo_ray.infra.validation import validate
        validate(compose(["learner.max_tokens_per_micro_batch=100"]))  # < 128 + 32
    validate(compose(["learner.max_tokens_per_micro_batch=160"]))


def _samples(lengths, seed=0, vocab=90):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, n in enumerate(lengths):
        p = 2 + i % 2
        out.append(Sample(f"q{i // 4}", torch.randint(4, vocab, (p,), generator=g).tolist(),
                          torch.randint(4, vocab, (n - p,), generator=g).tolist(), [0.0] * (n - p), 0,
                          correct=i % 3 == 0, advantage=1.0 if i % 3 == 0 else -0.5))
    return out


def _with_noisy_old(batch, lm, seed):
    with torch.no_grad():
        lp, _ = naive_token_logprobs(lm(input_ids=batch["input_ids"],
                                        attention_mask=batch["attention_mask"].long()).logits, batch["input_ids"])
    noise = 0.3 * torch.randn(lp.shape, generator=torch.Generator().manual_seed(seed))
    batch["old_log_probs"] = (lp + noise) * batch["response_mask"]
    return batch


def test_pack_and_unpack_round_trip():
    b = collate(_samples([5, 3, 4]), pad_token_id=0)
    ids, pos, resp, index = pack_rows(b["input_ids"], b["attention_mask"], b["response_mask"])
    assert pos.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3]]
    assert torch.equal(unpack(ids, index, tuple(b["input_ids"].shape)), b["input_ids"])
    assert resp[0, [0, 5, 8]].sum() == 0  # no prediction across a sequence start


@pytest.mark.parametrize("attn", ["sdpa", "eager", PACKED_SDPA, PACKED_SDPA + ":per-sequence"])
def test_packed_loss_and_gradients_equal_padded_for_every_loss(model_path, attn, monkeypatch):  # noqa: F811
    """sdpa and eager: transformers' packed detection (block-diagonal mask); ours: that mask in one
    call for short rows, one causal sdpa per sequence for long ones (forced here)."""
    from transformers import AutoModelForCausalLM
    from actors.learner import _PolicyLogProbs
    if attn.endswith(":per-sequence"):
        import dispo_ray.algorithm.packing as packing
        monkeypatch.setattr(packing, "DENSE_MAX_TOKENS", 0)
        attn = PACKED_SDPA
    assert set(LOSSES) == set(registered_losses())
    lm = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32,
                                              attn_implementation="sdpa" if attn == PACKED_SDPA else attn)
    if attn == PACKED_SDPA:  # what the learner runs when packing: one causal sdpa per sequence
        lm.set_attn_implementation(register_packed_sdpa())
    assert lm.config._attn_implementation == attn
    policy = _PolicyLogProbs(lm, chunk_size=16)
    batch = _with_noisy_old(collate(_samples([13, 5, 9, 5, 11, 4, 7, 12]), pad_token_id=0), lm, 1)
    tokens, seqs = float(batch["response_mask"].sum()), float(batch["input_ids"].shape[0])
    plan = plan_packed_micro_batches(batch["attention_mask"].sum(-1).long().tolist(), BUDGET, 2)
    assert sum(len(mb) > 1 for rank in plan for mb in rank) >= 2  # really packed
    for name, agg in [(n, "token-mean") for n in LOSSES] + [("dispo", "seq-mean-token-mean")]:
        cfg = compose([f"algorithm={name}", f"algorithm.loss_agg_mode={agg}", "algorithm.kl_coef=0.1"])
        fn = get_policy_loss(name)

        def run(mb, lp, ent):
            ref = (mb["old_log_probs"] - 0.1) * mb["response_mask"]  # grpo's KL term on
            return fn(log_probs=lp, old_log_probs=mb["old_log_probs"], advantages=mb["advantages"],
                      response_mask=mb["response_mask"], config=cfg.algorithm, loss_agg_mode=agg,
                      global_tokens=tokens, global_seqs=seqs, entropy=ent, correct=mb["correct"],
                      ref_log_probs=ref)

        lm.zero_grad()
        lp, ent = policy(batch["input_ids"], batch["attention_mask"].long(), batch["response_mask"])
        loss, raw = run(batch, lp, ent)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in lm.named_parameters()}
        lm.zero_grad()
        total, raws = 0.0, []
        for rank in plan:
            for rows in rank:
                if rows:
                    mb = select_rows(batch, rows)
                    plp, pent = packed_forward(policy, mb)
                    torch.testing.assert_close(plp, lp.detach()[rows][:, :plp.shape[1]], atol=2e-5, rtol=1e-5)
                    l_mb, r_mb = run(mb, plp, pent)
                    l_mb.backward()
                    total += float(l_mb.detach())
                    raws.append(r_mb)
        assert total == pytest.approx(float(loss.detach()), rel=1e-5, abs=1e-7), (name, agg)
        from dispo_ray.algorithm.losses import merge_raw_metrics
        merged = merge_raw_metrics(*raws)
        assert merged.keys() == raw.keys()
        for k in raw:
            assert merged[k] == pytest.approx(raw[k], rel=1e-4, abs=1e-5), (name, k)
        for n, p in lm.named_parameters():
            torch.testing.assert_close(p.grad, grads[n], atol=1e-6, rtol=1e-4, msg=f"{name}/{agg}: {n}")


def test_token_mean_is_exact_across_micro_batches_and_ranks():
    """log pi = -id/10 per token (a fake model: packing cannot change it), r = 1 (old = new), so the
    DISPO token-mean is -sum(A * log pi) / N by hand, whatever the split."""
    samples = [Sample("a", [1, 2], [10, 20, 30], [-1.0, -2.0, -3.0], 0, correct=True, advantage=1.0),
               Sample("a", [1], [40], [-4.0], 0, correct=False, advantage=-1.0),
               Sample("b", [3, 4, 5], [50, 60], [-5.0, -6.0], 0, correct=False, advantage=-0.5),
               Sample("b", [6], [70, 80, 90, 100], [-7.0, -8.0, -9.0, -10.0], 0, correct=True, advantage=2.0)]
    batch = collate(samples, pad_token_id=0)
    hand = -(1.0 * (-1 - 2 - 3) - 1.0 * (-4) - 0.5 * (-5 - 6) + 2.0 * (-7 - 8 - 9 - 10)) / 10  # N = 10 tokens
    assert hand == pytest.approx(-(-6 + 4 + 5.5 - 68) / 10)

    def fake(ids, _mask, resp, _pos):
        lp = (-ids.float() / 10).requires_grad_()
        return lp * (resp > 0), torch.zeros_like(lp)

    cfg = compose(["algorithm=dispo"]).algorithm
    plan = plan_packed_micro_batches(batch["attention_mask"].sum(-1).long().tolist(), 6, 2)
    assert [len(r) for r in plan] == [2, 2]
    total = 0.0
    for rank in plan:
        for rows in rank:
            mb = select_rows(batch, rows)
            lp, ent = packed_forward(fake, mb)
            loss, _ = get_policy_loss("dispo")(log_probs=lp, old_log_probs=lp.detach(), advantages=mb["advantages"],
                                               response_mask=mb["response_mask"], config=cfg, global_tokens=10.0)
            total += float(loss)
    assert total == pytest.approx(hand, abs=1e-6)


# ---------------------------------------------------------------- the real learner, 2 ranks
def _reference(model_path, batches, names):  # noqa: F811
    """Single process, padded, the full mini-batch per optimizer step, the registry loss."""
    from transformers import AutoModelForCausalLM
    lm = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    opt = torch.optim.AdamW(lm.parameters(), lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0)
    hist, step = [], 0
    for batch, name in zip(batches, names):
        algo = compose([f"algorithm={name}"]).algorithm
        losses, norms = [], []
        for m in range(2):
            b = {k: v[m * 4:(m + 1) * 4] for k, v in batch.items()}
            lp, ent = naive_token_logprobs(lm(input_ids=b["input_ids"], attention_mask=b["attention_mask"].long()).logits,
                                           b["input_ids"])
            loss, _ = get_policy_loss(name)(log_probs=lp, old_log_probs=b["old_log_probs"], advantages=b["advantages"],
                                            response_mask=b["response_mask"], config=algo, entropy=ent,
                                            correct=b["correct"], loss_agg_mode=algo.loss_agg_mode)
            norms.append(reference_update(lm, opt, loss, _lr(step, 8)))
            losses.append(float(loss.detach()))
            step += 1
        hist.append({"loss": sum(losses) / 2, "grad_norm": sum(norms) / 2})
    return hist, {n: p.detach().clone() for n, p in lm.named_parameters()}


@pytest.fixture(scope="module")
def learner_data(model_path):  # noqa: F811
    from transformers import AutoModelForCausalLM
    lm = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    batches = [_with_noisy_old(collate(_samples(LENGTHS[2 * s] + LENGTHS[2 * s + 1], seed=s), 0), lm, s)
               for s in range(4)]
    hist, params = _reference(model_path, batches, LOSSES)
    return batches, hist, params


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_packed_learner_matches_padded_reference(ray_cluster, model_path, learner_data, stage):  # noqa: F811
    from actors.learner_group import LearnerGroup
    batches, hist, params = learner_data
    cfg = compose(OVERRIDES + PACKED + [f"learner.zero_stage={stage}"])
    group = LearnerGroup(cfg, model_path, ds_config_overrides=ZERO3_PARTITION_ALL)
    assert [i["attn_implementation"] for i in group.info] == [PACKED_SDPA] * 2
    try:
        for k, (batch, name) in enumerate(zip(batches, LOSSES)):
            rank_cfg = compose(OVERRIDES + PACKED + [f"learner.zero_stage={stage}", f"algorithm={name}"])

            def use(w, name=name, rank_cfg=rank_cfg):  # this loss from now on (grpo: seq-mean-token-mean)
                from dispo_ray.algorithm.losses import get_policy_loss as get
                w.cfg, w.loss_fn = rank_cfg, get(name)
            call_on(group.actors, use)
            m = group.train_step(batch)
            assert m["actor/loss"] == pytest.approx(hist[k]["loss"], rel=1e-5, abs=1e-6), name
            assert m["actor/grad_norm"] == pytest.approx(hist[k]["grad_norm"], rel=1e-4), name
        state = group.hf_state_dict()
    finally:
        group.shutdown()
    for name, p in params.items():
        torch.testing.assert_close(state[name], p, atol=3e-5, rtol=0)


def test_packed_shards_hold_each_ranks_rows_in_micro_batch_order():
    from dispo_ray.algorithm.packing import packed_shards
    batch = collate(_samples([13, 5, 5, 5]), pad_token_id=0)
    (s0, p0), (s1, p1) = packed_shards(batch, BUDGET, 2)
    assert (p0, p1) == ([[0], []], [[0, 1], [2]])
    assert torch.equal(s0["input_ids"], batch["input_ids"][[0]])
    assert torch.equal(s1["input_ids"], batch["input_ids"][[1, 2, 3]])
