"""The ``hf`` backend: transformers ``generate`` (KV cache) on CPU or one GPU.

For machines without vLLM, and as the numerics reference of the vLLM backend. Prompts are
left-padded into one batch (``num_return_sequences = n`` keeps each prompt's samples adjacent and
in order); the processed scores ``generate`` returns (after its temperature and top-p warpers; raw
logits when greedy) give each sampled token's log-prob, the same convention as the vLLM backend.
A sample ends at its first eos (kept, as vLLM keeps it) or at the token that completes a stop
string; otherwise it ran to ``max_new_tokens`` ("length").
"""
from __future__ import annotations

from typing import Any, Iterable, List, Sequence, Tuple

import torch

from actors.backends.base import Completion, SamplingSpec, WeightReceiver

MAX_ROWS = 512  # prompts x n per generate call, to bound memory


class HFBackend:
    sync_ranks = 1

    def __init__(self, model_path: str, gen_cfg: Any, dtype: str, max_model_len: int):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        use_cuda = float(gen_cfg.num_gpus_per_actor) > 0 and torch.cuda.is_available()
        self.device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype)).to(self.device)
        self.model.eval()
        self.max_model_len = max_model_len
        torch.manual_seed(int(gen_cfg.seed))
        self.receiver = None
        self.weight_update = "copy_"  # how a sync loads: into the module's own tensors

    @torch.no_grad()
    def generate(self, prompts: Sequence[List[int]], n: int, spec: SamplingSpec) -> List[List[Completion]]:
        if spec.seed is not None:  # per-request seed: the same request draws the same samples
            torch.manual_seed(spec.seed)
        per_call = max(1, MAX_ROWS // n)
        out: List[List[Completion]] = []
        for s in range(0, len(prompts), per_call):
            out.extend(self._generate_batch(prompts[s:s + per_call], n, spec))
        return out

    def _generate_batch(self, prompts: Sequence[List[int]], n: int, spec: SamplingSpec) -> List[List[Completion]]:
        tok = self.tokenizer
        P = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), P), tok.pad_token_id, dtype=torch.long)
        att = torch.zeros((len(prompts), P), dtype=torch.long)
        for b, p in enumerate(prompts):
            ids[b, P - len(p):] = torch.tensor(p, dtype=torch.long)
            att[b, P - len(p):] = 1
        greedy = spec.temperature == 0
        kwargs = dict(do_sample=not greedy, num_return_sequences=n, max_new_tokens=spec.max_new_tokens,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      output_scores=True, return_dict_in_generate=True, top_k=0)
        if not greedy:
            kwargs.update(temperature=spec.temperature, top_p=spec.top_p)
        if spec.stop:
            kwargs.update(stop_strings=list(spec.stop), tokenizer=tok)
        res = self.model.generate(input_ids=ids.to(self.device), attention_mask=att.to(self.device), **kwargs)
        gen = res.sequences[:, P:].cpu()
        # [rows, steps]: log-prob of the token drawn at each step under the processed scores
        steps = torch.stack([s.float().log_softmax(-1) for s in res.scores], dim=1).cpu()
        lp = steps.gather(-1, gen[:, :steps.shape[1], None]).squeeze(-1)
        result = []
        for b in range(len(prompts)):
            group = []
            for k in range(n):
                row = b * n + k
                group.append(self._trim(gen[row].tolist(), lp[row].tolist(), spec))
            result.append(group)
        return result

    def _trim(self, ids: List[int], lps: List[float], spec: SamplingSpec) -> Completion:
        """Cut a padded row at its end: first eos (inclusive), else the token completing a stop
        string, else the row ran to max_new_tokens."""
        eos = self.tokenizer.eos_token_id
        end = ids.index(eos) + 1 if eos in ids else None
        if spec.stop:
            limit = end or len(ids)
            for t in range(1, limit + 1):
                text = self.tokenizer.decode(ids[:t], skip_special_tokens=True)
                if any(s in text for s in spec.stop):
                    end = t
                    break
        if end is not None:
            return Completion(ids[:end], lps[:end], "stop")
        if len(ids) < spec.max_new_tokens:
            raise RuntimeError(f"hf backend: sample stopped after {len(ids)} tokens without eos or stop string")
        return Completion(ids, lps, "length")

    # --- weights -------------------------------------------------------------------------------
    def init_weight_sync(self, host: str, port: int, rank: int, world_size: int, manifest: Sequence[Any],
                         bucket_bytes: int, timeout_s: float, backend: str) -> List[int]:
        self.receiver = WeightReceiver(backend, host, port, rank, world_size, manifest, bucket_bytes,
                                       timeout_s, device=self.device if backend == "nccl" else None)
        return [rank]

    def receive_weights(self) -> int:
        if self.receiver is None:
            raise RuntimeError("receive_weights before init_weight_sync")
        state = self.model.state_dict()  # includes a tied lm_head.weight, which aliases the embedding

        @torch.no_grad()
        def load(stream: Iterable[Tuple[str, torch.Tensor]]) -> None:
            for name, t in stream:
                if name not in state:
                    raise KeyError(f"weight sync: parameter {name!r} is not in the hf model")
                state[name].copy_(t)

        return self.receiver.receive(load)

    def close_weight_sync(self) -> None:
        if self.receiver is not None:
            self.receiver.close()
            self.receiver = None

    def param_sums(self) -> dict:
        return {n: float(p.detach().float().sum()) for n, p in self.model.named_parameters()}

    def shutdown(self) -> None:
        pass
