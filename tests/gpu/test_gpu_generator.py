"""GPU check of the generator (skipped without CUDA; see tests/conftest.py).

Runs the hf backend on CUDA, and the vLLM backend (CUDA build) when it imports, on the tiny model:
samples grouped and versioned, log-probs agreeing with a transformers forward pass, and a weight
broadcast (this process as rank 0) landing in the running engine, over gloo (received on CPU,
copied into the GPU weights). The NCCL path is checked by test_gpu_weight_sync.py (one GPU, two
processes with distinct NCCL_HOSTID) and test_gpu_trainer_sync.py (learner and engines on their
own GPUs). All GPU checks in one command: ``tests/gpu/run.sh``.
"""
from __future__ import annotations

import importlib.util
import math
import time

import pytest
import torch

from dispo_ray.infra.config import compose
from dispo_ray.data.records import PromptRecord
from dispo_ray.tiny.model import build_tiny_model, vocab
from dispo_ray.sync.protocol import WeightSyncGroup, find_free_port, make_manifest, send_weights
from dispo_ray.sync.settings import SyncSettings

pytestmark = pytest.mark.gpu
TOL = 2e-3  # float32 on GPU: TF32 / kernel differences


def _setup(tmp_path, backend, gpus=1):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = compose([f"model.cache_dir={tmp_path}", f"generator.backend={backend}", f"generator.num_gpus_per_actor={gpus}",
                   "generator.num_actors=1", "data.max_prompt_length=32", "generator.max_new_tokens=12",
                   "generator.gpu_memory_utilization=0.3"])
    path = build_tiny_model(cfg.model)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    recs = [PromptRecord(uid=f"g/{i}", prompt=p, prompt_token_ids=tok(p)["input_ids"], ground_truth="0", data_source="g")
            for i, p in enumerate(["12+7=", "3-45=", "9*9="])]
    return cfg, path, model, recs


def _max_diff(model, samples):
    worst = 0.0
    for s in samples:
        p = len(s.prompt_token_ids)
        ids = torch.tensor([s.prompt_token_ids + s.response_token_ids])
        with torch.no_grad():
            lp = model(ids).logits[0, :-1].float().log_softmax(-1)[p - 1:]
        ref = lp.gather(-1, torch.tensor(s.response_token_ids)[:, None]).squeeze(-1)
        worst = max(worst, float((ref - torch.tensor(s.response_logprobs)).abs().max()))
    return worst


def _run(cfg, path, model, recs, sync_backend):
    import ray
    from actors.generator import GeneratorPool

    t0 = time.perf_counter()
    pool = GeneratorPool(cfg, path)
    start_s = time.perf_counter() - t0
    print(f"\n{cfg.generator.backend} on GPU: start {start_s:.1f}s")
    try:
        samples = pool.generate(recs, 4)
        assert [s.prompt_uid for s in samples] == [r.uid for r in recs for _ in range(4)]
        d = _max_diff(model, samples)
        print(f"{cfg.generator.backend} on GPU: max |logprob diff| vs transformers (CPU) = {d:.2e}")
        assert d < TOL
        state = {k: v.detach().clone() for k, v in model.named_parameters()}
        state["model.norm.weight"].zero_()  # uniform next-token distribution
        if sync_backend == "nccl":
            state = {k: v.cuda() for k, v in state.items()}
        manifest = make_manifest(state.items())
        port = find_free_port()
        world = pool.sync_world_size()
        refs = pool.init_weight_sync(SyncSettings("127.0.0.1", port, world, manifest, 1 << 20, 120, sync_backend))
        group = WeightSyncGroup(sync_backend, "127.0.0.1", port, 0, world, 120)
        ray.get(refs)
        upd = pool.update_weights()
        send_weights(group, manifest, state, 1 << 20, 3)
        assert pool.wait_update(upd) == 3
        samples = pool.generate(recs, 2)
        lps = torch.tensor([lp for s in samples for lp in s.response_logprobs])
        assert {s.version for s in samples} == {3}
        assert torch.allclose(lps, torch.full_like(lps, -math.log(len(vocab()))), atol=1e-3)
        group.close()
        return {"start_s": start_s, "max_logprob_diff": d}
    finally:
        pool.shutdown()


def test_hf_backend_on_cuda(tmp_path, ray_cluster):
    cfg, path, model, recs = _setup(tmp_path, "hf")
    _run(cfg, path, model, recs, "gloo")


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm not installed")
def test_vllm_backend_on_cuda(tmp_path, ray_cluster):
    cfg, path, model, recs = _setup(tmp_path, "vllm")
    # gloo: on a one-GPU machine this process and the engine share the GPU, which NCCL refuses.
    _run(cfg, path, model, recs, "gloo")
