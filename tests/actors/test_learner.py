"""2-rank DeepSpeed learner on CPU against a hand-written single-process reference.

The reference (``_reference_run``) is plain torch: the full mini-batch, full logits, the DISPO
token-mean loss written out by hand, ``clip_grad_norm_``, torch AdamW and the warm-up + cosine LR
formula by hand. The learner splits each mini-batch over 2 ranks x 2 micro-batches, so equal
losses, gradient norms and parameters prove the loss scaling and the gradient reduction.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

from conftest import TEST_NODE_RESOURCE, assigned_resources, call_on
from dispo_ray.infra.config import compose
from dispo_ray.algorithm.logprobs import naive_token_logprobs
from dispo_ray.infra.placement import PIN_AMOUNT
from dispo_ray.rollout.samples import collate
from dispo_ray.sample import Sample

STEPS, M, LR, WARMUP = 2, 2, 1e-3, 2
OVERRIDES = ["learner.num_actors=2", "learner.micro_batch_size=1", f"learner.mini_batches={M}",
             f"learner.lr={LR}", "learner.lr_schedule=cosine", f"learner.warmup_steps={WARMUP}",
             "learner.grad_clip=1.0", "learner.logprob_chunk_size=16", "learner.sync_bucket_mb=1",
             "learner.sync_timeout_s=20", "trainer.total_steps=4", "algorithm=dispo",
             f"learner.node_resource={TEST_NODE_RESOURCE}"]
ZERO3_PARTITION_ALL = {"zero_optimization": {"stage3_param_persistence_threshold": 0}}
_GROUPS = {}


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    from dispo_ray.tiny.model import build_tiny_model
    cfg = compose(OVERRIDES)
    return build_tiny_model(cfg.model, str(tmp_path_factory.mktemp("tiny") / "model"))


def _cfg(stage: int, *extra: str):
    return compose(OVERRIDES + [f"learner.zero_stage={stage}", *extra])


def _batch(seed: int, model_path: str):
    """8 samples (prompts of 3-5, responses of 3-8 tokens), +-1 advantages, and behaviour
    log-probs = the initial model's log-probs + noise, so the ratios straddle the clip windows."""
    from transformers import AutoModelForCausalLM
    g = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(8):
        p = torch.randint(4, 90, (3 + i % 3,), generator=g).tolist()
        r = torch.randint(4, 90, (3 + (i * 5) % 6,), generator=g).tolist()
        samples.append(Sample(f"q{i // 4}", p, r, [0.0] * len(r), 0, correct=i % 3 == 0,
                              advantage=1.0 if i % 3 == 0 else -0.5))
    batch = collate(samples, pad_token_id=0)
    lm = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    with torch.no_grad():
        lp, _ = naive_token_logprobs(lm(input_ids=batch["input_ids"]).logits, batch["input_ids"])
    noise = 0.3 * torch.randn(lp.shape, generator=g)
    batch["old_log_probs"] = (lp + noise) * batch["response_mask"]
    return batch


def _lr(step: int, total: int) -> float:
    if step < WARMUP:
        return LR * (step + 1) / WARMUP
    return LR * 0.5 * (1 + math.cos(math.pi * (step - WARMUP) / (total - WARMUP)))


def reference_update(lm, opt, loss, lr: float) -> float:
    """One reference optimizer step at ``lr``: backward, clip to 1.0, AdamW; returns the norm."""
    for group in opt.param_groups:
        group["lr"] = lr
    opt.zero_grad()
    loss.backward()
    norm = float(torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0))
    opt.step()
    return norm


