"""Streaming generation in one actor (``actors.streaming.EngineLoop``) over the real vLLM CPU engine,
on a random-init Qwen2 with Qwen's 151k vocabulary (its samples rarely end early, so they are long
enough to be caught mid-decode): groups come out as they finish, a sync between engine steps
continues (re-prefilled, exact per-token log-probs) or restarts an unfinished sample, and an
in-actor caller's groups are never handed to the stream. The cross-version case with really
different weights (a DeepSpeed step broadcast mid-sample) is tests/sync/test_partial_rollout.py."""
from __future__ import annotations

import dataclasses
import time

import pytest
import torch

from dispo_ray.data.records import PromptRecord
from dispo_ray.infra.config import compose
from user_inputs import qwen_model_dir

PROMPT = [9707, 11, 1879, 0]  # "Hello, world!" in Qwen's vocabulary


@pytest.fixture(scope="module")
def engine():
    from actors.generator import make_backend

    path = qwen_model_dir()
    cfg = compose([f"model.path={path}", "data.max_prompt_length=16", "generator.max_new_tokens=512"])
    backend = make_backend(cfg, path)
    yield cfg, path, backend
    backend.shutdown()
    import vllm.envs
    vllm.envs.disable_envs_cache()  # an in-process engine core freezes vLLM's env reads; later tests set env vars


