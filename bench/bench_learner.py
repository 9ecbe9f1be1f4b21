"""Learner overhead: tokens/s of the DeepSpeed training step (world size 1, one process, no Ray)
divided by a bare PyTorch AdamW loop on the same model and batch (goal >= 0.9).

Both sides do the same work per step: the same micro-batches with gradient accumulation, the
DISPO token-mean loss from the registry, gradient clipping and one AdamW step. The learner adds
what DeepSpeed and our step bring: the engine's forward/backward/step wrappers, ZeRO's gradient
handling, the chunked + checkpointed log-prob head (which recomputes the LM head in backward) and
the metrics. Steps are interleaved (learner, bare, learner, ...) and the fastest of the rounds is used
(as timeit does): on a shared machine other processes only ever add time, and interleaving
exposes both sides to the same load. Tokens = attention-mask tokens.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from typing import Dict, List

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402


def _batch(n: int, prompt_len: int, resp_len: int, vocab: int, seed: int = 0) -> Dict[str, torch.Tensor]:
    from dispo_ray.rollout.samples import collate
    from dispo_ray.sample import Sample
    g = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(n):
        r = resp_len - (i % 8)
        samples.append(Sample(str(i), torch.randint(4, vocab, (prompt_len,), generator=g).tolist(),
                              torch.randint(4, vocab, (r,), generator=g).tolist(),
                              (-4.0 + 0.2 * torch.randn(r, generator=g)).tolist(), 0,
                              correct=i % 2 == 0, advantage=1.0 if i % 2 == 0 else -1.0))
    return collate(samples, pad_token_id=0)


def _bare_step(lm, opt, batch, cfg, loss_fn) -> None:
    """The baseline: plain torch, full logits, same micro-batching, clipping and AdamW."""
    from dispo_ray.algorithm.logprobs import naive_token_logprobs
    mbs, tokens = cfg.learner.micro_batch_size, batch["response_mask"].sum()
    opt.zero_grad(set_to_none=True)
    for lo in range(0, batch["input_ids"].shape[0], mbs):
        b = {k: v[lo:lo + mbs].to(lm.device) for k, v in batch.items()}
        logits = lm(input_ids=b["input_ids"], attention_mask=b["attention_mask"].long()).logits
        lp, ent = naive_token_logprobs(logits, b["input_ids"])
        loss, _ = loss_fn(log_probs=lp, old_log_probs=b["old_log_probs"], advantages=b["advantages"],
                          response_mask=b["response_mask"], config=cfg.algorithm, global_tokens=tokens,
                          entropy=ent, correct=b["correct"])
        loss.backward()
    torch.nn.utils.clip_grad_norm_(lm.parameters(), cfg.learner.grad_clip)
    opt.step()


def _measure(zero_stage: int, quick: bool, workdir: str) -> dict:
    from transformers import AutoModelForCausalLM

    from actors.learner import LearnerWorker
    from dispo_ray.infra.config import compose
    from dispo_ray.algorithm.losses import get_policy_loss
    from dispo_ray.tiny.model import build_tiny_model
    from dispo_ray.sync.protocol import find_free_port

    cfg = compose(["learner.num_actors=1", f"learner.zero_stage={zero_stage}", "learner.num_cpus_per_actor=1",
                   "learner.micro_batch_size=16", "learner.mini_batches=1", f"model.cache_dir={workdir}"])
    path = build_tiny_model(cfg.model)
    worker = LearnerWorker(cfg, path, 0, 1)
    worker.setup("127.0.0.1", find_free_port())
    stage = worker.engine.zero_optimization_stage()  # 0 at one rank (actors.deepspeed_setup.ds_config)
    torch.set_num_threads(1)  # same for both sides
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(worker.device)  # same device
    l = cfg.learner
    opt = torch.optim.AdamW(lm.parameters(), lr=l.lr, betas=tuple(l.betas), weight_decay=l.weight_decay)
    loss_fn = get_policy_loss(cfg.algorithm.name)
    batch = _batch(32 if quick else 64, 24, 40, lm.config.vocab_size)
    tokens = float(batch["attention_mask"].sum())
    mask = batch["response_mask"]
    args = ([batch], [float(mask.sum())], [float((mask.sum(-1) > 0).sum())])
    rounds = 4 if quick else 40  # a step is ~0.2 s: many rounds, so that best-of sees a quiet moment for both
    times = {k: [] for k in ("ds_wall", "bare_wall", "ds_cpu", "bare_cpu")}
    for i in range(rounds + 1):  # round 0 warms up both
        for side, step in (("ds", lambda: worker.train_step(*args)),
                           ("bare", lambda: _bare_step(lm, opt, batch, cfg, loss_fn))):
            w0, c0 = time.perf_counter(), time.process_time()
            step()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            if i:
                times[f"{side}_wall"].append(time.perf_counter() - w0)
                times[f"{side}_cpu"].append(time.process_time() - c0)
    worker.shutdown()
    shape = f"{batch['input_ids'].shape[0]} samples x {batch['input_ids'].shape[1]} tokens"
    rows = []
    for clock, unit, what in (("wall", "tokens/s", "wall clock"), ("cpu", "tokens/CPU-s", "process CPU time")):
        ds_tps = tokens / min(times[f"ds_{clock}"])
        bare_tps = tokens / min(times[f"bare_{clock}"])
        rows.append({"name": f"learner step, DeepSpeed W=1 / bare AdamW ({clock})",
                     "value": round(ds_tps, 1), "baseline": round(bare_tps, 1),
                     "ratio": round(ds_tps / bare_tps, 3), "goal": ">= 0.9", "unit": unit,
                     "notes": f"learner.zero_stage={zero_stage}, run as ZeRO stage {stage} at one rank; tiny model, {shape}, micro-batch {l.micro_batch_size}, 1 CPU thread, best "
                              f"of {rounds} interleaved steps, {what}"})
    return rows


def main(quick: bool = False) -> List[dict]:
    with tempfile.TemporaryDirectory(prefix="bench-learner-") as d:
        # One process can hold one torch.distributed world: the default learner.zero_stage (1), which
        # one rank runs as stage 0 (ZeRO partitions over ranks; actors.deepspeed_setup.ds_config).
        # CPU time is reported beside wall clock: on a shared machine other processes' load lands
        # on the wall-clock numbers unevenly, while CPU time measures the work each side does.
        return _measure(1, quick, d)


if __name__ == "__main__":
    from bench import print_rows

    print_rows(main(quick="--quick" in sys.argv))
