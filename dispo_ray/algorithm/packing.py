r"""Packed, token-budget micro-batches (``learner.max_tokens_per_micro_batch > 0``).

Plan (:func:`plan_packed_micro_batches`, run by the learner group on each whole mini-batch):

1. **Ranks, by tokens.** Sequences (prompt + response tokens) are dealt longest first to the rank
   holding the fewest tokens so far (LPT), so every rank gets about the same number of tokens.
2. **Micro-batches, by budget.** Each rank's sequences are packed first-fit-decreasing into
   micro-batches of at most ``budget`` tokens.
3. **Equal counts.** Every rank must run the same number of forward/backward passes (ZeRO's
   collectives pair them up). A rank with fewer micro-batches splits its largest micro-batch that
   holds >= 2 sequences in two; a rank with nothing left to split gets *empty* micro-batches
   (``[]``): the learner runs a 2-token dummy forward whose loss is multiplied by 0.

A sequence longer than the budget is an error (:func:`plan_packed_micro_batches` raises a one-line
``ValueError`` naming the key and the length); the config refuses a budget below
``data.max_prompt_length + generator.max_new_tokens`` before anything starts.

Pack (:func:`packed_forward`): the micro-batch's sequences are concatenated without padding into one
row ``[1, N]`` with ``position_ids`` restarting at 0 for each sequence and no attention mask. The
model confines attention to each sequence: transformers (5.x, ``masking_utils``) finds the
restarts (``find_packed_sequence_indices``) when the 2D mask is None and no cache is passed and
ANDs a block-diagonal mask into the causal one (sdpa, eager) -- only without a KV cache, so the
policy forward passes ``use_cache=False`` (a cache disables the detection); flash_attention_2 detects them
(``_is_packed_sequence``: batch 1, positions not one increasing run) and calls the varlen kernel
with ``cu_seqlens`` from the restarts. The per-token log-probs / entropy are scattered back to the
padded ``[b, T]`` layout, so the loss and every metric see exactly the tensors of the padded path.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Sequence, Tuple

import torch

BUDGET_KEY = "learner.max_tokens_per_micro_batch"


def plan_packed_micro_batches(lengths: Sequence[int], budget: int, num_ranks: int) -> List[List[List[int]]]:
    """Indices into ``lengths`` per rank, per micro-batch: ``plan[r][k]`` (``[]`` = empty micro-batch).
    Every rank has the same number of micro-batches; each non-empty one holds <= ``budget`` tokens."""
    if budget < 1 or num_ranks < 1:
        raise ValueError(f"plan_packed_micro_batches: budget={budget} and num_ranks={num_ranks} must be >= 1")
    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    if order and int(lengths[order[0]]) > budget:
        n = int(lengths[order[0]])
        raise ValueError(f"{BUDGET_KEY}={budget} is below a sequence of {n} tokens (prompt + response); "
                         f"set it to at least {n}")
    # 1. ranks by tokens (longest first to the lightest rank)
    shares: List[List[int]] = [[] for _ in range(num_ranks)]
    load = [0] * num_ranks
    for i in order:
        r = min(range(num_ranks), key=lambda j: (load[j], j))
        shares[r].append(i)
        load[r] += int(lengths[i])
    # 2. first-fit-decreasing per rank (shares are already longest first)
    plans: List[List[List[int]]] = []
    for share in shares:
        bins: List[List[int]] = []
        room: List[int] = []
        for i in share:
            n = int(lengths[i])
            k = next((k for k, free in enumerate(room) if free >= n), None)
            if k is None:
                bins.append([i])
                room.append(budget - n)
            else:
                bins[k].append(i)
                room[k] -= n
        plans.append(bins)
    # 3. equal counts: split the largest splittable micro-batch, else add an empty one
    target = max(len(p) for p in plans)
    for bins in plans:
        while len(bins) < target:
            splittable = [b for b in bins if len(b) >= 2]
            if not splittable:
                bins.append([])
                continue
            big = max(splittable, key=lambda b: sum(int(lengths[i]) for i in b))
            half = len(big) // 2
            bins.append(big[half:])
            del big[half:]
    return plans


def packed_shards(mini: Dict[str, torch.Tensor], budget: int,
                  num_ranks: int) -> List[Tuple[Dict[str, torch.Tensor], List[List[int]]]]:
    """A mini-batch (padded ``[B, T]`` / ``[B]`` tensors) -> per rank ``(shard, micro-batches)``: the
    rank's rows in micro-batch order and its micro-batches as row indices into that shard."""
    plan = plan_packed_micro_batches(mini["attention_mask"].sum(-1).long().tolist(), budget, num_ranks)
    out = []
    for bins in plan:
        idx = torch.as_tensor([i for b in bins for i in b], dtype=torch.long)
        ends = torch.tensor([len(b) for b in bins], dtype=torch.long).cumsum(0).tolist()
        out.append(({k: v.index_select(0, idx) for k, v in mini.items()},
                    [list(range(e - len(b), e)) for b, e in zip(bins, ends)]))
    return out


def select_rows(batch: Dict[str, torch.Tensor], rows: Sequence[int]) -> Dict[str, torch.Tensor]:
    """Rows ``rows`` of a padded batch (``[B, T]`` and ``[B]`` tensors), columns trimmed to the
    longest selected sequence."""
    idx = torch.as_tensor(list(rows), dtype=torch.long)
    part = {k: v.index_select(0, idx) for k, v in batch.items()}
    T = max(2, int(part["attention_mask"].sum(-1).max().item()))
    return {k: (v[:, :T].contiguous() if v.dim() == 2 else v) for k, v in part.items()}


