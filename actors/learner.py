"""One DeepSpeed data-parallel rank of the learner (:class:`LearnerWorker`, a Ray actor as
:data:`LearnerActor`); :mod:`actors.learner_group` builds the world and splits batches.

Loss scaling. The driver splits a rollout batch into ``mini_batches`` optimizer steps; each
mini-batch is split over the W ranks and each rank's share into micro-batches. The registry loss
is called with ``global_tokens`` / ``global_seqs`` = the counts of the WHOLE mini-batch, so
``sum over ranks and micro-batches of loss_micro = L_full`` (the single-process full-batch loss).
DeepSpeed averages gradients over the W ranks at the accumulation boundary; we call
``engine.backward(W * loss_micro, scale_wrt_gas=False)`` (no division by the accumulation count,
whose boundary we set by hand), so the reduced gradient is ``(1/W) * sum_r sum_k W * grad(loss_rk)
= grad(L_full)`` exactly, whatever W and the micro-batch size.
"""
from __future__ import annotations

import gc
import json
import os
import random
import shutil
from datetime import timedelta
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from actors.deepspeed_setup import ds_config, lr_lambda, make_optimizer
from actors.learner_sync import LearnerSyncMixin
from dispo_ray.algorithm.logprobs import causal_token_logprobs
from dispo_ray.algorithm.losses import get_policy_loss, merge_raw_metrics
from dispo_ray.algorithm.packing import empty_forward, packed_forward, select_rows

LAYOUT_FILE = "zero_layout.json"  # in a learner checkpoint: {"zero_stage", "world_size"}
_WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth", ".index.json", ".msgpack", ".h5")


def _with_stage(overrides: Dict[str, Any], stage: int) -> Dict[str, Any]:
    zero = dict(overrides.get("zero_optimization", {}), stage=stage)
    return {**overrides, "zero_optimization": zero}


class _PolicyLogProbs(torch.nn.Module):
    """Wraps a transformers causal LM so the DeepSpeed engine's forward returns per-token
    ``(log_probs, entropy)`` (chunked LM head, see :mod:`dispo_ray.algorithm.logprobs`) instead of logits."""

    def __init__(self, lm: torch.nn.Module, chunk_size: int):
        super().__init__()
        self.lm, self.chunk_size = lm, chunk_size

    def forward(self, input_ids, attention_mask, response_mask=None, position_ids=None):
        backbone = getattr(self.lm, self.lm.base_model_prefix)
        # no KV cache: a training forward never decodes, and a cache would hold every layer's K/V.
        # Packed rows (dispo_ray.algorithm.packing) pass position_ids restarting per sequence and no mask.
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=False).last_hidden_state
        return causal_token_logprobs(hidden, self.lm.get_output_embeddings(), input_ids,
                                     self.chunk_size, mask=response_mask)


def load_policy_model(model_path: str, dtype: str, packed: bool = False) -> torch.nn.Module:
    """The HF causal LM in ``model.dtype``: DeepSpeed trains bf16/fp16 weights with fp32 master
    copies made from them, so loading fp32 first only cost host memory (28 GB per rank at 7B
    before DeepSpeed cast it down) and changed no value. Its LM head computes fp32 logits
    (:func:`dispo_ray.algorithm.logprobs.fp32_logits_head`). ``packed``: sdpa attention becomes
    one causal sdpa per packed sequence (:func:`dispo_ray.algorithm.packing.packed_sdpa_attention`)."""
    from transformers import AutoModelForCausalLM

    from dispo_ray.algorithm.logprobs import fp32_logits_head
    lm = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype))
    if packed and lm.config._attn_implementation == "sdpa":  # eager, flash_attention_2: their own packing
        from dispo_ray.algorithm.packing import register_packed_sdpa
        lm.set_attn_implementation(register_packed_sdpa())
    fp32_rotary_buffers(lm)
    fp32_logits_head(lm.get_output_embeddings())
    return lm


