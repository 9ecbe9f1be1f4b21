"""Group-relative advantages, dynamic-sampling partition and the rollout collate contract."""
from __future__ import annotations

import math

import pytest
import torch

from dispo_ray.algorithm.advantages import assign_advantages, group_advantages, split_informative
from dispo_ray.rollout.samples import collate
from dispo_ray.sample import Sample


def _s(uid, reward, prompt=(1, 2), resp=(3, 4), lps=(-0.5, -0.25)):
    return Sample(prompt_uid=uid, prompt_token_ids=list(prompt), response_token_ids=list(resp),
                  response_logprobs=list(lps), version=0, reward=reward)


def test_group_advantages_by_hand():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0]])
    a = group_advantages(r, norm_by_std=True, eps=0.0 + 1e-12)
    # group 0: mean .5, unbiased std sqrt(1/3): A = +-0.5 * sqrt(3)
    assert a[0].tolist() == pytest.approx([math.sqrt(3) / 2, -math.sqrt(3) / 2, -math.sqrt(3) / 2, math.sqrt(3) / 2])
    assert a[1].tolist() == [0.0, 0.0, 0.0, 0.0]  # all-same group: no signal
    # group 2: mean .25, std = sqrt((3*.0625 + .5625)/3) = 0.5
    assert a[2].tolist() == pytest.approx([-0.5, -0.5, -0.5, 1.5])
    assert group_advantages(r, norm_by_std=False)[2].tolist() == pytest.approx([-0.25, -0.25, -0.25, 0.75])
    with pytest.raises(ValueError):
        group_advantages(torch.ones(3))


def test_assign_and_split_informative():
    samples = [_s("a", 1.0), _s("b", 0.0), _s("a", 0.0), _s("b", 0.0), _s("c", 1.0), _s("c", 1.0)]
    assign_advantages(samples, norm_by_std=False)
    assert [s.advantage for s in samples] == pytest.approx([0.5, 0.0, -0.5, 0.0, 0.0, 0.0])
    parts = split_informative(samples)
    assert [[s.prompt_uid for s in g] for g in parts["kept"]] == [["a", "a"]]
    assert sorted(g[0].prompt_uid for g in parts["dropped"]) == ["b", "c"]
    with pytest.raises(ValueError, match="prompt z"):
        assign_advantages([_s("z", 1.0)])


def test_collate_aligns_tokens_logprobs_and_masks():
    a = _s("a", 1.0, prompt=(5, 6, 7), resp=(8, 9), lps=(-0.1, -0.2))
    b = _s("b", 0.0, prompt=(5,), resp=(4, 3, 2), lps=(-1.0, -2.0, -3.0))
    a.advantage, b.advantage, a.correct = 0.7, -0.7, True
    t = collate([a, b], pad_token_id=0)
    assert t["input_ids"].tolist() == [[5, 6, 7, 8, 9], [5, 4, 3, 2, 0]]
    assert t["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert t["response_mask"].tolist() == [[0, 0, 0, 1, 1], [0, 1, 1, 1, 0]]
    assert t["old_log_probs"][0].tolist() == pytest.approx([0, 0, 0, -0.1, -0.2])
    assert t["old_log_probs"][1].tolist() == pytest.approx([0, -1, -2, -3, 0])
    assert t["advantages"][1].tolist() == pytest.approx([0, -0.7, -0.7, -0.7, 0])
    assert t["correct"].tolist() == [True, False]
    with pytest.raises(ValueError, match="2 response tokens but 1"):
        Sample(prompt_uid="x", prompt_token_ids=[1], response_token_ids=[1, 2], response_logprobs=[0.0], version=0)
