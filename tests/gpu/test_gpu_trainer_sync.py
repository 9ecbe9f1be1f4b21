"""NCCL weight sync as the training loop runs it, checks (b) and (c) of ``tests/gpu/run.sh``: a
one-GPU DeepSpeed learner group and a vLLM (CUDA) generator pool joined by a
:class:`dispo_ray.sync.coordinator.WeightSync`, bf16 on both sides; after a training step and
``WeightSync.publish`` the engine's sampled-token log-probs equal the learner's within bf16 tolerance.

(b) two GPUs: generator tensor_parallel_size=1; (c) three GPUs: tensor_parallel_size=2 (every TP
worker is a rank of the sync group and loads its own shard).
"""
from __future__ import annotations

import importlib.util

import pytest
import torch

from dispo_ray.infra.config import compose

pytestmark = pytest.mark.gpu
ABS_TOL, MEAN_TOL = 0.15, 0.03  # bf16 weights on both sides, different kernels (vLLM vs HF)


def _skip_reason(gpus: int) -> str:
    if not torch.cuda.is_available() or torch.cuda.device_count() < gpus:
        return f"needs {gpus} CUDA GPUs (found {torch.cuda.device_count() if torch.cuda.is_available() else 0})"
    if importlib.util.find_spec("vllm") is None:
        return "needs vLLM's CUDA build"
    return ""


@pytest.mark.parametrize("tp", [1, 2], ids=["b_tp1_two_gpus", "c_tp2_three_gpus"])
def test_trainer_sync_over_nccl_in_bf16_matches_learner_logprobs(ray_cluster, tmp_path, tp):
    if _skip_reason(1 + tp):
        pytest.skip(_skip_reason(1 + tp))
    import ray

    from dispo_ray.infra.devices import sync_backend
    from dispo_ray.rollout.samples import collate
    from dispo_ray.tiny.model import build_tiny_model
    from sync_pools import connected_sync, records
    from test_gpu_learner import _batch

    cfg = compose(["generator.backend=vllm", f"generator.tensor_parallel_size={tp}",
                   f"generator.num_gpus_per_actor={tp}", "generator.gpu_memory_utilization=0.3",
                   "learner.num_gpus_per_actor=1", "learner.num_actors=1", "learner.mini_batches=1",
                   "learner.micro_batch_size=8", "learner.lr=1e-2", "learner.sync_bucket_mb=1",
                   "model.dtype=bfloat16", f"model.cache_dir={tmp_path}", "generator.max_new_tokens=16"])
    assert sync_backend(cfg) == "nccl"
    path = build_tiny_model(cfg.model)
    with connected_sync(cfg, path) as sync:
        before = ray.get(sync.generators.actors[0].param_sums.remote())
        sync.learners.train_step(_batch(8, 8, 8, 40))  # weights now differ from the engine's
        sync.publish(1)
        after = ray.get(sync.generators.actors[0].param_sums.remote())
        assert any(before[n] != after[n] for n in before)  # the broadcast landed
        samples = sync.generators.generate(records(path, ["12+7=", "3-45=", "9+9=", "40-1="]), 4)
        assert {s.version for s in samples} == {1}
        from transformers import AutoTokenizer
        batch = collate(samples, pad_token_id=AutoTokenizer.from_pretrained(path).pad_token_id)
        learner_lp = sync.learners.compute_log_probs(batch)
        mask = batch["response_mask"].bool()
        diff = (learner_lp[mask] - batch["old_log_probs"][mask]).abs()
        print(f"\n({'b' if tp == 1 else 'c'}) NCCL sync, TP {tp}, bf16: |engine - learner| log-prob "
              f"max {diff.max():.3e}, mean {diff.mean():.3e} over {int(mask.sum())} tokens")
        assert diff.max() < ABS_TOL and diff.mean() < MEAN_TOL