def _reference_run(model_path, batches, algo):
    """Single process, full mini-batch, hand-written DISPO token-mean loss."""
    from transformers import AutoModelForCausalLM
    lm = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    opt = torch.optim.AdamW(lm.parameters(), lr=LR, betas=(0.9, 0.999), weight_decay=0.0)
    history, step = [], 0
    for batch in batches:
        losses, norms = [], []
        size = batch["input_ids"].shape[0] // M
        for m in range(M):
            b = {k: v[m * size:(m + 1) * size] for k, v in batch.items()}
            lp, _ = naive_token_logprobs(lm(input_ids=b["input_ids"], attention_mask=b["attention_mask"].long()).logits,
                                         b["input_ids"])
            mask, adv = b["response_mask"], b["advantages"]
            r = torch.exp((lp - b["old_log_probs"]) * mask)
            lo = torch.where(adv > 0, 1 - algo.eps_low_pos, 1 - algo.eps_low_neg)
            hi = torch.where(adv > 0, 1 + algo.eps_high_pos, 1 + algo.eps_high_neg)
            w = torch.minimum(torch.maximum(r, lo), hi).detach()
            loss = (-w * adv * lp * mask).sum() / mask.sum()
            norms.append(reference_update(lm, opt, loss, _lr(step, 4 * M)))
            losses.append(float(loss.detach()))
            step += 1
        history.append({"loss": sum(losses) / M, "grad_norm": sum(norms) / M})
    return history, {n: p.detach().clone() for n, p in lm.named_parameters()}


@pytest.fixture(scope="module")
def data(model_path):
    from dispo_ray.infra.config import compose as _c
    batches = [_batch(s, model_path) for s in range(STEPS + 1)]
    history, params = _reference_run(model_path, batches[:STEPS], _c(OVERRIDES).algorithm)
    return {"batches": batches, "ref_history": history, "ref_params": params}


@pytest.fixture(scope="module", autouse=True)
def _shutdown_groups():
    yield
    for g in _GROUPS.values():
        g.shutdown()


