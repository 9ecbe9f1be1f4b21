"""A step-cost model for GPU clusters: seconds per training step from the model's shape, the
response-length distribution, the GPU split between generators and learners, ZeRO stage and the
staleness bound k. Pure Python (stdlib only), no Ray, no torch.

    python -m dispo_ray.study.cost_model --model 7b --gen-gpus 32 --learn-gpus 32 --k 1
    python -m dispo_ray.study.cost_model --checks      # against published end-to-end numbers
    python -m dispo_ray.study.cost_model --sizing      # the GPU split table of docs/scaling.md

Every constant below is either a published figure (its source in ``SOURCES`` and in
docs/scaling.md), a measurement of this repository (docs/benchmarks.md), or a first-principles
count (FLOPs, bytes). The growth exponents are first principles, not fitted: the scale ladder
(bench/bench_scale.py, issue 27 item 3) that would calibrate them does not exist yet.

The equations (docs/scaling.md has them with their derivations):

    decode iteration  t_it(a, c) = max((W + c*kv) / (tp*HBM), 2*P*a / (tp*peak)) / eta + t_floor
                      (a sequences alive, c KV tokens resident, W weight bytes, kv bytes/token)
    generate (k any)  engines E = gen_gpus / tp, n = samples / E per engine; the batch waits for its
                      longest sample: sum over decode iterations i <= L_max of t_it(alive(i), ...)
    train             (6*P*T + 12*sum(s^2)*d_head*heads*layers) / (learn_gpus * peak * MFU * ds)
                      overlapped with the ZeRO collectives: max(compute, comm)
    sync              fixed + gather(ZeRO-3) + buckets * t_bucket + bytes / bandwidth
    step, k = 0       generate + reward + train + sync
    step, k >= 1      max(generate + reward, train) + sync   (the broadcast stalls both sides)
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Dict, Optional

_N01 = statistics.NormalDist()

# ----------------------------------------------------------------------------- sources
SOURCES: Dict[str, str] = {
    "qwen_shapes": "Qwen2.5 technical report (arXiv 2412.15115) and the models' config.json on the "
                   "Hugging Face hub (Qwen/Qwen2.5-1.5B, -7B, -14B)",
    "llama_shape": "meta-llama/Llama-3.1-8B and mistralai/Mistral-7B-v0.3 config.json on the Hugging Face hub",
    "tpot": "vLLM on 1x H100 SXM, 10 prompts at once, median time per output token: Llama-3-8B-Instruct "
            "7.56 ms, Mistral-7B-Instruct-v0.3 7.06 ms (https://github.com/LambdaLabsML/vllm-benchmark, "
            "results/prompt_10/1xH100-80GB-SXM/*_tp1_len2048.json)",
    "h100": "NVIDIA H100 SXM5: 989.4 TFLOPS dense BF16, 3.35 TB/s HBM3, 80 GB, NVLink 900 GB/s "
            "bidirectional (https://glennklockwood.com/garden/processors/h100, NVIDIA datasheet values)",
    "h20": "NVIDIA H20: 148 TFLOPS dense FP16/BF16, 96 GB HBM3 at 4.0 TB/s, NVLink 900 GB/s "
           "(https://willitrunai.com/es/gpus/h20-96gb)",
    "nccl": "NCCL maintainer on H100 nodes: single-node all-reduce busbw 476 GB/s (NVLink SHARP), "
            "46-48 GB/s per 400 Gb/s NDR NIC (https://github.com/NVIDIA/nccl-tests/issues/290)",
    "single_sender": "verl: one sending rank drives one NIC, ~25 GB/s on GH200 "
                     "(https://github.com/verl-project/verl/issues/7167, pull 7291)",
    "decode_eta": "vLLM decode on A100 at one request: ~77% of the memory-bandwidth roofline "
                  "(https://johnmusgrave.com/p/vllm-throughput-latency-sweep-on)",
    "max_num_seqs": "vLLM 0.32.0 vllm/engine/arg_utils.py: default max_num_seqs 1024 on >= 70 GiB "
                    "GPUs other than A100",
    "mfu": "verl-omni: FSDP full fine-tune actor MFU 0.223 on H200 "
           "(https://github.com/verl-project/verl-omni/issues/124)",
    "attn_flops": "verl/utils/flops_counter.py: attention fwd+bwd FLOPs = 12 * sum(s^2) * head_dim * "
                  "heads * layers (https://github.com/verl-project/verl/pull/4753)",
    "repo": "this repository, docs/benchmarks.md: DeepSpeed step 0.96 of bare AdamW; generator actor "
            "1.00 of the engine; sync fixed cost ~24 ms of which ~1.3 ms wire, ~1.7 ms per engine load; "
            "53.9 reward verifications/s per worker, 0.847 scaling at 2 workers",
}


# ----------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class ModelShape:
    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool
    qkv_bias: bool = True

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def params(self) -> int:
        h, kvd = self.hidden, self.kv_heads * self.head_dim
        attn = h * h + 2 * h * kvd + h * h + ((h + 2 * kvd) if self.qkv_bias else 0)
        per_layer = attn + 3 * h * self.intermediate + 2 * h
        emb = self.vocab * h
        return self.layers * per_layer + h + emb + (0 if self.tied else emb)

    @property
    def matmul_params(self) -> int:
        """Parameters that cost FLOPs per token (the input embedding is a lookup)."""
        return self.params - self.vocab * self.hidden + (self.vocab * self.hidden if self.tied else 0)

    @property
    def weight_bytes(self) -> float:
        return 2.0 * self.params  # bf16

    @property
    def kv_bytes_per_token(self) -> float:
        return 2.0 * self.layers * self.kv_heads * self.head_dim * 2  # K and V, bf16


MODELS: Dict[str, ModelShape] = {  # SOURCES["qwen_shapes"], SOURCES["llama_shape"]
    "1.5b": ModelShape("Qwen2.5-1.5B", 28, 1536, 12, 2, 8960, 151936, tied=True),
    "7b": ModelShape("Qwen2.5-7B", 28, 3584, 28, 4, 18944, 152064, tied=False),
    "14b": ModelShape("Qwen2.5-14B", 48, 5120, 40, 8, 13824, 152064, tied=False),
    "llama3.1-8b": ModelShape("Llama-3.1-8B", 32, 4096, 32, 8, 14336, 128256, tied=False, qkv_bias=False),
    "mistral-7b": ModelShape("Mistral-7B-v0.3", 32, 4096, 32, 8, 14336, 32768, tied=False, qkv_bias=False),
}


@dataclass(frozen=True)
class Gpu:
    name: str
    peak_flops: float       # dense bf16 FLOP/s
    hbm_bytes_s: float      # HBM bytes/s
    mem_bytes: float
    nvlink_busbw: float     # in-node collective bus bandwidth, bytes/s
    nvlink_p2p: float       # in-node one-direction link bandwidth (a broadcast from one rank)
    nic_bytes_s: float      # inter-node bandwidth per GPU (one NIC per GPU), bytes/s
    gpus_per_node: int = 8


GB = 1e9
GPUS: Dict[str, Gpu] = {
    # SOURCES["h100"], SOURCES["nccl"]
    "h100": Gpu("H100 SXM", 989.4e12, 3.35e12, 80 * GB, 476 * GB, 450 * GB, 47 * GB),
    # SOURCES["h20"]; NVLink as H100's (900 GB/s); NICs assumed NDR like the H100 row
    "h20": Gpu("H20", 148e12, 4.0e12, 96 * GB, 476 * GB, 450 * GB, 47 * GB),
}


@dataclass(frozen=True)
class Lengths:
    """Response lengths: log-normal with this median and p95, truncated at ``cap`` (max_new_tokens)."""
    median: float
    p95: float
    cap: int

    @property
    def sigma(self) -> float:
        return math.log(self.p95 / self.median) / _N01.inv_cdf(0.95)

    def survival(self, x: float) -> float:
        """P(L > x)."""
        if x >= self.cap:
            return 0.0
        if x <= 0:
            return 1.0
        return 1.0 - _N01.cdf((math.log(x) - math.log(self.median)) / self.sigma)

    def _integral(self, f, n: int = 4000) -> float:
        """int_0^cap f(x) P(L > x) dx, on a log-spaced grid (S is ~1 below median / 1e4)."""
        lo = min(self.median * 1e-4, self.cap / 2.0)
        total = f(lo / 2) * lo
        step = math.log(self.cap / lo) / n
        for i in range(n):
            x = lo * math.exp((i + 0.5) * step)
            total += f(x) * self.survival(x) * x * step
        return total

    @property
    def mean(self) -> float:
        return self._integral(lambda x: 1.0)

    def mean_square_total(self, prompt: float) -> float:
        """E[(prompt + L)^2] (attention FLOPs grow with the square of each sequence)."""
        # E[f(L)] = f(0) + int f'(x) S(x) dx, f(x) = (prompt + x)^2
        return prompt ** 2 + self._integral(lambda x: 2.0 * (prompt + x))

    @classmethod
    def with_mean(cls, mean: float, p95_over_median: float, cap: int) -> "Lengths":
        """The distribution of this spread and cap whose (truncated) mean is ``mean``."""
        lo, hi = 1e-3, float(cap)
        for _ in range(60):
            mid = math.sqrt(lo * hi)
            lo, hi = (mid, hi) if cls(mid, mid * p95_over_median, cap).mean < mean else (lo, mid)
        m = math.sqrt(lo * hi)
        return cls(m, m * p95_over_median, cap)

    def expected_max(self, n: int) -> float:
        """The batch's longest sample: the n/(n+1) quantile, at most ``cap``."""
        q = n / (n + 1.0)
        return min(float(self.cap), self.median * math.exp(self.sigma * _N01.inv_cdf(q)))


