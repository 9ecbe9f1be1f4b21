"""Methods vLLM mixes into each of its workers (``worker_extension_cls``), reached from the
generator actor through ``LLM.collective_rpc(name, args=...)``, and the CPU model loader that
keeps weights updatable in place.

Every worker (one per tensor-parallel rank) is its own rank of the weight-sync group:
``rank_offset + worker.rank``. A broadcast is loaded into the running model in place, in one of
two ways, chosen once per engine by :func:`loads_in_place`:

* ``model.load_weights(stream)``: each parameter's own weight loader copies (and, under TP,
  shards) the received tensor into the live parameter. For unquantized models: always on GPU,
  and on CPU when the engine was loaded with :class:`PlainCpuWeightsLoader` (``load_format="dispo_cpu_plain"``, the
  default, see ``generator.cpu_packed_weights``): vLLM's CPU build otherwise repacks every linear
  weight into a oneDNN GEMM handle after loading and drops the parameter (size 0), so there is
  nothing to copy into.
* ``reload_weights(weights_iterator=stream)``: vLLM's layerwise in-place reload, which puts each
  layer back in checkpoint format, loads it and re-runs its post-load processing (the repack).
  Correct for any layout, but ~10 ms of Python per sync even for a 2-layer model (~6x the plain
  load); used for CPU engines with packed weights and for models with quantized (or other
  post-processed, e.g. fused-MoE) layers, whose kernel format is not the checkpoint's.

The LM head on CPU is packed either way (``UnquantizedEmbeddingMethod`` keeps its weight but
computes from a GEMM handle), so after a CPU load :func:`_refresh_lm_head` re-runs its packing;
with tied embeddings it first copies the new embedding into the head (``lm_head.weight`` is
received but not loaded, vLLM's model has no such parameter of its own).
"""
from __future__ import annotations

from typing import Any, Dict, Tuple

from vllm.model_executor.model_loader import register_model_loader
from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

CPU_PLAIN_LOAD_FORMAT = "dispo_cpu_plain"


@register_model_loader(CPU_PLAIN_LOAD_FORMAT)
class PlainCpuWeightsLoader(DefaultModelLoader):
    """The default loader, but unquantized linear layers keep a plain weight on CPU (``F.linear``)
    instead of a oneDNN-packed handle, so later updates load in place. Same numerics (the
    tests compare log-probs with transformers); generation speed measured in bench_generator.

    Registered on import; vLLM imports this module in every worker before loading the model
    (it resolves ``worker_extension_cls`` first)."""

    def __init__(self, load_config: Any):
        import copy

        # read the checkpoint files exactly as the default ("auto") format does
        load_config = copy.copy(load_config)
        load_config.load_format = "auto"
        super().__init__(load_config)

    def load_weights(self, model: Any, model_config: Any) -> None:
        from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod

        for module in model.modules():
            if isinstance(module, LinearBase) and isinstance(module.quant_method, UnquantizedLinearMethod):
                # vLLM's own opt-out of the CPU GEMM dispatch (UnquantizedLinearMethod reads it)
                module._cpu_skip_gemm_dispatch = True
        super().load_weights(model, model_config)


def loads_in_place(model: Any) -> bool:
    """True when ``model.load_weights`` can update every weight of the running ``model``: every
    layer with a quant method is unquantized and still holds its weight in checkpoint layout."""
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod
    from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if method is None or isinstance(method, UnquantizedEmbeddingMethod):
            continue
        if not isinstance(method, UnquantizedLinearMethod) or module.weight.numel() == 0:
            return False  # quantized / fused, or packed and dropped by the CPU GEMM dispatch
    return True


class WeightSyncWorkerExtension:
    """Mixed into vLLM's Worker; names are prefixed ``dispo_`` to avoid clashing with its own."""

    def dispo_init_weight_sync(self, settings: Dict[str, Any], rank_offset: int) -> Tuple[int, bool]:
        """Join the group (``settings``: :meth:`SyncSettings.to_wire`, plain values for vLLM's RPC)
        as rank ``rank_offset + worker rank``; returns (that rank, whether it loads in place)."""
        from vllm.platforms import current_platform

        from actors.backends.base import WeightReceiver
        from dispo_ray.sync.settings import SyncSettings

        settings = SyncSettings.from_wire(settings)
        rank, backend = rank_offset + int(self.rank), settings.backend
        # backend: the driver's one decision (dispo_ray.infra.devices). On nccl the group binds to this
        # worker's device (vLLM's cuda:<visible index>) and runs on its own stream, so a stuck
        # broadcast never blocks the model runner's stream
        device = getattr(self, "device", None) if backend == "nccl" else None
        self.dispo_cpu = current_platform.is_cpu()
        self.dispo_in_place = loads_in_place(self.model_runner.get_model())
        self.dispo_receiver = WeightReceiver(settings, rank, device=device)
        return rank, self.dispo_in_place

    def dispo_receive_weights(self) -> int:
        receiver = getattr(self, "dispo_receiver", None)
        if receiver is None:
            raise RuntimeError("dispo_receive_weights before dispo_init_weight_sync")
        tied = bool(getattr(self.model_config.hf_config, "tie_word_embeddings", False))
        model = self.model_runner.get_model()
        if self.dispo_in_place:
            load = model.load_weights
        else:
            load = lambda it: self.reload_weights(weights_iterator=it)  # noqa: E731
        # the layerwise reload holds a layer's tensors until the layer is complete: it needs copies
        # of those that arrive through the receiver's one persistent staging buffer
        version = receiver.receive(load, ["lm_head.weight"] if tied else [], owned=not self.dispo_in_place)
        # the layerwise reload re-processes an untied head itself; every other CPU case repacks here
        if self.dispo_cpu and (tied or self.dispo_in_place):
            _refresh_lm_head(model, tied)
        return version

    def dispo_close_weight_sync(self) -> None:
        receiver = getattr(self, "dispo_receiver", None)
        if receiver is not None:
            receiver.close()
            self.dispo_receiver = None

    def dispo_param_sums(self) -> dict:
        """Sum of every parameter as the running model holds it (debugging: did an update land?)."""
        return {n: float(p.detach().float().sum()) for n, p in self.model_runner.get_model().named_parameters()}


def _refresh_lm_head(model: Any, tied: bool) -> None:
    """Make the CPU build's packed LM head compute with the current weight (after a load)."""
    import torch

    head, inner = getattr(model, "lm_head", None), getattr(model, "model", None)
    embed = getattr(inner, "embed_tokens", None)
    if head is None or not hasattr(head, "quant_method") or (tied and embed is None):
        raise RuntimeError("cannot find lm_head (and model.embed_tokens if tied) to refresh")
    with torch.no_grad():
        if tied and head.weight.data_ptr() != embed.weight.data_ptr():
            head.weight.data.copy_(embed.weight.data)
        head.quant_method.process_weights_after_loading(head)
