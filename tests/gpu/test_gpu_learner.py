"""GPU checks of the learner (skipped without CUDA; run with ``pytest -s tests/gpu`` to see the
printed numbers):

* a learner step with DeepSpeed on CUDA, bf16, world size 1, through the real Ray group
  (placement group with one GPU bundle, NCCL backend): ZeRO-2, and ZeRO-3 with gradient
  checkpointing;
* peak GPU memory of the chunked log-prob step (forward + backward) vs a naive full-logits one.
"""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _batch(n: int, prompt: int, resp: int, vocab: int, seed: int = 0):
    from dispo_ray.rollout.samples import collate
    from dispo_ray.sample import Sample
    g = torch.Generator().manual_seed(seed)
    samples = [Sample(str(i), torch.randint(4, vocab, (prompt,), generator=g).tolist(),
                      torch.randint(4, vocab, (resp,), generator=g).tolist(),
                      (-4.0 + 0.3 * torch.randn(resp, generator=g)).tolist(), 0,
                      correct=i % 2 == 0, advantage=1.0 if i % 2 == 0 else -1.0) for i in range(n)]
    return collate(samples, pad_token_id=0)


def deepspeed_step(tmp_path, stage: int, checkpointing: bool) -> dict:
    """Three bf16 learner steps on CUDA through LearnerGroup; returns the last step's metrics.
    (Also run by the GPU kit, tests/gpu/kit, with its in-process Ray stand-in.)"""
    from actors.learner_group import LearnerGroup
    from dispo_ray.infra.config import compose
    cfg = compose(["learner.num_actors=1", "learner.num_gpus_per_actor=1", "learner.num_cpus_per_actor=1",
                   f"learner.zero_stage={stage}", f"learner.gradient_checkpointing={checkpointing}",
                   "model.dtype=bfloat16", "learner.micro_batch_size=4", f"model.cache_dir={tmp_path}/cache"])
    from dispo_ray.tiny.model import build_tiny_model
    group = LearnerGroup(cfg, build_tiny_model(cfg.model))  # un-warmed: the step's mechanics only
    try:
        assert group.info[0]["backend"] == "nccl" and group.info[0]["device"].startswith("cuda")
        assert group.info[0]["gradient_checkpointing"] is checkpointing
        batch = _batch(8, 16, 32, 90)
        before = group.hf_state_dict()
        metrics = [group.train_step(batch) for _ in range(3)]
        after = group.hf_state_dict()
        print("\nGPU learner step metrics:", {k: round(v, 4) for k, v in metrics[-1].items()
                                                if k.startswith(("actor/loss", "actor/grad", "mismatch"))})
        assert all(torch.isfinite(torch.tensor(m["actor/loss"])) for m in metrics)
        assert metrics[0]["actor/grad_norm"] > 0
        assert any(not torch.equal(before[n], after[n]) for n in before)
        assert next(iter(after.values())).dtype == torch.bfloat16
        out = group.export_hf(str(tmp_path / "hf"))
        from transformers import AutoModelForCausalLM
        AutoModelForCausalLM.from_pretrained(out)
        return metrics[-1]
    finally:
        group.shutdown()


@needs_cuda
@pytest.mark.parametrize("stage,checkpointing", [(2, False), (3, True)])
def test_deepspeed_bf16_step_on_cuda(ray_cluster, tmp_path, stage, checkpointing):
    """ZeRO-2, and ZeRO-3 (model built inside zero.Init) with gradient checkpointing."""
    deepspeed_step(tmp_path, stage, checkpointing)


def _peak(fn) -> int:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def logprob_peaks() -> dict:
    """Peak GPU memory (bytes) of a fwd+bwd log-prob step, chunked LM head vs full logits."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from dispo_ray.algorithm.logprobs import causal_token_logprobs, naive_token_logprobs
    vocab, B, T = 151_936, 8, 1024  # a Qwen-sized vocabulary
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=512, num_hidden_layers=2, num_attention_heads=8,
                      num_key_value_heads=2, intermediate_size=1024, max_position_embeddings=T,
                      tie_word_embeddings=True)
    model = Qwen2ForCausalLM(cfg).to("cuda", torch.bfloat16)
    ids = torch.randint(0, vocab, (B, T), device="cuda")
    mask = torch.zeros(B, T, device="cuda")
    mask[:, T // 4:] = 1

    def naive():
        lp, _ = naive_token_logprobs(model(input_ids=ids).logits, ids)
        (lp * mask).sum().backward()

    def chunked():
        hidden = model.model(input_ids=ids).last_hidden_state
        lp, _ = causal_token_logprobs(hidden, model.lm_head, ids, 1024, mask=mask)
        (lp * mask).sum().backward()

    model.zero_grad(set_to_none=True)
    peak_chunked = _peak(chunked)
    model.zero_grad(set_to_none=True)
    peak_naive = _peak(naive)
    print(f"\npeak GPU memory of the log-prob step (fwd+bwd, B={B}, T={T}, V={vocab}, bf16 model): "
          f"chunked {peak_chunked / 2**20:.0f} MiB vs full logits {peak_naive / 2**20:.0f} MiB "
          f"({peak_naive / max(peak_chunked, 1):.1f}x)")
    assert peak_chunked < peak_naive / 2
    return {"chunked": peak_chunked, "naive": peak_naive}


@needs_cuda
def test_chunked_logprob_peak_memory_vs_full_logits():
    logprob_peaks()