# The roofline alone misses a fixed cost per decode iteration (scheduling, sampling over the
# vocabulary, launches; with tp > 1 the all-reduces). Two calibrated constants, each fitted on one
# published number (docs/scaling.md, limits):
# - one GPU per engine: Llama-3-8B's median time per output token on one H100 (SOURCES["tpot"]);
# - tp > 1: verl's colocated 128-GPU gen time (H20, TP 4, a tail of ~15k tokens: 177.85 s).
DECODE_FLOOR_TP1_S = 0.0012  # = calibrate_decode_floor_tp1() rounded, checked in tests
DECODE_FLOOR_TP_S = 0.0101   # = calibrate_decode_floor() rounded, checked in tests


@dataclass(frozen=True)
class Setup:
    model: ModelShape
    lengths: Lengths
    gen_gpus: int
    learn_gpus: int
    prompts: int = 512
    group: int = 16
    prompt_tokens: float = 512.0
    tp: int = 1
    zero_stage: int = 3
    k: int = 0
    gpu: Gpu = GPUS["h100"]
    colocated: bool = False            # verl's hybrid engine: generators and learners share GPUs
    streaming: bool = False            # partial rollout: no wait for the longest sample (not dispo-ray)
    logprob_pass: bool = False         # an extra forward before the update (verl old_log_prob)
    gpu_memory_utilization: float = 0.85   # conf/preset/gpu.yaml
    max_num_seqs: int = 1024           # SOURCES["max_num_seqs"]
    micro_tokens: float = 10240.0      # conf/preset/gpu.yaml: 2 x (1024 + 4096)
    sync_bucket_bytes: float = 256 * 2 ** 20  # conf/preset/gpu.yaml
    reward_workers: int = 32
    # efficiencies
    decode_eta: float = 0.77           # SOURCES["decode_eta"]
    decode_floor_s: Optional[float] = None  # fixed seconds per decode iteration; None: by tp (calibrated)
    mfu: float = 0.223                 # SOURCES["mfu"]
    deepspeed_ratio: float = 0.96      # SOURCES["repo"]: DeepSpeed step / bare AdamW
    actor_ratio: float = 1.00          # SOURCES["repo"]: generator actor / engine direct
    sync_fixed_s: float = 0.0227       # SOURCES["repo"]: ~24 ms a sync less ~1.3 ms wire
    sync_bucket_s: float = 0.0017      # SOURCES["repo"]: ~1.7 ms per engine load
    reward_per_worker: float = 53.9 * 0.847  # SOURCES["repo"]

    @property
    def samples(self) -> int:
        return self.prompts * self.group


