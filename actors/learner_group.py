"""The learner group: ``learner.num_actors`` :class:`~actors.learner.LearnerActor` ranks forming
one DeepSpeed data-parallel world, driven from the driver process.

Batch split for ``train_step`` (B samples, M = ``learner.mini_batches``, W ranks):

    mini-batch m        = rows [m*B/M, (m+1)*B/M)          (one optimizer step each, in order)
    rank r's share of m = rows r, r+W, r+2W, ... of mini-batch m  (strided: balances lengths)
    micro-batches       = that share in chunks of ``learner.micro_batch_size`` (grad accumulation)

With ``learner.max_tokens_per_micro_batch > 0`` the ranks' shares and their micro-batches come from
:func:`dispo_ray.algorithm.packing.plan_packed_micro_batches` instead (balanced by tokens, packed
into token budgets, the same micro-batch count on every rank).

B must be divisible by M*W, so every rank runs the same number of micro-batches (ZeRO's
collectives need that). The token count (and non-empty sequence count) of each whole mini-batch
is computed here and passed to every rank, which makes the sum of micro-batch losses the exact
full-batch loss (see :mod:`actors.learner` for the gradient scaling).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch

from actors.learner import LearnerActor
from dispo_ray.algorithm.losses import merge_raw_metrics, summarize_metrics
from dispo_ray.algorithm.packing import packed_shards
from dispo_ray.infra.placement import pin, wait_for_node_resource

_BATCH_KEYS = ("input_ids", "attention_mask", "response_mask", "old_log_probs", "advantages", "correct")


class LearnerGroup:
    """Driver-side handle of the learner world. All methods block unless they say otherwise."""

    def __init__(self, cfg: Any, model_path: str,
                 ds_config_overrides: Optional[Dict[str, Any]] = None, start_timeout_s: float = 600.0):
        """``model_path``: the HF folder every rank loads. Which folder that is gets decided in one
        place, :func:`dispo_ray.tiny.warmstart.warm_started_model_dir` (the driver's choice)."""
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        l = cfg.learner
        if not model_path:
            raise ValueError("LearnerGroup: model_path is required (an HF folder; see warm_started_model_dir)")
        self.cfg, self.model_path, self.world_size = cfg, model_path, l.num_actors
        self.pg = None
        wait_for_node_resource(l.node_resource, "learner.node_resource", start_timeout_s)
        opts: List[Dict[str, Any]] = [{"num_cpus": l.num_cpus_per_actor, "num_gpus": l.num_gpus_per_actor,
                                       "resources": pin(l.node_resource)} for _ in range(self.world_size)]
        if l.num_gpus_per_actor > 0:  # one bundle per GPU rank, packed onto as few nodes as possible
            bundle = {"CPU": l.num_cpus_per_actor, "GPU": l.num_gpus_per_actor, **pin(l.node_resource)}
            self.pg = placement_group([bundle] * self.world_size, strategy="PACK")
            ray.get(self.pg.ready(), timeout=start_timeout_s)
            for i, o in enumerate(opts):
                o["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                    placement_group=self.pg, placement_group_bundle_index=i)
        self.actors = [LearnerActor.options(**opts[r]).remote(cfg, model_path, r, self.world_size,
                                                                ds_config_overrides)
                       for r in range(self.world_size)]
        addr, port = ray.get(self.actors[0].endpoint.remote())  # rank 0 picks the rendezvous
        self.info = ray.get([a.setup.remote(addr, port) for a in self.actors])
        self.master = (addr, port)

    # ------------------------------------------------------------------ helpers
    def _all(self, method: str, *args, per_rank=None):
        """Call ``method`` on every rank; fail as soon as one rank fails (the others may be waiting
        in a collective for it), else return the results in rank order."""
        import ray
        refs = [getattr(a, method).remote(*(per_rank[r] if per_rank else args)) for r, a in enumerate(self.actors)]
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            try:
                ray.get(done)
            except Exception:
                self._abandoned = pending  # read in kill(): an error nobody reads is printed at exit
                raise
        return ray.get(refs)

    @property
    def num_params(self) -> int:
        """Parameters of the policy (from rank 0's weight manifest), e.g. to size a checkpoint."""
        if getattr(self, "_num_params", None) is None:
            import math
            self._num_params = sum(math.prod(spec.shape) for spec in self.weight_manifest())
        return self._num_params

    @staticmethod
    def _check_batch(batch: Dict[str, torch.Tensor]) -> int:
        missing = [k for k in _BATCH_KEYS if k not in batch]
        if missing:
            raise ValueError(f"learner batch is missing {missing}; build it with dispo_ray.rollout.samples.collate")
        return int(batch["input_ids"].shape[0])

    # ------------------------------------------------------------------ training
    def train_step(self, batch: Dict[str, torch.Tensor],
                   windows: Optional[Dict[str, float]] = None) -> Dict[str, float]:
        """``mini_batches`` optimizer steps on a collated batch; returns merged metrics. ``windows``:
        DISPO's clip windows in force for this batch (the driver's; None: the configured ones),
        sent to every rank with its shards (:mod:`dispo_ray.algorithm.windows`)."""
        from dispo_ray.algorithm.windows import resolve
        B, M, W = self._check_batch(batch), self.cfg.learner.mini_batches, self.world_size
        windows = resolve(self.cfg.algorithm, windows)  # an unknown key fails here, in the driver
        if B % (M * W):
            raise ValueError(f"train_step: batch of {B} samples is not divisible by learner.mini_batches"
                             f" * learner.num_actors = {M} * {W}")
        batch = {k: batch[k] for k in _BATCH_KEYS}
        budget = self.cfg.learner.max_tokens_per_micro_batch
        per_rank: List[List[Any]] = [[[], [], [], windows] + ([[]] if budget else []) for _ in range(W)]
        size = B // M
        for m in range(M):
            mini = {k: v[m * size:(m + 1) * size] for k, v in batch.items()}
            mask = mini["response_mask"]
            tokens, seqs = float(mask.sum()), float((mask.sum(-1) > 0).sum())
            packed = packed_shards(mini, budget, W) if budget else None
            for r in range(W):
                if packed is None:
                    per_rank[r][0].append({k: v[r::W].contiguous() for k, v in mini.items()})
                else:  # this rank's rows in micro-batch order, and its micro-batches
                    per_rank[r][0].append(packed[r][0])
                    per_rank[r][4].append(packed[r][1])
                per_rank[r][1].append(tokens)
                per_rank[r][2].append(seqs)
        outs = self._all("train_step", per_rank=per_rank)
        return self._merge(outs, M)

    @staticmethod
    def _merge(outs: List[Dict[str, Any]], M: int) -> Dict[str, float]:
        metrics = summarize_metrics(merge_raw_metrics(*[o["raw"] for o in outs]))
        # each rank's loss is its share of the full mini-batch loss: ranks add, mini-batches average
        metrics["actor/loss"] = sum(sum(o["loss"]) for o in outs) / M
        metrics["actor/grad_norm"] = sum(outs[0]["grad_norm"]) / M  # global norm, same on all ranks
        metrics["actor/lr"] = outs[0]["lr"][-1]
        n = sum(o["mismatch_n"] for o in outs)
        metrics["mismatch/abs_logp_diff"] = sum(o["mismatch_abs_sum"] for o in outs) / max(n, 1.0)
        metrics["mismatch/kl"] = sum(o["mismatch_kl_sum"] for o in outs) / max(n, 1.0)
        return metrics

    def compute_log_probs(self, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        """Learner log-probs ``[B, T]`` (0 off the response), split evenly over the ranks."""
        B, W = self._check_batch(batch), self.world_size
        pad = (-B) % W  # every rank must run the same number of forwards (ZeRO-3 gathers)
        keys = ("input_ids", "attention_mask", "response_mask")
        full = {k: torch.cat([batch[k], batch[k][-1:].expand(pad, -1)]) if pad else batch[k] for k in keys}
        per = (B + pad) // W
        parts = self._all("compute_log_probs", per_rank=[({k: v[r * per:(r + 1) * per] for k, v in full.items()},)
                                                         for r in range(W)])
        T = batch["input_ids"].shape[1]
        return torch.cat([torch.nn.functional.pad(p, (0, T - p.shape[1])) for p in parts])[:B]

    # ------------------------------------------------------------------ state
    def save_checkpoint(self, path: str) -> str:
        self._all("save_checkpoint", path)
        return path

    def load_checkpoint(self, path: str) -> str:
        return self._all("load_checkpoint", path)[0]

    def export_hf(self, path: str) -> str:
        return self._all("export_hf", path)[0]

    def hf_state_dict(self) -> Dict[str, torch.Tensor]:
        return self._all("hf_state_dict")[0]

    # ------------------------------------------------------------------ weight sync
    def weight_manifest(self):
        import ray
        return ray.get(self.actors[0].manifest.remote())

    def weight_sync_endpoint(self) -> tuple:
        """(host, free port) on rank 0's node for the weight-sync group's store."""
        import ray
        return ray.get(self.actors[0].endpoint.remote())

    def init_weight_sync(self, settings: Any, wait: bool = True):
        """Rank 0 joins the sync group (:class:`dispo_ray.sync.settings.SyncSettings`; every rank keeps
        its backend for the bucket plan). Blocks until all generators join: pass ``wait=False`` to get
        rank 0's ObjectRef and let the generators join concurrently."""
        import ray
        refs = [a.init_weight_sync.remote(settings) for a in self.actors]
        if not wait:
            return refs[0]  # the other ranks only record the backend (answered in call order)
        return ray.get(refs)[0]

    def close_weight_sync(self) -> None:
        import ray
        ray.get(self.actors[0].close_weight_sync.remote())

    def broadcast_weights(self, version: int, wait: bool = True):
        """All ranks gather/send bucket by bucket; returns rank 0's stats (or the refs if not wait)."""
        import ray
        refs = [a.broadcast_weights.remote(version) for a in self.actors]
        return ray.get(refs)[0] if wait else refs

    def kill(self) -> None:
        """Stop every rank now (a rank died: the others may be stuck in a collective)."""
        import ray
        for a in self.actors:
            ray.kill(a, no_restart=True)
        for ref in getattr(self, "_abandoned", []):  # the other ranks' calls end with the kill
            try:
                ray.get(ref, timeout=30)
            except Exception:  # noqa: BLE001 - expected: their peer or they themselves are gone
                pass
        if self.pg is not None:
            from ray.util.placement_group import remove_placement_group
            remove_placement_group(self.pg)
            self.pg = None
        self.actors = []

    def shutdown(self) -> None:
        import ray
        try:
            ray.get([a.shutdown.remote() for a in self.actors], timeout=60)
        except Exception:  # noqa: BLE001 - best effort before the kill
            pass
        for a in self.actors:
            ray.kill(a)
        if self.pg is not None:
            from ray.util.placement_group import remove_placement_group
            remove_placement_group(self.pg)
        self.actors = []
