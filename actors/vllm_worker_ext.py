"""Methods vLLM mixes into each of its workers (``worker_extension_cls``), reached from the
generator actor through ``LLM.collective_rpc(name, args=...)``.

Every worker (one per tensor-parallel rank) is its own rank of the weight-sync group:
``rank_offset + worker.rank``. A broadcast is loaded into the running model in place:

* CPU build: the worker's ``reload_weights(weights_iterator=...)`` -- the CPU backend repacks
  linear weights after loading, so a plain ``model.load_weights`` would hit the repacked
  (size-0) parameters; the in-place reload re-runs that processing.
* GPU build: ``model.load_weights(...)`` (each TP rank keeps its own shard of every tensor).

With tied embeddings ``lm_head.weight`` is received but not loaded (vLLM's model has no such
parameter of its own). On CPU that is not enough: at start-up the CPU build packs the LM head's
weight into a GEMM handle (``dispatch_cpu_unquantized_gemm``), and an in-place reload only
re-processes the layers it loaded (the embedding), so the tied head would keep computing logits
from the *old* embedding. :func:`_refresh_tied_lm_head` copies the new embedding into the head
and re-runs its post-load processing.
"""
from __future__ import annotations

from typing import Any, List, Tuple


class WeightSyncWorkerExtension:
    """Mixed into vLLM's Worker; names are prefixed ``dispo_`` to avoid clashing with its own."""

    def dispo_init_weight_sync(self, host: str, port: int, rank_offset: int, world_size: int,
                               manifest: List[Tuple[str, Tuple[int, ...], str]], bucket_bytes: int,
                               timeout_s: float, backend: str = "gloo") -> int:
        from actors.backends.base import WeightReceiver

        rank = rank_offset + int(self.rank)
        device = getattr(self, "device", None) if backend == "nccl" else None
        self.dispo_receiver = WeightReceiver(backend, host, port, rank, world_size, manifest,
                                             bucket_bytes, timeout_s, device=device)
        return rank

    def dispo_receive_weights(self) -> int:
        from vllm.platforms import current_platform

        receiver = getattr(self, "dispo_receiver", None)
        if receiver is None:
            raise RuntimeError("dispo_receive_weights before dispo_init_weight_sync")
        hf_config = self.model_config.hf_config
        skip = ["lm_head.weight"] if getattr(hf_config, "tie_word_embeddings", False) else []
        model = self.model_runner.get_model()
        if current_platform.is_cpu():
            load = lambda it: self.reload_weights(weights_iterator=it)  # noqa: E731
        else:
            load = lambda it: model.load_weights(it)  # noqa: E731
        version = receiver.receive(load, skip)
        if skip and current_platform.is_cpu():
            _refresh_tied_lm_head(model)
        return version

    def dispo_close_weight_sync(self) -> None:
        receiver = getattr(self, "dispo_receiver", None)
        if receiver is not None:
            receiver.close()
            self.dispo_receiver = None

    def dispo_param_sums(self) -> dict:
        """Sum of every parameter as the running model holds it (debugging: did an update land?)."""
        return {n: float(p.detach().float().sum()) for n, p in self.model_runner.get_model().named_parameters()}


def _refresh_tied_lm_head(model: Any) -> None:
    """Make a tied LM head compute with the current embedding (CPU build, after a reload)."""
    import torch

    head, inner = getattr(model, "lm_head", None), getattr(model, "model", None)
    embed = getattr(inner, "embed_tokens", None)
    if head is None or embed is None or not hasattr(head, "quant_method"):
        raise RuntimeError("tied embeddings: cannot find lm_head / model.embed_tokens to refresh")
    with torch.no_grad():
        if head.weight.data_ptr() != embed.weight.data_ptr():
            head.weight.data.copy_(embed.weight.data)
        head.quant_method.process_weights_after_loading(head)