# ----------------------------------------------------------------------------- components
def decode_iteration_s(s: Setup, alive: float, kv_tokens: float) -> float:
    """One decode iteration of one engine (tp GPUs): the roofline of weights + KV reads vs FLOPs."""
    m, g = s.model, s.gpu
    mem = (m.weight_bytes + kv_tokens * m.kv_bytes_per_token) / s.tp / g.hbm_bytes_s
    flops = 2.0 * m.matmul_params * alive / s.tp / g.peak_flops
    floor = s.decode_floor_s
    if floor is None:
        floor = DECODE_FLOOR_TP1_S if s.tp == 1 else DECODE_FLOOR_TP_S
    return max(mem, flops) / s.decode_eta + floor


def engine_batch_limit(s: Setup) -> float:
    """Sequences one engine holds at once: max_num_seqs or the KV cache, whichever is smaller."""
    m, g = s.model, s.gpu
    kv_budget = s.tp * g.mem_bytes * s.gpu_memory_utilization - m.weight_bytes
    if kv_budget <= 0:
        raise ValueError(f"{m.name} does not fit tp={s.tp} x {g.name} at "
                         f"gpu_memory_utilization={s.gpu_memory_utilization}")
    per_seq = (s.prompt_tokens + s.lengths.mean) * m.kv_bytes_per_token
    return max(1.0, min(float(s.max_num_seqs), kv_budget / per_seq))