def fp32_rotary_buffers(lm: torch.nn.Module) -> int:
    """Rebuild rotary-embedding frequency buffers (``inv_freq``, ``original_inv_freq``) that are
    not float32; returns how many modules it fixed.

    Why: under ZeRO-3 transformers builds the model inside ``deepspeed.zero.Init``, which creates
    every floating tensor in the DeepSpeed dtype, so with bf16 the RoPE frequencies are rounded to
    bf16 (relative error up to 2^-9): the angle at position p is off by up to p * 0.002 rad, 2 rad at
    p = 1000 -- the learner's log-probs of long responses drift from the generator's, which keeps
    them in fp32. (DeepSpeed itself keeps fp32 buffers for ZeRO 0-2.) The module is rebuilt
    outside ``zero.Init`` from its config and its buffers taken over."""
    fixed = 0
    for module in lm.modules():
        inv = getattr(module, "inv_freq", None)
        if not isinstance(inv, torch.Tensor) or inv.dtype == torch.float32 or not hasattr(module, "config"):
            continue
        try:
            fresh = type(module)(module.config)
        except TypeError as e:  # a rotary class that needs more than its config: say so, keep going
            import warnings
            warnings.warn(f"RoPE buffers of {type(module).__name__} stay {inv.dtype} (cannot rebuild: {e})")
            continue
        for name in ("inv_freq", "original_inv_freq"):
            if isinstance(getattr(fresh, name, None), torch.Tensor):
                setattr(module, name, getattr(fresh, name).to(device=inv.device, dtype=torch.float32))
        fixed += 1
    return fixed


def _local_param_fraction(lm: torch.nn.Module) -> float:
    """Elements this rank holds / elements of the model: 1 when loaded whole, ~1/W when built
    inside ``zero.Init`` (a ZeRO-3 parameter is an empty placeholder plus its ``ds_tensor`` shard)."""
    full = sum(getattr(p, "ds_numel", p.numel()) for p in lm.parameters())
    local = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in lm.parameters())
    return local / max(full, 1)