def pack_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor,
              response_mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[b, T]`` right-padded rows -> ``(input_ids [1, N], position_ids [1, N], response_mask [1, N],
    index [N])``: the real tokens concatenated, positions restarting at 0 per sequence, and each
    packed token's flat position ``b * T + t`` in the padded layout (for :func:`unpack`). The
    response mask is zeroed at each sequence's first token (which has no prediction, as column 0
    of the padded layout)."""
    b, T = input_ids.shape
    real = attention_mask.reshape(-1) > 0
    index = real.nonzero(as_tuple=True)[0]
    pos = torch.arange(T, device=input_ids.device).expand(b, T).reshape(-1)[index]
    resp = response_mask.reshape(-1)[index] * (pos > 0).to(response_mask.dtype)
    return (input_ids.reshape(-1)[index].unsqueeze(0), pos.unsqueeze(0), resp.unsqueeze(0), index)


def unpack(values: torch.Tensor, index: torch.Tensor, shape: Tuple[int, int]) -> torch.Tensor:
    """Packed ``[1, N]`` values back to the padded ``shape`` (zeros off the real tokens)."""
    out = values.new_zeros(shape[0] * shape[1])
    return out.index_put((index,), values.reshape(-1)).reshape(shape)


ForwardFn = Callable[..., Tuple[torch.Tensor, torch.Tensor]]


def packed_forward(forward: ForwardFn, mb: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Run ``forward(input_ids, None, response_mask, position_ids)`` (the policy's
    ``(log_probs, entropy)``) on ``mb``'s rows packed into one, and return both in ``mb``'s padded
    ``[b, T]`` layout."""
    ids, pos, resp, index = pack_rows(mb["input_ids"], mb["attention_mask"], mb["response_mask"])
    lp, ent = forward(ids, None, resp, pos)
    shape = tuple(mb["input_ids"].shape)
    return unpack(lp, index, shape), unpack(ent, index, shape)


def empty_forward(forward: ForwardFn, device: torch.device) -> torch.Tensor:
    """An empty micro-batch's stand-in: a 2-token forward through every parameter (ZeRO-3 gathers
    them as on the other ranks) whose loss is 0 with a zero gradient."""
    ids = torch.zeros(1, 2, dtype=torch.long, device=device)
    lp, _ = forward(ids, None, torch.tensor([[0.0, 1.0]], device=device), torch.arange(2, device=device)[None])
    return lp.float().sum() * 0.0


# --------------------------------------------------------------------------- attention per sequence
PACKED_SDPA = "dispo_packed_sdpa"  # attn_implementation name, registered by register_packed_sdpa()
DENSE_MAX_TOKENS = 1024  # rows up to this long: one sdpa call with a block-diagonal mask (N^2 is cheap there)


def _segments(position_ids: torch.Tensor) -> List[Tuple[int, int]]:
    """``[(start, end)]`` of the sequences in a packed row (positions restart where they do not step by 1)."""
    pos = position_ids[0]
    cut = (torch.diff(pos) != 1).nonzero(as_tuple=True)[0].add(1).tolist()
    edges = [0] + cut + [pos.shape[0]]
    return list(zip(edges[:-1], edges[1:]))


def packed_sdpa_attention(module, query, key, value, attention_mask, **kwargs):
    """transformers' sdpa, but a packed row (batch 1, no mask, ``position_ids`` restarting) longer
    than :data:`DENSE_MAX_TOKENS` runs one causal sdpa per sequence: the cost of each sequence's own
    ``l^2`` attention, where the dense block-diagonal mask of the ``sdpa`` implementation costs
    ``N^2`` for the whole row of N tokens (and N^2 bytes of mask). A shorter packed row gets that
    block-diagonal mask in one call (cheaper than many small calls). Anything else goes to
    transformers' sdpa unchanged."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    pos = kwargs.get("position_ids")
    if attention_mask is None and pos is not None and query.shape[0] == 1 and pos.shape[0] == 1:
        segs = _segments(pos)
        if 1 < len(segs) and query.shape[2] <= DENSE_MAX_TOKENS:  # short row: one call, block-diagonal mask
            seq = torch.repeat_interleave(torch.arange(len(segs), device=query.device),
                                          torch.tensor([b - a for a, b in segs], device=query.device))
            n = seq.shape[0]
            causal = torch.ones(n, n, dtype=torch.bool, device=query.device).tril()
            mask = (causal & (seq[:, None] == seq[None, :]))[None, None]
            return sdpa_attention_forward(module, query, key, value, mask, **kwargs)
        if len(segs) > 1:
            parts = [sdpa_attention_forward(module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], None,
                                            **dict(kwargs, is_causal=True))[0] for a, b in segs]
            return torch.cat(parts, dim=1), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _packed_sdpa_mask(*args, attention_mask=None, **kwargs):
    """No mask for a row without padding (the attention above confines each sequence, or sdpa's
    ``is_causal``); a padded batch gets transformers' sdpa mask."""
    from transformers.masking_utils import sdpa_mask
    return None if attention_mask is None else sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def register_packed_sdpa() -> str:
    """Register :data:`PACKED_SDPA` with transformers (attention and mask); returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)
    AttentionMaskInterface.register(PACKED_SDPA, _packed_sdpa_mask)
    return PACKED_SDPA