def _local_views(group):
    """What each rank itself holds: the full parameter (ZeRO 1/2) or its ZeRO-3 partition, with the
    partition's offset in the flattened parameter."""

    def view(worker):
        out = {}
        for n, p in worker.named_params:
            if hasattr(p, "ds_tensor"):
                part = p.ds_tensor.detach().reshape(-1).clone()
                out[n] = (part.numel() * worker.rank, part, p.ds_numel)
            else:
                out[n] = (0, p.detach().reshape(-1).clone(), p.numel())
        return out
    return call_on(group.actors, view)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stages_match_single_process_reference(ray_cluster, model_path, data, stage):
    """Stage 2 also recomputes its decoder layers in backward (gradient checkpointing), which must
    not change the update; stage 3 builds the model inside zero.Init, so each rank loads ~1/2."""
    from actors.learner_group import LearnerGroup
    ckpt = stage == 2
    group = LearnerGroup(_cfg(stage, f"learner.gradient_checkpointing={ckpt}"), model_path,
                         ds_config_overrides=ZERO3_PARTITION_ALL)
    _GROUPS[stage] = group
    assert [i["zero_stage"] for i in group.info] == [stage, stage] and group.info[0]["backend"] == "gloo"
    assert [i["gradient_checkpointing"] for i in group.info] == [ckpt, ckpt]
    for info in group.info:  # what from_pretrained left on the rank, before DeepSpeed partitioned anything
        assert info["loaded_param_fraction"] == (pytest.approx(0.5, abs=0.02) if stage == 3 else 1.0)
    for actor in group.actors:  # every rank pinned to the learner's node group
        assert assigned_resources(actor)[TEST_NODE_RESOURCE] == pytest.approx(PIN_AMOUNT)
    for k, batch in enumerate(data["batches"][:STEPS]):
        m = group.train_step(batch)
        ref = data["ref_history"][k]
        assert m["actor/loss"] == pytest.approx(ref["loss"], rel=1e-5, abs=1e-6)
        assert m["actor/grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-4)
        assert m["actor/lr"] == pytest.approx(_lr(k * M + M - 1, 4 * M))
    assert m["regime/pos_low/token_frac"] + m["regime/neg_low/token_frac"] > 0
    assert 0 < m["regime/pos_low/clip_frac"] <= 1  # eps_low_pos=0.2 clips the noisy ratios
    assert m["actor/entropy_correct"] > 0 and m["actor/entropy_incorrect"] > 0
    # Every rank's own copy (ZeRO-3: its partition) equals the single-process parameters.
    for views in _local_views(group):
        for name, (off, local, numel) in views.items():
            full = data["ref_params"][name].reshape(-1)
            n = min(local.numel(), max(0, numel - off))
            if stage == 3 and name.endswith("mlp.up_proj.weight"):
                assert local.numel() < numel  # really partitioned
            torch.testing.assert_close(local[:n], full[off:off + n], atol=3e-5, rtol=0)


def test_optimizer_offload_matches_single_process_reference(ray_cluster, model_path, data):
    """ZeRO-2 with the optimizer offloaded (learner.deepspeed_config): DeepSpeedCPUAdam takes the
    torch AdamW's place and the update is the reference's."""
    from actors.learner_group import LearnerGroup
    group = LearnerGroup(_cfg(2, "learner.deepspeed_config={zero_optimization:{offload_optimizer:{device:cpu}}}"),
                         model_path)
    try:
        kinds = call_on(group.actors, lambda w: type(w.engine.basic_optimizer).__name__)
        assert kinds == ["DeepSpeedCPUAdam"] * 2
        for k, batch in enumerate(data["batches"][:STEPS]):
            m = group.train_step(batch)
            assert m["actor/loss"] == pytest.approx(data["ref_history"][k]["loss"], rel=1e-5, abs=1e-6)
            assert m["actor/grad_norm"] == pytest.approx(data["ref_history"][k]["grad_norm"], rel=1e-4)
        state = group.hf_state_dict()
    finally:
        group.shutdown()
    for name, p in data["ref_params"].items():
        torch.testing.assert_close(state[name], p, atol=3e-5, rtol=0)


def test_windows_travel_with_the_batch_and_the_config_stays(ray_cluster, model_path, data):
    """One learner group, the same batch twice with different windows: all four closed (eps = 0,
    so w = 1 and every token with r != 1, i.e. every regime token, is clipped), then wide open
    (nothing is). Each rank's loss read the windows sent; the ranks' config is never written."""
    from actors.learner_group import LearnerGroup
    from dispo_ray.algorithm.losses import REGIMES
    from dispo_ray.infra.config import to_dict
    keys = ("eps_low_pos", "eps_high_pos", "eps_low_neg", "eps_high_neg")
    closed = dict.fromkeys(keys, 0.0)
    wide = {"eps_low_pos": 1.0, "eps_high_pos": 1e9, "eps_low_neg": 1.0, "eps_high_neg": 1e9}
    cfg = _cfg(1)
    group = LearnerGroup(cfg, model_path)
    try:
        tight = group.train_step(data["batches"][0], closed)
        used_tight = call_on(group.actors, lambda w: w.windows_used)
        loose = group.train_step(data["batches"][0], wide)
        used_loose = call_on(group.actors, lambda w: w.windows_used)
        configs = call_on(group.actors, lambda w: to_dict(w.cfg))
        with pytest.raises(KeyError, match="not a DISPO window"):
            group.train_step(data["batches"][0], {"clip_low": 0.1})
    finally:
        group.shutdown()
    assert used_tight == [closed, closed] and used_loose == [wide, wide]
    def flat(d, at=""):
        return {k2: v2 for k, v in d.items()
                for k2, v2 in (flat(v, f"{at}{k}.").items() if isinstance(v, dict) else [(at + k, v)])}
    expected = flat(to_dict(cfg))
    for got in map(flat, configs):  # eps_* still 0.2, 10, 1, 100: nothing differs
        assert {k: (got.get(k), v) for k, v in expected.items() if got.get(k) != v} == {}
    for r in REGIMES:
        assert tight[f"regime/{r}/token_frac"] > 0
        assert (tight[f"regime/{r}/clip_frac"], loose[f"regime/{r}/clip_frac"]) == (1.0, 0.0)
    assert tight["actor/clip_frac"] > 0 == loose["actor/clip_frac"]


def test_first_microbatch_mismatch_is_measured(ray_cluster, model_path, data):
    """Before any update the learner's log-probs are the initial model's, so the mismatch
    metrics equal those of the injected noise on the first micro-batch of every rank."""
    from actors.learner_group import LearnerGroup
    group = _GROUPS[2]
    fresh = LearnerGroup(_cfg(2), model_path)
    try:
        batch = data["batches"][0]
        m = fresh.train_step(batch)
    finally:
        fresh.shutdown()
    lp0 = group.compute_log_probs(batch)  # trained weights now: must differ from the initial ones
    from transformers import AutoModelForCausalLM
    lm = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    with torch.no_grad():
        init_lp, _ = naive_token_logprobs(lm(input_ids=batch["input_ids"]).logits, batch["input_ids"])
    rows = [0, 1]  # micro-batch 0 of mini-batch 0 is row 0 on rank 0 and row 1 on rank 1
    mask = batch["response_mask"][rows].bool()
    d = (init_lp[rows] - batch["old_log_probs"][rows])[mask]
    assert m["mismatch/abs_logp_diff"] == pytest.approx(float(d.abs().mean()), rel=1e-4)
    assert m["mismatch/kl"] == pytest.approx(float((d.exp() - 1 - d).mean()), rel=1e-4)
    assert not torch.allclose(lp0, init_lp * batch["response_mask"], atol=1e-4)


def test_checkpoint_reload_gives_same_next_step(ray_cluster, model_path, data, tmp_path):
    from actors.learner_group import LearnerGroup
    group = _GROUPS[3]
    ckpt = str(tmp_path / "ckpt")
    group.save_checkpoint(ckpt)
    draw = lambda w: torch.rand(4)  # noqa: E731 - the RNG state right after save / load
    rng_before = call_on(group.actors, draw)
    expected = group.train_step(data["batches"][STEPS])
    expected_params = group.hf_state_dict()

    fresh = LearnerGroup(_cfg(3), model_path, ds_config_overrides=ZERO3_PARTITION_ALL)
    try:
        fresh.load_checkpoint(ckpt)
        rng_after = call_on(fresh.actors, draw)
        got = fresh.train_step(data["batches"][STEPS])
        got_params = fresh.hf_state_dict()
    finally:
        fresh.shutdown()
    for a, b in zip(rng_before, rng_after):
        assert torch.equal(a, b)
    assert got["actor/loss"] == pytest.approx(expected["actor/loss"], rel=1e-6)
    assert got["actor/lr"] == pytest.approx(expected["actor/lr"])  # scheduler state restored
    for name, t in expected_params.items():
        torch.testing.assert_close(got_params[name], t, atol=1e-6, rtol=0)


def test_hf_export_loads_and_gives_identical_logits(ray_cluster, data, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    group = _GROUPS[3]
    out = group.export_hf(str(tmp_path / "hf"))
    assert os.path.isfile(os.path.join(out, "model.safetensors"))
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.pad_token_id == 0
    lm = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    state = group.hf_state_dict()
    for name, p in lm.named_parameters():
        torch.testing.assert_close(p.detach(), state[name], atol=0, rtol=0)
    batch = data["batches"][0]
    with torch.no_grad():
        logits = lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"].long()).logits
    ref, _ = naive_token_logprobs(logits, batch["input_ids"])
    learner = group.compute_log_probs(batch)
    mask = batch["response_mask"].bool()
    torch.testing.assert_close(learner[mask], ref[mask], atol=1e-5, rtol=1e-5)


def test_weight_sync_sends_zero3_weights_in_buckets_and_fails_on_dead_peer(ray_cluster):
    import ray
    from dispo_ray.sync.protocol import WeightSyncError, plan_buckets
    from dispo_ray.sync.settings import SyncSettings

    @ray.remote(num_cpus=0.1)
    class Receiver:
        def join(self, host, port):
            from dispo_ray.sync.protocol import WeightSyncGroup
            self.g = WeightSyncGroup("gloo", host, port, 1, 2, timeout_s=20)

        def receive(self, manifest, bucket_bytes):
            from dispo_ray.sync.protocol import receive_weights
            version, it = receive_weights(self.g, manifest, bucket_bytes)
            return version, {n: t.clone() for n, t in it}

    group = _GROUPS[3]
    manifest = group.weight_manifest()
    assert "lm_head.weight" not in [s.name for s in manifest]  # tied to embed_tokens
    assert len(plan_buckets(manifest, 1 << 20)) >= 2  # really bucketed
    host, port = group.weight_sync_endpoint()
    rx = Receiver.remote()
    join = rx.join.remote(host, port)
    group.init_weight_sync(SyncSettings(host, port, 2, manifest, 1 << 20, group.cfg.learner.sync_timeout_s))
    ray.get(join)
    recv = rx.receive.remote(manifest, 1 << 20)
    stats = group.broadcast_weights(7)
    version, got = ray.get(recv)
    assert version == 7 and stats["sync/buckets"] >= 2
    state = group.hf_state_dict()
    assert set(got) == set(state)
    for name, t in state.items():
        torch.testing.assert_close(got[name], t, atol=0, rtol=0)

    ray.kill(rx)  # a peer dies: the sync must raise, not hang, and the world stays usable
    with pytest.raises(Exception) as err:
        group.broadcast_weights(8)
    assert isinstance(err.value.cause if hasattr(err.value, "cause") else err.value, WeightSyncError) \
        or "weight sync" in str(err.value)
    assert group.compute_log_probs(collate([Sample("x", [5, 6], [7, 8], [0.0, 0.0], 0)], 0)).shape == (1, 4)


def test_one_rank_runs_stage_0_and_resumes_a_zero1_checkpoint_in_its_layout(ray_cluster, model_path, data, tmp_path):
    """At one rank ZeRO-1 partitions nothing, so ``learner.zero_stage=1`` runs as stage 0 (and
    matches the single-process reference); a checkpoint written by a one-rank ZeRO-1 engine (as every
    one-rank run wrote before that rule, without the layout file) is resumed by rebuilding the engine
    at stage 1: the next step equals the one the writing engine takes."""
    from actors.learner import LAYOUT_FILE
    from actors.learner_group import LearnerGroup
    one = _cfg(1, "learner.num_actors=1", "learner.micro_batch_size=2")
    stages = lambda g: call_on(g.actors, lambda w: w.engine.zero_optimization_stage())  # noqa: E731

    plain = LearnerGroup(one, model_path)
    try:
        assert [i["zero_stage"] for i in plain.info] == [0]
        for b in data["batches"][:STEPS]:
            plain.train_step(b)
        for name, t in data["ref_params"].items():  # stage 0 is the same update
            torch.testing.assert_close(plain.hf_state_dict()[name], t, atol=2e-5, rtol=0)
    finally:
        plain.shutdown()

    old = LearnerGroup(one, model_path, ds_config_overrides={"zero_optimization": {"stage": 1}})
    ckpt = str(tmp_path / "ckpt")
    try:
        assert stages(old) == [1]
        old.train_step(data["batches"][0])
        old.save_checkpoint(ckpt)
        assert json_load(os.path.join(ckpt, LAYOUT_FILE)) == {"zero_stage": 1, "world_size": 1}
        os.remove(os.path.join(ckpt, LAYOUT_FILE))  # as written before the layout file existed
        expected = old.train_step(data["batches"][1])
        expected_params = old.hf_state_dict()
    finally:
        old.shutdown()
    fresh = LearnerGroup(one, model_path)
    try:
        assert stages(fresh) == [0]
        fresh.load_checkpoint(ckpt)
        assert stages(fresh) == [1]
        got = fresh.train_step(data["batches"][1])
        got_params = fresh.hf_state_dict()
    finally:
        fresh.shutdown()
    assert got["actor/loss"] == pytest.approx(expected["actor/loss"], rel=1e-6)
    for name, t in expected_params.items():
        torch.testing.assert_close(got_params[name], t, atol=1e-6, rtol=0)


def json_load(path):
    import json
    with open(path) as f:
        return json.load(f)