class LearnerWorker(LearnerSyncMixin):
    """One rank. Construct, then (all ranks concurrently) :meth:`setup` with rank 0's endpoint."""

    def __init__(self, cfg: Any, model_path: str, rank: int, world_size: int,
                 ds_config_overrides: Optional[Dict[str, Any]] = None):
        self.cfg, self.model_path, self.rank, self.world_size = cfg, model_path, rank, world_size
        self.ds_overrides = ds_config_overrides or {}
        self.engine = None
        self.sync_group = None
        self.windows_used: Optional[Dict[str, float]] = None  # DISPO windows of the latest train_step
        from dispo_ray.infra.devices import sync_backend, uses_cuda
        self._sync_backend = sync_backend(cfg)  # until the driver passes its decision
        # What Ray granted decides the device, never what the process sees: Ray leaves
        # CUDA_VISIBLE_DEVICES alone for a 0-GPU actor, so a CPU learner on a GPU node sees them all.
        self.cuda = uses_cuda(cfg.learner.num_gpus_per_actor)
        from dispo_ray.infra.devices import check_cuda_startup
        check_cuda_startup(cfg.learner.num_gpus_per_actor, f"learner rank {rank}")  # one line naming the driver
        if not self.cuda:
            os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before anything initialises CUDA
            torch.set_num_threads(max(1, int(cfg.learner.num_cpus_per_actor)))  # fractional actors
        # a global DS_ACCELERATOR=cpu (as CI sets) must not pin a GPU actor to the CPU; DeepSpeed
        # reads it on first use, after this point
        os.environ["DS_ACCELERATOR"] = "cuda" if self.cuda else "cpu"

    # ------------------------------------------------------------------ world and engine
    def endpoint(self) -> tuple:
        """(address, free port) of this node: rank 0's answer becomes the world's rendezvous
        (:func:`dispo_ray.sync.net.local_ip`: loopback in a local run)."""
        from dispo_ray.sync.protocol import find_free_port, local_ip
        return local_ip(), find_free_port()

    def setup(self, master_addr: str, master_port: int) -> Dict[str, Any]:
        """Join the DeepSpeed world (gloo on CPU, NCCL on GPU), load the model, build the engine."""
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        accel = get_accelerator().device_name()
        if accel != os.environ["DS_ACCELERATOR"]:
            raise RuntimeError(f"learner rank {self.rank}: DeepSpeed's accelerator is '{accel}' but this "
                               f"process has {'a GPU' if self.cuda else 'no GPU'}")

        from dispo_ray.infra.devices import assigned_cuda_index, learner_world_timeout_s, model_folder_params
        # the GPU Ray assigned (also under RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES=1, where
        # every rank sees every GPU); DeepSpeed puts the engine on cuda:LOCAL_RANK
        local = assigned_cuda_index() if self.cuda else self.rank
        os.environ.update({"MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port), "RANK": str(self.rank),
                           "WORLD_SIZE": str(self.world_size), "LOCAL_RANK": str(local)})
        backend = "nccl" if self.cuda else "gloo"
        if self.cuda:
            torch.cuda.set_device(local)
        else:
            # DeepSpeed's CPU comm backend JIT-compiles a shared-memory op (~30 s) used only by
            # inference_all_reduce (tensor-parallel inference), which training never calls.
            from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder
            deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False
        # the barriers after rank 0's lone checkpoint / HF-export writes are sized by the model
        dtype_bytes = torch.empty((), dtype=getattr(torch, self.cfg.model.dtype)).element_size()
        timeout = timedelta(seconds=learner_world_timeout_s(
            self.cfg.learner.sync_timeout_s, model_folder_params(self.model_path), dtype_bytes))
        # The world's rendezvous store listens on master_addr only (loopback in a local run), as the
        # weight sync's does: torch's tcp:// rendezvous would listen on every interface.
        from dispo_ray.sync.net import bound_store
        store = bound_store(master_addr, master_port, self.rank, self.world_size, timeout.total_seconds())
        torch.distributed.init_process_group(backend, store=store, rank=self.rank, world_size=self.world_size,
                                             timeout=timeout)
        deepspeed.init_distributed(dist_backend=backend, timeout=timeout)

        info = self._build_engine(self.ds_overrides)
        return {"rank": self.rank, "backend": backend, "device": str(self.device), **info}

    def _build_engine(self, overrides: Dict[str, Any]) -> Dict[str, Any]:
        """Load the model and wrap it in a DeepSpeed engine under ``ds_config(cfg, W, overrides)``."""
        import deepspeed

        l = self.cfg.learner
        config = ds_config(self.cfg, self.world_size, overrides)
        if config["zero_optimization"].get("stage") == 3:
            # transformers then builds the model inside deepspeed.zero.Init and loads each tensor
            # straight into its partition, so no rank ever holds the whole model (it keeps only a
            # weakref to this object, hence the attribute).
            from transformers.integrations import HfDeepSpeedConfig
            self._hf_ds_config = HfDeepSpeedConfig(config)
        torch.manual_seed(self.cfg.trainer.seed)
        lm = load_policy_model(self.model_path, self.cfg.model.dtype, packed=l.max_tokens_per_micro_batch > 0)
        local_fraction = _local_param_fraction(lm)
        if l.gradient_checkpointing:  # recompute each decoder layer in backward (non-reentrant: ZeRO-3 safe)
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.hf_config = lm.config
        self.policy = _PolicyLogProbs(lm, l.logprob_chunk_size)
        opt = make_optimizer(self.policy.parameters(), l, config)
        total = self.cfg.trainer.total_steps * l.mini_batches
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(l.warmup_steps, total, l.lr_schedule))
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=self.policy, optimizer=opt, lr_scheduler=sched, config=config)
        self.zero3 = self.engine.zero_optimization_stage() == 3
        self.device = self.engine.device
        # HF names (wrapper prefix stripped); a tied lm_head.weight is not a separate parameter.
        self.named_params = [(n[len("lm."):], p) for n, p in self.engine.module.named_parameters()]
        self.loss_fn = get_policy_loss(self.cfg.algorithm.name)
        return {"zero_stage": self.engine.zero_optimization_stage(), "loaded_param_fraction": local_fraction,
                "gradient_checkpointing": bool(lm.is_gradient_checkpointing),
                "attn_implementation": lm.config._attn_implementation}

    def _to_dev(self, mb: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        return {k: v.to(self.device) for k, v in mb.items()}

    def _forward(self, mb: Dict[str, torch.Tensor]):
        return self.engine(mb["input_ids"], mb["attention_mask"].long(), mb["response_mask"])

    # ------------------------------------------------------------------ log-probs and training
    def compute_log_probs(self, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        """log p(input_ids[:, t] | < t) on response positions (0 elsewhere), ``[b, T]``, no grad."""
        self.engine.eval()
        out = torch.zeros(batch["input_ids"].shape, dtype=torch.float32)
        mbs = self.cfg.learner.micro_batch_size
        with torch.no_grad():
            for lo in range(0, batch["input_ids"].shape[0], mbs):
                mb = self._to_dev(select_rows(batch, range(lo, min(lo + mbs, out.shape[0]))))
                lp, _ = self._forward(mb)
                out[lo:lo + mbs, :lp.shape[1]] = lp.float().cpu()
        return out

    def train_step(self, shards: Sequence[Dict[str, torch.Tensor]], global_tokens: Sequence[float],
                   global_seqs: Sequence[float], windows: Optional[Dict[str, float]] = None,
                   plans: Optional[Sequence[List[List[int]]]] = None) -> Dict[str, Any]:
        """One optimizer step per shard (= this rank's part of one mini-batch). ``plans[m]``: the
        shard's packed micro-batches (row indices, ``[]`` = empty; :mod:`dispo_ray.algorithm.packing`),
        None: ``micro_batch_size`` rows each, padded. ``windows``: DISPO's
        clip windows this batch trains with, passed to the loss (None: the configured
        ``algorithm.eps_*``; :func:`dispo_ray.algorithm.windows.resolve`); the config is never
        written, and ``windows_used`` tells what the latest step's loss read. Returns raw sums
        (loss, registry metrics, mismatch) that the group merges over ranks."""
        from dispo_ray.algorithm.windows import resolve
        l, algo = self.cfg.learner, self.cfg.algorithm
        self.windows_used = windows = resolve(algo, windows)
        if len(shards) != len(global_tokens) or len(shards) != len(global_seqs):
            raise ValueError("train_step: shards, global_tokens and global_seqs differ in length")
        is_w: List[Optional[torch.Tensor]] = [None] * len(shards)
        out: Dict[str, Any] = {"loss": [], "grad_norm": [], "lr": [],
                               "mismatch_abs_sum": 0.0, "mismatch_kl_sum": 0.0, "mismatch_n": 0.0}
        if algo.mismatch_is_cap > 0:  # truncated IS on the engine mismatch, from a pre-update pass
            for m, shard in enumerate(shards):
                lp = self.compute_log_probs(shard)
                is_w[m] = torch.exp(lp - shard["old_log_probs"]).clamp(max=algo.mismatch_is_cap)
        self.engine.train()
        raws = []
        for m, shard in enumerate(shards):
            n = shard["input_ids"].shape[0]
            micro = plans[m] if plans is not None else [list(range(lo, min(n, lo + l.micro_batch_size)))
                                                        for lo in range(0, n, l.micro_batch_size)]
            lr = float(self.optimizer.param_groups[0]["lr"])
            loss_sum = 0.0
            part = dict(shard, **({"is_weights": is_w[m]} if is_w[m] is not None else {}))
            for k, rows in enumerate(micro):
                self.engine.set_gradient_accumulation_boundary(k == len(micro) - 1)
                loss, raw = torch.zeros((), device=self.device), {}  # an empty packed micro-batch
                if rows:
                    mb = self._to_dev(select_rows(part, rows))
                    lp, ent = packed_forward(self.engine, mb) if plans else self._forward(mb)
                    lp = lp.float()
                    if m == 0 and k == 0:  # before any update: generator-vs-learner mismatch
                        out.update(self._mismatch(lp.detach(), mb))
                    loss, raw = self.loss_fn(
                        log_probs=lp, old_log_probs=mb["old_log_probs"], advantages=mb["advantages"],
                        response_mask=mb["response_mask"], config=algo, loss_agg_mode=algo.loss_agg_mode,
                        global_tokens=float(global_tokens[m]), global_seqs=float(global_seqs[m]),
                        entropy=ent, correct=mb["correct"], is_weights=mb.get("is_weights"), windows=windows)
                if loss.grad_fn is None:  # empty, or no response token: a zero loss through every parameter,
                    loss = loss + empty_forward(self.engine, self.device)  # so the collectives still pair up
                self.engine.backward(loss * self.world_size, scale_wrt_gas=False)
                norm = self._stage0_grad_norm() if k == len(micro) - 1 else None
                self.engine.step()
                loss_sum += float(loss.detach())
                raws.append(raw)
            gn = self.engine.get_global_grad_norm()
            out["grad_norm"].append(float(gn) if gn is not None else norm)
            out["loss"].append(loss_sum)
            out["lr"].append(lr)
        out["raw"] = merge_raw_metrics(*raws)
        return out

    def _stage0_grad_norm(self) -> Optional[float]:
        """Without ZeRO DeepSpeed does not record the norm; the grads are reduced by now."""
        if self.engine.zero_optimization_stage() > 0:
            return None
        grads = [p.grad.float().norm() for p in self.engine.module.parameters() if p.grad is not None]
        return float(torch.stack(grads).norm()) if grads else 0.0

    @staticmethod
    def _mismatch(lp: torch.Tensor, mb: Dict[str, torch.Tensor]) -> Dict[str, float]:
        """Sums over response tokens of |logp_learner - logp_gen| and the k3 estimate of
        KL(pi_gen || pi_learner) from generator samples: (r - 1) - log r, r = pi_learner / pi_gen."""
        m = mb["response_mask"].bool()
        d = (lp - mb["old_log_probs"])[m]
        return {"mismatch_abs_sum": float(d.abs().sum()), "mismatch_kl_sum": float((d.exp() - 1 - d).sum()),
                "mismatch_n": float(m.sum())}

    def hf_state_dict(self) -> Optional[Dict[str, torch.Tensor]]:
        """The full policy weights (HF names, CPU) on rank 0; None elsewhere. All ranks must call."""
        sd: Dict[str, torch.Tensor] = {}
        for bucket, tensors in self._iter_buckets(self.cfg.learner.sync_bucket_mb << 20):
            if tensors is not None:
                sd.update({s.name: t.detach().cpu().clone() for s, t in zip(bucket, tensors)})
        return sd if self.rank == 0 else None

    # ------------------------------------------------------------------ checkpoints and export
    def save_checkpoint(self, path: str) -> str:
        """DeepSpeed checkpoint (model, optimizer, scheduler; ZeRO shards per rank) + this rank's
        RNG states. All ranks must call."""
        os.makedirs(path, exist_ok=True)
        self.engine.save_checkpoint(path)
        rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
               "cuda": torch.cuda.get_rng_state_all() if self.cuda else None}
        torch.save(rng, os.path.join(path, f"rng_rank{self.rank}.pt"))
        if self.rank == 0:  # the layout the shards are in, which a resume must build the same
            with open(os.path.join(path, LAYOUT_FILE), "w") as f:
                json.dump({"zero_stage": self.engine.zero_optimization_stage(), "world_size": self.world_size}, f)
        torch.distributed.barrier()
        return path

    def load_checkpoint(self, path: str) -> str:
        if not os.path.isfile(os.path.join(path, "latest")):
            raise FileNotFoundError(f"load_checkpoint: no DeepSpeed checkpoint ('latest' file) in {path}")
        stage = self._saved_stage(path)
        if stage != self.engine.zero_optimization_stage():
            # written in another ZeRO layout (before one rank ran ZeRO-1/2 as stage 0): rebuild the
            # engine in that layout, since DeepSpeed reads optimizer shards only in the one they have
            self.engine = self.optimizer = self.scheduler = self.policy = None
            self.named_params = []
            gc.collect()
            self._build_engine(_with_stage(self.ds_overrides, stage))
        loaded, _ = self.engine.load_checkpoint(path, load_optimizer_states=True, load_lr_scheduler_states=True)
        if loaded is None:
            raise RuntimeError(f"load_checkpoint: DeepSpeed could not load {path}")
        rng = torch.load(os.path.join(path, f"rng_rank{self.rank}.pt"), weights_only=False)
        torch.set_rng_state(rng["torch"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        if self.cuda and rng["cuda"] is not None:
            torch.cuda.set_rng_state_all(rng["cuda"])
        return loaded

    def _saved_stage(self, path: str) -> int:
        """The ZeRO stage the checkpoint at ``path`` was written with: its layout file, or for a
        checkpoint older than that file, the configured ``learner.zero_stage`` (then always used)."""
        try:
            with open(os.path.join(path, LAYOUT_FILE)) as f:
                return int(json.load(f)["zero_stage"])
        except FileNotFoundError:
            return int(self.cfg.learner.zero_stage)

    def export_hf(self, path: str) -> Optional[str]:
        """``save_pretrained`` folder (safetensors, ``model.dtype``) + the source's tokenizer files,
        loadable by transformers and vLLM as is. ZeRO-3: gathered bucket by bucket. All ranks call."""
        sd = self.hf_state_dict()
        if self.rank != 0:
            torch.distributed.barrier()
            return None
        self.policy.lm.save_pretrained(path, state_dict=sd, safe_serialization=True)
        for f in os.listdir(self.model_path):
            src = os.path.join(self.model_path, f)
            if os.path.isfile(src) and f != "config.json" and not f.endswith(_WEIGHT_FILES):
                shutil.copy2(src, os.path.join(path, f))
        torch.distributed.barrier()
        return path

    def shutdown(self) -> None:
        self.close_weight_sync()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _remote():
    import ray
    return ray.remote(LearnerWorker)


LearnerActor = _remote()
