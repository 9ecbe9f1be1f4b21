"""A partial rollout with really different weights: a DeepSpeed learner step, broadcast by the
:class:`~dispo_ray.sync.coordinator.WeightSync` while a sample is being decoded by a streaming vLLM
generator (real Ray actors, gloo). The sample's tokens span versions 0 and 1, and each token carries
the log-prob of the weights that drew it: checked against a transformers forward of the model folder
(version 0) and of the learner's exported weights (version 1)."""
from __future__ import annotations

import time

import pytest
import torch

from dispo_ray.infra.config import compose
from sync_pools import connected_sync
from user_inputs import qwen_model_dir

PROMPT = [9707, 11, 1879, 0]


def logprobs_under(path: str, tokens) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.tensor([PROMPT + list(tokens)])
    with torch.no_grad():
        logits = model(ids).logits[0, len(PROMPT) - 1:-1].float()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(tokens)[:, None])[:, 0]


def learner_step(sync, cfg) -> None:
    """One real DISPO update on made-up samples, so version 1 differs from version 0."""
    from dispo_ray.algorithm.windows import LossWindows
    from dispo_ray.rollout.samples import collate
    from dispo_ray.sample import Sample

    g = torch.Generator().manual_seed(0)
    samples = [Sample(f"p{i}", PROMPT, torch.randint(0, 150_000, (12,), generator=g).tolist(), [-12.0] * 12,
                      version=0, advantage=1.0 if i % 2 else -1.0) for i in range(4)]
    sync.learners.train_step(collate(samples, pad_token_id=0), LossWindows(cfg.algorithm).in_force())


def test_a_sample_spanning_two_versions_carries_each_tokens_own_logprob(ray_cluster, tmp_path):
    import ray

    from actors.backends.base import SamplingSpec
    from actors.streaming import GroupRequest
    from dispo_ray.data.records import PromptRecord

    path = qwen_model_dir()
    cfg = compose([f"model.path={path}", "generator.backend=vllm", "learner.num_actors=1", "generator.num_actors=1",
                   "data.max_prompt_length=16", "generator.max_new_tokens=1200", "learner.lr=0.05",
                   "generator.partial_rollout=continue", "learner.micro_batch_size=4"])
    with connected_sync(cfg, path) as sync:
        learner_step(sync, cfg)  # trained, not yet published: the generator still holds version 0
        pool, actor = sync.generators, sync.generators.actors[0]
        spec = SamplingSpec.from_config(cfg.generator, {"seed": 11})
        pool.stream.submit([GroupRequest("g", PromptRecord("p", "", PROMPT, "0", "t"), 1, spec)])
        deadline = time.monotonic() + 120
        while ray.get(actor.load.remote())["stream"]["steps"] < 30:  # one token per engine step
            assert time.monotonic() < deadline
            time.sleep(0.01)
        sync.publish(1)  # between two engine steps, mid-sample
        got = []
        while not got:
            got = pool.stream.collect(5.0)
        (sample,) = got[0][1]
        v1_dir = sync.learners.export_hf(str(tmp_path / "v1"))

    spans = sample.version_spans
    assert [v for v, _ in spans] == [0, 1] and sample.version == 0, spans  # the oldest token's version
    a, b = spans[0][1], spans[1][1]
    assert a >= 30 and b > 0 and a + b == len(sample.response_token_ids)
    lp = torch.tensor(sample.response_logprobs)
    v0, v1 = logprobs_under(path, sample.response_token_ids), logprobs_under(v1_dir, sample.response_token_ids)
    print(f"\n{a} tokens at v0, {b} at v1; max |engine - v0| on v0 tokens {(lp[:a] - v0[:a]).abs().max():.2e}, "
          f"|engine - v1| on v1 tokens {(lp[a:] - v1[a:]).abs().max():.2e}, |v0 - v1| there {(v0[a:] - v1[a:]).abs().max():.2e}")
    assert (lp[:a] - v0[:a]).abs().max() < 2e-3
    assert (lp[a:] - v1[a:]).abs().max() < 2e-3
    assert (v0[a:] - v1[a:]).abs().max() > 0.05  # the two versions really differ on these tokens
