"""Pinning pools to node groups (dispo_ray/infra/placement.py) on the real local Ray: a pinned pool's
actors are granted the group's resource, and a pool pinned to a group that no node advertises
fails within its start timeout with one line naming the key (before any actor is started)."""
from __future__ import annotations

import time

import pytest

from conftest import TEST_NODE_RESOURCE, assigned_resources
from dispo_ray.infra.config import ConfigError, compose
from dispo_ray.infra.placement import PIN_AMOUNT, pin


def test_pin_requests_a_token_of_the_resource():
    assert pin(None) == {} and pin("") == {}
    assert pin("dispo_learner") == {"dispo_learner": PIN_AMOUNT} and 1 / PIN_AMOUNT >= 64  # actors per node


def test_reward_workers_land_on_the_pinned_group(ray_cluster):
    from actors.reward_pool import RewardPool
    cfg = compose([f"reward.node_resource={TEST_NODE_RESOURCE}"])
    pool = RewardPool(cfg.reward, max_new_tokens=cfg.generator.max_new_tokens, num_workers=2)
    try:
        for w in pool.workers:
            assert assigned_resources(w)[TEST_NODE_RESOURCE] == pytest.approx(PIN_AMOUNT)
        items = [{"response_text": r"so \boxed{4}", "ground_truth": "4"}, {"response_text": r"\boxed{5}", "ground_truth": "4"}]
        assert [r.correct for r in pool.score(items)] == [True, False]
    finally:
        pool.shutdown()


def test_a_group_no_node_advertises_fails_fast_with_one_line(ray_cluster):
    from actors.generator import GeneratorPool
    from actors.learner_group import LearnerGroup
    from actors.reward_pool import RewardPool

    cfg = compose(["generator=hf"] + [f"{k}.node_resource=dispo_nowhere" for k in ("generator", "learner", "reward")])
    for key, make in (("reward.node_resource", lambda: RewardPool(cfg.reward, 8, start_timeout_s=1)),
                      ("learner.node_resource", lambda: LearnerGroup(cfg, "/no/model", start_timeout_s=1)),
                      ("generator.node_resource", lambda: GeneratorPool(cfg, "/no/model", restart_timeout_s=1))):
        t0 = time.monotonic()
        with pytest.raises(RuntimeError) as err:
            make()
        msg = str(err.value)
        assert msg.startswith(f"{key}='dispo_nowhere': no node") and "\n" not in msg, msg
        assert time.monotonic() - t0 < 10


@pytest.mark.parametrize("value", ["CPU", "GPU", "' '"])
def test_builtin_or_blank_resource_names_are_refused(value):
    with pytest.raises(ConfigError, match="learner.node_resource.*custom resource name"):
        compose([f"learner.node_resource={value}"])
