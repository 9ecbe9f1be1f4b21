"""The learner's side of the weight sync, mixed into :class:`actors.learner.LearnerWorker`:
the manifest, the bucket-by-bucket walk over the (ZeRO-3: gathered) parameters, and learner rank 0
as rank 0 (sender, store host) of the weight-sync group.

Contract: every learner rank calls :meth:`broadcast_weights` (ZeRO-3 gathers are collectives of
the DeepSpeed world); only rank 0 sends. The driver calls it only once every receiver is ready
(:class:`dispo_ray.sync.transport.SyncGate`, held by :class:`dispo_ray.sync.coordinator.WeightSync`), so the other ranks' gathers never wait on a sender
that waits on a busy generator; the world's timeout exceeds the sync's
(:func:`dispo_ray.infra.devices.learner_world_timeout_s`).
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch

from dispo_ray.sync.settings import SyncSettings


class LearnerSyncMixin:
    """Needs ``cfg``, ``rank``, ``named_params``, ``zero3``, ``sync_group`` and ``_sync_backend``."""

    def _gathered(self, names: Sequence[str]):
        """Context in which the named parameters are whole on every rank (all ranks must enter)."""
        import deepspeed
        lookup = dict(self.named_params)
        return deepspeed.zero.GatheredParameters([lookup[n] for n in names], modifier_rank=None,
                                                 enabled=self.zero3)

    def manifest(self):
        """HF-named ParamSpecs in the dtype the generators hold (``model.dtype``)."""
        from dispo_ray.sync.protocol import ParamSpec
        dtype = self.cfg.model.dtype
        return [ParamSpec(n, tuple(getattr(p, "ds_shape", p.shape)), dtype) for n, p in self.named_params]

    def _iter_buckets(self, bucket_bytes: int):
        """Yield (bucket specs, whole tensors in manifest dtype) one bucket at a time; under ZeRO-3
        only that bucket is gathered. Rank 0 gets the tensors, other ranks None (all must iterate)."""
        from dispo_ray.sync.protocol import direct_bytes_for, plan_buckets
        lookup = dict(self.named_params)
        # the same plan as the SyncSender's and every receiver's (they agree on the backend)
        for bucket in plan_buckets(self.manifest(), bucket_bytes, direct_bytes_for(self.sync_backend)):
            with self._gathered([s.name for s in bucket]):
                yield bucket, ([lookup[s.name].data.to(s.torch_dtype) for s in bucket] if self.rank == 0 else None)

    # ------------------------------------------------------------------ weight sync (sender side)
    def init_weight_sync(self, settings: SyncSettings) -> bool:
        """Rank 0 joins the weight-sync group as its rank 0 (store master) with the coordinator's
        ``settings.backend`` (every rank keeps it: it decides the bucket plan); other ranks join nothing."""
        self._sync_backend = settings.backend
        if self.rank != 0:
            return False
        from dispo_ray.sync.protocol import WeightSyncGroup
        device = torch.device("cuda", torch.cuda.current_device()) if self._sync_backend == "nccl" else None
        self.sync_group = WeightSyncGroup.for_settings(settings, 0, device=device)
        return True

    @property
    def sync_backend(self) -> str:
        return self._sync_backend

    def close_weight_sync(self) -> None:
        if self.sync_group is not None:
            self.sync_group.close()
            self.sync_group = None

    def broadcast_weights(self, version: int) -> Optional[Dict[str, float]]:
        """Every rank calls this; buckets are gathered one at a time (ZeRO-3) and rank 0 sends them.
        A send failure on rank 0 is raised only after the loop, so the other ranks never hang in a
        gather that rank 0 skipped."""
        from dispo_ray.sync.protocol import SyncSender
        bucket_bytes = self.cfg.learner.sync_bucket_mb << 20
        sender, error = None, None
        if self.rank == 0:
            if self.sync_group is None:
                raise RuntimeError("broadcast_weights: call init_weight_sync first")
            # ZeRO-1/2 parameters stay put during the sync, so unpacked ones may stay in flight;
            # ZeRO-3 re-partitions each gathered bucket as soon as send_bucket returns. The driver
            # starts us once every receiver is ready: waiting for them longer than a sync's
            # deadline means something is wrong.
            sender = SyncSender(self.sync_group, self.manifest(), bucket_bytes, stable=self.cfg.learner.zero_stage < 3,
                                ready_timeout_s=self.cfg.learner.sync_timeout_s)
            try:
                sender.begin(version)
            except Exception as e:  # noqa: BLE001 - re-raised below
                error = e
        for _, tensors in self._iter_buckets(bucket_bytes):
            if sender is not None and error is None:
                try:
                    sender.send_bucket(tensors)
                except Exception as e:  # noqa: BLE001
                    error = e
        if error is not None:
            raise error
        return sender.end() if sender is not None else None
