"""The ``vllm`` backend: one vLLM engine (the CPU build here, the CUDA build on GPU clusters).

Only engine calls live here. Prompts go in as token ids (``TokensPrompt``), so the engine sees
exactly the ids the data loader produced. ``logprobs_mode="processed_logprobs"`` with
``logprobs=0`` returns the sampled token's log-prob under the temperature/top-p distribution it
was drawn from (see ``actors.backends.base``). Weight updates run inside the engine's workers
through ``actors.backends.vllm_worker_ext`` (``worker_extension_cls``), without restarting the engine.
Tensor parallelism uses vLLM's own executor; with ``tensor_parallel_size > 1`` it is the Ray
executor, which places its workers in the placement group the actor was scheduled into.

CPU build, per-request seeds: vLLM 0.32 rewinds a seeded request's ``torch.Generator`` with
``set_offset`` whenever it discards the token sampled after a *partial* (chunked) prefill
(``GPUModelRunner._bookkeeping_sync``); a CPU generator (mt19937) has no offset, so the worker dies
with "CPU Generator does not use offset" as soon as one step's prompts exceed
``max_num_batched_tokens``. On CPU the engine therefore runs without chunked prefill and with a
token budget of at least one whole sequence: a prefill is always scheduled whole, nothing is ever
discarded, and seeds and sampled-token log-probs stay as they are. CUDA generators support
offsets, so GPU engines keep vLLM's chunked prefill.

Engine core placement (``generator.engine_core``): vLLM runs its scheduler and model executor
("engine core") in a child process by default, so that on a GPU the next step is scheduled while
the current one runs. On CPU the forward pass and the scheduler compete for the same cores and the
process hop only adds IPC per step and ~12 s of start-up, so ``auto`` runs the core in-process
there (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) and in its own process on GPUs.

Detokenisation: the actor decodes every response once itself (``actors.generator``), so the
engine's incremental detokeniser is switched off unless stop *strings* need it.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Sequence, Tuple

from actors.backends.base import Completion, Delta, ReceivingBackend, SamplingSpec, Stepping
from dispo_ray.sync.settings import SyncSettings

EXTENSION = "actors.backends.vllm_worker_ext.WeightSyncWorkerExtension"
CPU_MIN_BATCHED_TOKENS = 4096  # vLLM's own default budget on CPU


ENGINE_CORES = ("auto", "in_process", "separate_process")  # generator.engine_core's choices


def engine_in_process(setting: str, on_cpu: bool) -> bool:
    """``generator.engine_core``: in_process | separate_process | auto (in-process on CPU only)."""
    return setting == "in_process" or (setting == "auto" and on_cpu)


def cpu_scheduler_args(max_model_len: int) -> dict:
    """Engine arguments that keep every prefill whole on the CPU build (see the module docstring)."""
    return {"enable_chunked_prefill": False,
            "max_num_batched_tokens": max(int(max_model_len), CPU_MIN_BATCHED_TOKENS)}


STREAM_INTERVAL = 1 << 30  # a streamed request reports its first token and its end, nothing between


def sampling_params(spec: SamplingSpec, n: int, delta: bool = False) -> Any:
    """vLLM's ``SamplingParams`` for ``spec`` (sampled tokens' processed log-probs). ``delta``
    (streaming): a request reports new tokens only on its first step and its last; building a
    ``RequestOutput`` for every running request on every step cost the CPU engine 1.7x in tokens/s
    (the tokens in between are read at a weight sync, :meth:`VLLMBackend.unsent`)."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    return SamplingParams(
        n=n, temperature=spec.temperature, top_p=spec.top_p, max_tokens=spec.max_new_tokens,
        stop=list(spec.stop) or None, include_stop_str_in_output=True, logprobs=0,
        skip_special_tokens=True, seed=spec.seed, detokenize=bool(spec.stop),
        **({"output_kind": RequestOutputKind.DELTA, "stream_interval": STREAM_INTERVAL} if delta else {}))


def token_logprobs(ids: Sequence[int], steps: Any) -> List[float]:
    """The sampled tokens' log-probs out of vLLM's per-position ``{token: Logprob}`` dicts."""
    lps = [float(step[tok].logprob) for tok, step in zip(ids, steps or [])]
    if len(lps) != len(ids):
        raise RuntimeError(f"vLLM returned {len(lps)} log-probs for {len(ids)} tokens")
    return lps