def reference_logprobs(path: str, prompt, tokens) -> torch.Tensor:
    """log pi(token_t | prompt, tokens_<t) by a plain transformers forward (temperature 1)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.tensor([list(prompt) + list(tokens)])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1:-1].float()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(tokens)[:, None])[:, 0]


def make_loop(engine, policy):
    from actors.streaming import EngineLoop

    cfg, path, backend = engine

    def sample(s):
        return dataclasses.replace(s)  # the SampleState itself, frozen at its end

    return EngineLoop(backend, policy, sample)


def group(gid, cfg, n=1, max_new_tokens=512, seed=1):
    from actors.backends.base import SamplingSpec

    spec = SamplingSpec.from_config(cfg.generator, {"max_new_tokens": max_new_tokens, "seed": seed})
    from actors.streaming import GroupRequest
    return GroupRequest(gid, PromptRecord("p", "", PROMPT, "0", "t"), n, spec)


def wait_steps(loop, at_least, timeout=60):
    """Until the engine has taken ``at_least`` steps (one token for every running sample each; a
    streamed request reports tokens only at its first and last step)."""
    t0 = time.monotonic()
    while loop.stats["steps"] < at_least and time.monotonic() - t0 < timeout:
        time.sleep(0.002)


def test_groups_come_out_as_they_finish_and_private_ones_stay_private(engine):
    cfg = engine[0]
    loop = make_loop(engine, "continue")
    try:
        loop.submit([group("long", cfg, max_new_tokens=400), group("short", cfg, n=2, max_new_tokens=3)])
        loop.submit([group("mine", cfg, max_new_tokens=2)], private=True)
        first = loop.collect(30.0)
        assert first[0][0] == "short"  # handed out as it finished, before the 400-token group
        assert [len(s.token_ids) for s in first[0][1]] == [3, 3]
        mine = loop.collect(5.0, {"mine"})
        assert [g for g, _ in mine] == ["mine"]  # never handed to the stream's collect above
        done = dict(first)
        while "long" not in done:
            done.update(loop.collect(30.0))
        # (the random model may draw an end token early, so "long" is not guaranteed to be running
        # when "short" comes out; the order is)
        assert len(done["long"][0].token_ids) > 3 and loop.in_flight() == 0
    finally:
        loop.close()


def one_sample_across_a_sync(loop, cfg, max_new_tokens, seed, steps_before, version):
    """Decode one sample, swap to ``version`` after ``steps_before`` engine steps (the receive is
    the identity: the weights stay), and return the finished sample."""
    loop.submit([group("g", cfg, max_new_tokens=max_new_tokens, seed=seed)])
    wait_steps(loop, steps_before)
    assert loop.swap_weights(lambda: version) == version
    out = []
    while not out:
        out = loop.collect(30.0)
    (s,) = out[0][1]
    return s


def test_a_sync_mid_sample_continues_it_with_exact_per_token_logprobs(engine):
    # The weights do not change here (the receive is the identity), so every token, before and
    # after the re-prefill, must carry log pi(token | prompt + all tokens before it).
    cfg, path, _ = engine
    loop = make_loop(engine, "continue")
    try:
        s = one_sample_across_a_sync(loop, cfg, 300, 5, 40, 1)
        a = s.spans[0][1]
        assert s.spans[0][0] == 0 and s.spans[1][0] == 1 and 40 <= a < len(s.token_ids)
        assert sum(n for _, n in s.spans) == len(s.token_ids) and loop.stats["resumed"] == 1
        ref = reference_logprobs(path, PROMPT, s.token_ids)
        diff = (torch.tensor(s.logprobs) - ref).abs()
        assert diff.max() < 2e-3, (diff[:a].max(), diff[a:].max())
    finally:
        loop.close()


def test_abort_policy_restarts_the_sample_under_the_new_version(engine):
    cfg, path, _ = engine
    loop = make_loop(engine, "abort")
    try:
        s = one_sample_across_a_sync(loop, cfg, 200, 7, 20, 3)
        assert s.spans == [[3, len(s.token_ids)]]  # one version: the discarded start is gone
        assert loop.stats["restarted"] == 1 and loop.stats["discarded_tokens"] >= 20
        ref = reference_logprobs(path, PROMPT, s.token_ids)
        assert (torch.tensor(s.logprobs) - ref).abs().max() < 2e-3
    finally:
        loop.close()


def test_abort_drops_a_group_wherever_it_is(engine):
    cfg = engine[0]
    loop = make_loop(engine, "continue")
    try:
        loop.submit([group("a", cfg, max_new_tokens=400), group("b", cfg, max_new_tokens=2)])
        time.sleep(0.5)  # "b" has finished and waits in the outbox; "a" is decoding
        assert loop.abort(["a", "b"]) >= 1
        assert loop.in_flight() == 0 and loop.collect(0.5) == []
        with pytest.raises(ValueError, match="submitted twice"):
            loop.submit([group("c", cfg, max_new_tokens=2), group("c", cfg, max_new_tokens=2)])
    finally:
        loop.close()


def test_a_batch_generate_never_steps_a_group_submitted_right_after_its_check(engine):
    """``GeneratorActor.generate`` (an evaluation) decides between one batch engine call and private
    groups beside the stream while it holds the engine: a group another actor thread submits just
    after that decision waits for the batch call, instead of being stepped (and its outputs taken)
    by it (which failed a k = 1 streaming run at its step-100 evaluation)."""
    import threading

    from actors.generator import GeneratorActor
    from actors.streaming import EngineLoop

    cfg, path, backend = engine
    actor = GeneratorActor.__new__(GeneratorActor)  # the real methods over the module's engine
    actor.cfg, actor.index, actor.backend, actor.tokenizer = cfg, 0, backend, backend.tokenizer
    actor.stats = {"calls": 0, "prompts": 0, "samples": 0, "tokens": 0, "busy_s": 0.0, "syncs": 0}
    actor.loop = EngineLoop(backend, "continue", lambda s: actor._sample(s.group.record, s.token_ids, s.logprobs,
                                                                         s.finish_reason, s.spans))
    checked = actor.loop.in_flight
    submitter = []

    def in_flight_then_a_submit_arrives():
        n = checked()
        if not submitter:  # another thread submits right after the check, and gets the engine if it is free
            t = threading.Thread(target=actor.submit, args=([group("streamed", cfg, max_new_tokens=40)],))
            submitter.append(t)
            t.start()
            t.join(0.5)
        return n

    actor.loop.in_flight = in_flight_then_a_submit_arrives
    try:
        out = actor.generate([PromptRecord("mine", "", PROMPT, "0", "t")], 2, {"max_new_tokens": 3, "seed": 5})
        assert [s.prompt_uid for s in out] == ["mine", "mine"] and all(len(s.response_token_ids) <= 3 for s in out)
        submitter[0].join(30)
        streamed = actor.loop.collect(60.0)
        assert [gid for gid, _ in streamed] == ["streamed"] and len(streamed[0][1][0].response_token_ids) > 0
    finally:
        actor.loop.close()