def generate_s(s: Setup) -> float:
    gen_gpus = s.learn_gpus if s.colocated else s.gen_gpus
    engines = max(1, gen_gpus // s.tp)
    n = s.samples / engines
    b = engine_batch_limit(s)
    mean = s.lengths.mean
    m = s.model
    prefill = n * s.prompt_tokens * 2.0 * m.matmul_params / s.tp / s.gpu.peak_flops / s.decode_eta
    if s.streaming:  # throughput-bound: a full batch all the time, no tail
        a = min(n, b)
        t = n * mean / a * decode_iteration_s(s, a, a * (s.prompt_tokens + mean / 2))
        return (t + prefill) / s.actor_ratio
    t = 0.0
    if n > b:  # the queue keeps the batch full until the last b samples are admitted
        t += (n - b) * mean / b * decode_iteration_s(s, b, b * (s.prompt_tokens + mean / 2))
        n = b
    l_max = s.lengths.expected_max(int(round(s.samples)))
    step = max(1, int(l_max // 512))
    i = 0
    while i < l_max:
        di = min(step, l_max - i)
        x = i + di / 2
        alive = max(1.0, n * s.lengths.survival(x))
        t += di * decode_iteration_s(s, alive, alive * (s.prompt_tokens + x))
        i += di
    return (t + prefill) / s.actor_ratio


def train_flops(s: Setup) -> float:
    m = s.model
    tokens = s.samples * (s.prompt_tokens + s.lengths.mean)
    sq = s.samples * s.lengths.mean_square_total(s.prompt_tokens)
    f = 6.0 * m.matmul_params * tokens + 12.0 * sq * m.head_dim * m.heads * m.layers
    if s.logprob_pass:
        f *= 4.0 / 3.0  # one more forward: a third of forward + backward
    return f


def zero_comm_s(s: Setup) -> float:
    w = s.learn_gpus
    if w <= 1:
        return 0.0
    bw = s.gpu.nvlink_busbw if w <= s.gpu.gpus_per_node else s.gpu.nic_bytes_s
    tokens = s.samples * (s.prompt_tokens + s.lengths.mean)
    micro = math.ceil(tokens / w / s.micro_tokens)
    p = s.model.weight_bytes
    per_micro = 3 * p if s.zero_stage == 3 else p  # gather fwd + gather bwd + reduce-scatter; grads only
    once = 0.0 if s.zero_stage == 3 else p         # stages 1/2: the updated params all-gathered once
    return (micro * per_micro + once) * (w - 1) / w / bw


def train_s(s: Setup) -> float:
    compute = train_flops(s) / (s.learn_gpus * s.gpu.peak_flops * s.mfu * s.deepspeed_ratio)
    return max(compute, zero_comm_s(s))


def sync_s(s: Setup) -> float:
    """Learner rank 0 broadcasts every bucket to every generator (one sender)."""
    if s.colocated:
        return 0.0
    g, nbytes = s.gpu, s.model.weight_bytes
    gather = 0.0
    if s.zero_stage == 3 and s.learn_gpus > 1:
        bw = g.nvlink_busbw if s.learn_gpus <= g.gpus_per_node else g.nic_bytes_s
        gather = nbytes * (s.learn_gpus - 1) / s.learn_gpus / bw
    one_node = s.gen_gpus + s.learn_gpus <= g.gpus_per_node
    wire = nbytes / (g.nvlink_p2p if one_node else g.nic_bytes_s)
    buckets = math.ceil(nbytes / s.sync_bucket_bytes)
    return s.sync_fixed_s + gather + buckets * s.sync_bucket_s + wire


def reward_s(s: Setup) -> float:
    return s.samples / (s.reward_workers * s.reward_per_worker)


@dataclass
class Breakdown:
    generate: float
    reward: float
    train: float
    sync: float
    step: float
    k: int

    def as_dict(self) -> Dict[str, float]:
        return {"generate_s": self.generate, "reward_s": self.reward, "train_s": self.train,
                "sync_s": self.sync, "step_s": self.step}


def step(s: Setup) -> Breakdown:
    gen, rew, tr, sy = generate_s(s), reward_s(s), train_s(s), sync_s(s)
    if s.k == 0 or s.colocated:
        total = gen + rew + tr + sy
    else:
        total = max(gen + rew, tr) + sy
    return Breakdown(gen, rew, tr, sy, total, s.k)