class VLLMBackend(ReceivingBackend, Stepping):
    """The weight-sync calls go to every engine worker (``collective_rpc``), each a rank of its own."""

    def __init__(self, model_path: str, gen_cfg: Any, dtype: str, max_model_len: int):
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(gen_cfg.kv_cache_gib))
        os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "0")
        from vllm.platforms import current_platform

        # read by vLLM when the engine is built, so it must be set before LLM(...)
        in_process = engine_in_process(str(gen_cfg.engine_core), current_platform.is_cpu())
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if in_process else "1"
        from vllm import LLM

        from actors.backends.vllm_worker_ext import CPU_PLAIN_LOAD_FORMAT

        tp = int(gen_cfg.tensor_parallel_size)
        # CPU: keep linear weights plain so a sync is a cheap in-place load (actors.backends.vllm_worker_ext)
        cpu_plain = current_platform.is_cpu() and not bool(gen_cfg.cpu_packed_weights)
        scheduler = cpu_scheduler_args(max_model_len) if current_platform.is_cpu() else {}
        self.weight_update = "not connected"  # how a sync loads: load_weights | reload_weights
        self.sync_ranks = tp  # every TP worker is a rank of the weight-sync group
        self.llm = LLM(
            model=model_path, tokenizer=model_path, dtype=dtype, max_model_len=max_model_len,
            seed=int(gen_cfg.seed), enforce_eager=bool(gen_cfg.enforce_eager),
            tensor_parallel_size=tp, gpu_memory_utilization=float(gen_cfg.gpu_memory_utilization),
            distributed_executor_backend="ray" if tp > 1 else None,
            logprobs_mode="processed_logprobs", worker_extension_cls=EXTENSION,
            load_format=CPU_PLAIN_LOAD_FORMAT if cpu_plain else "auto",
            disable_log_stats=True, **scheduler)
        self.tokenizer = self.llm.get_tokenizer()
        # what vLLM really built, reported in the actor's load() (InprocClient = no process hop)
        client = type(self.llm.llm_engine.engine_core).__name__
        self.engine_core = "in_process" if client == "InprocClient" else f"separate_process ({client})"

    def generate(self, prompts: Sequence[List[int]], n: int, spec: SamplingSpec) -> List[List[Completion]]:
        params = sampling_params(spec, n)
        outs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
        result = []
        for out in outs:
            group = []
            for c in sorted(out.outputs, key=lambda c: c.index):
                ids = list(c.token_ids)
                group.append(Completion(ids, token_logprobs(ids, c.logprobs), "length" if c.finish_reason == "length" else "stop"))
            result.append(group)
        return result

    # --- the engine-level calls streaming drives (vLLM's LLMEngine: add_request / step / abort_request)
    def add(self, key: str, prompt_token_ids: List[int], spec: SamplingSpec) -> None:
        self.llm.llm_engine.add_request(key, {"prompt_token_ids": list(prompt_token_ids)}, sampling_params(spec, 1, delta=True))

    def step(self) -> List[Delta]:
        out = []
        for r in self.llm.llm_engine.step():
            c = r.outputs[0]
            ids = list(c.token_ids)
            reason = ("length" if c.finish_reason == "length" else "stop") if r.finished else ""
            out.append(Delta(r.request_id, ids, token_logprobs(ids, c.logprobs), bool(r.finished), reason))
        return out

    def abort(self, keys: List[str]) -> None:
        if keys:
            self.llm.llm_engine.abort_request(list(keys))

    def has_unfinished(self) -> bool:
        return bool(self.llm.llm_engine.has_unfinished_requests())

    def unsent(self, keys: List[str]) -> Dict[str, Tuple[List[int], List[float]]]:
        """The tokens (and log-probs) each running request sampled since it last reported, read
        from vLLM 0.32's output processor (``request_states``: the detokenizer's token ids past
        ``sent_tokens_offset``, the logprobs processor's entries for them)."""
        processor = self.llm.llm_engine.output_processor
        out = {}
        for key in keys:
            for rid in processor.external_req_ids.get(key, []):
                state = processor.request_states.get(rid)
                if state is None:
                    continue
                ids = list(state.detokenizer.output_token_ids[state.sent_tokens_offset:])
                steps = state.logprobs_processor.logprobs[-len(ids):] if ids else []
                out[key] = (ids, token_logprobs(ids, steps))
        return out

    # --- weights -------------------------------------------------------------------------------
    def init_weight_sync(self, settings: SyncSettings, rank: int) -> List[int]:
        joined = self.llm.collective_rpc("dispo_init_weight_sync", args=(settings.to_wire(), rank))
        self.weight_update = "load_weights" if all(in_place for _, in_place in joined) else "reload_weights"
        return [r for r, _ in joined]

    def receive_weights(self) -> int:
        versions = set(self.llm.collective_rpc("dispo_receive_weights"))
        if len(versions) != 1:
            raise RuntimeError(f"tensor-parallel workers received different versions {sorted(versions)}")
        # Cached prefixes were computed with the old weights.
        self.llm.reset_prefix_cache()
        return versions.pop()

    def close_weight_sync(self) -> None:
        self.llm.collective_rpc("dispo_close_weight_sync")

    def param_sums(self) -> dict:
        return self.llm.collective_rpc("dispo_param_sums")[0]

    def shutdown(self) -> None:
        engine = getattr(self.llm, "llm_engine", None)
        if engine is not None and hasattr(engine, "shutdown"):
            engine.shutdown()
