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

import argparse
import math
import statistics
from dataclasses import dataclass, replace
from typing import Dict, List, Optional

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


# ----------------------------------------------------------------------------- published checks
# verl fully-async recipe (docs/advance/fully_async.md; recipe/fully_async_policy/shell/
# dapo_7b_math_fsdp2_64_64.sh): Qwen2.5-Math-7B, H20, DAPO, 512 prompts x 16, prompts <= 2048,
# responses <= 28672, rollout TP 4, gpu_memory_utilization 0.80. The page does not publish the
# mean response length: it is the one calibrated input (VERL_MEDIAN), fitted so that the 64:64
# update_actor time (113.16 s) is matched; the spread (median:p95 = 300:2000, the issue's
# reasoning-trace shape) is kept. The mean prompt length is not published either: DAPO-Math-17k
# prompts are single problems, VERL_PROMPT_TOKENS is an assumption (not a published figure).
VERL_PROMPT_TOKENS = 200.0
VERL_MEDIAN = 223.0  # = round(calibrate_verl_median()), checked in tests


def _verl(gpus_gen: int, gpus_learn: int, colocated: bool, streaming: bool, k: int) -> Setup:
    return Setup(model=MODELS["7b"], lengths=Lengths(VERL_MEDIAN, VERL_MEDIAN * 2000 / 300, 28672),
                 gen_gpus=gpus_gen, learn_gpus=gpus_learn, prompts=512, group=16,
                 prompt_tokens=VERL_PROMPT_TOKENS, tp=4, zero_stage=3, k=k, gpu=GPUS["h20"],
                 colocated=colocated, streaming=streaming, logprob_pass=colocated,
                 gpu_memory_utilization=0.80, micro_tokens=2.0 * (2048 + 28672), reward_workers=512)


def calibrate_decode_floor(target: float = 177.85) -> float:
    """The per-iteration decode floor at which the colocated 128-GPU gen time equals ``target``."""
    lo, hi = 0.0, 0.1
    for _ in range(60):
        mid = (lo + hi) / 2
        s = replace(_verl(128, 128, True, False, 0), decode_floor_s=mid)
        lo, hi = (mid, hi) if generate_s(s) < target else (lo, mid)
    return (lo + hi) / 2


def calibrate_verl_median(target: float = 113.16) -> float:
    """The response-length median at which the 64:64 update_actor time equals ``target``."""
    lo, hi = 10.0, 20000.0
    for _ in range(60):
        mid = math.sqrt(lo * hi)
        s = replace(_verl(64, 64, False, True, 1), lengths=Lengths(mid, mid * 2000 / 300, 28672))
        lo, hi = (mid, hi) if train_s(s) < target else (lo, mid)
    return math.sqrt(lo * hi)


@dataclass(frozen=True)
class Check:
    name: str
    source: str
    published: float
    quantity: str   # which model output: step_s, generate_s, train_s, sync_s, tpot_s
    setup: Setup
    calibrated: bool = False

    def model(self) -> float:
        if self.quantity == "sync_s":
            return sync_s(self.setup)
        if self.quantity == "tpot_s":
            return tpot_s(self.setup)
        return step(self.setup).as_dict()[self.quantity]


# Lambda's vLLM runs: 10 prompts at once; ~10 sequences alive holding ~2,300 KV tokens (their
# total input + half their total output tokens)
def _tpot_setup(model: str) -> Setup:
    return Setup(model=MODELS[model], lengths=Lengths(100, 200, 1000), gen_gpus=1, learn_gpus=1, tp=1)


def tpot_s(s: Setup) -> float:
    return decode_iteration_s(s, alive=10, kv_tokens=2300)


def calibrate_decode_floor_tp1(target: float = 0.007558) -> float:
    s = _tpot_setup("llama3.1-8b")
    return target - decode_iteration_s(replace(s, decode_floor_s=0.0), alive=10, kv_tokens=2300)


_FA = "verl docs/advance/fully_async.md"


def _sync_only(params: float, gen: int, learn: int, gpu: str, zero: int = 2) -> Setup:
    layers = 1  # a shape whose bf16 bytes are 2 x params: only the bytes matter for the sync
    shape = ModelShape(f"{params / 1e9:.0f}B", layers, 1, 1, 1, 0, int(params), tied=True, qkv_bias=False)
    return Setup(model=shape, lengths=Lengths(100, 200, 1000), gen_gpus=gen, learn_gpus=learn,
                 zero_stage=zero, gpu=GPUS[gpu], sync_fixed_s=0.0, sync_bucket_s=0.0)


CHECKS: List[Check] = [
    Check("vLLM Llama-3-8B, 1 H100, 10 prompts: time per output token", SOURCES["tpot"].split("(")[1].split(",")[0],
          0.007558, "tpot_s", _tpot_setup("llama3.1-8b"), calibrated=True),
    Check("vLLM Mistral-7B-v0.3, 1 H100, 10 prompts: time per output token",
          SOURCES["tpot"].split("(")[1].split(",")[0], 0.007057, "tpot_s", _tpot_setup("mistral-7b")),
    Check("verl 7B colocated sync, 128 GPUs: step", _FA, 356.30, "step_s", _verl(128, 128, True, False, 0)),
    Check("verl 7B colocated sync, 128 GPUs: gen", _FA, 177.85, "generate_s", _verl(128, 128, True, False, 0),
          calibrated=True),
    Check("verl 7B colocated sync, 128 GPUs: old_log_prob + update_actor", _FA, 53.92 + 113.81, "train_s",
          _verl(128, 128, True, False, 0)),
    Check("verl 7B colocated sync, 64 GPUs: step", _FA, 365.28, "step_s", _verl(64, 64, True, False, 0)),
    Check("verl 7B colocated sync, 32 GPUs: step", _FA, 790.10, "step_s", _verl(32, 32, True, False, 0)),
    Check("verl 7B fully async 64:64: update_actor", _FA, 113.16, "train_s", _verl(64, 64, False, True, 1),
          calibrated=True),
    Check("verl 7B fully async 64:64: step", _FA, 150.63, "step_s", _verl(64, 64, False, True, 1)),
    Check("verl 7B fully async 32:32: step", _FA, 189.26, "step_s", _verl(32, 32, False, True, 1)),
    Check("verl 7B fully async 16:16: step", _FA, 294.77, "step_s", _verl(16, 16, False, True, 1)),
    Check("NeMo RL Llama-3.1-8B GRPO on-policy, 16 H100: step",
          "NeMo RL docs/about/performance-summary.md (v0.4)", 97.7, "step_s",
          Setup(model=MODELS["llama3.1-8b"], lengths=Lengths.with_mean(1060, 2000 / 300, 4096),
                gen_gpus=16, learn_gpus=16, prompts=128, group=16, prompt_tokens=0.0, tp=1,
                gpu=GPUS["h100"], colocated=True, logprob_pass=True, reward_workers=512)),
    Check("verl Qwen2.5-Math-7B sync, 4 -> 4 H20 in one node (Megatron)", _FA + " (checkpoint-engine table)",
          0.12, "sync_s", _sync_only(7.62e9, 4, 4, "h20")),
    Check("verl 27B bf16 sync, 8 -> 8 GPUs over 2 nodes, AWS EFA (stock nccl engine)",
          "https://github.com/verl-project/verl/pull/7263", 3.01, "sync_s", _sync_only(27e9, 8, 8, "h100")),
    Check("verl 27B sync (same recipe), 2 trainer + 2 rollout nodes",
          "https://github.com/verl-project/verl/issues/7262", 5.548, "sync_s", _sync_only(27e9, 16, 16, "h100")),
]


def check_rows() -> List[Dict[str, object]]:
    rows = []
    for c in CHECKS:
        mv = c.model()
        rows.append({"name": c.name, "source": c.source, "published": c.published, "model": mv,
                     "ratio": mv / c.published, "calibrated": c.calibrated})
    return rows


# ----------------------------------------------------------------------------- sizing
SIZING_LENGTHS = Lengths(300.0, 2000.0, 4096)  # the reasoning traces; the GPU preset's cap
SIZING_MODELS = ("1.5b", "7b", "14b")
SIZING_TOTALS = (8, 16, 64)


def sizing_setup(model: str, gen: int, learn: int, k: int, tp: Optional[int] = None) -> Setup:
    shape = MODELS[model]
    return Setup(model=shape, lengths=SIZING_LENGTHS, gen_gpus=gen, learn_gpus=learn, prompts=128, group=16,
                 prompt_tokens=256.0, tp=tp or 1, zero_stage=3, k=k,
                 gpu=GPUS["h100"], reward_workers=64)


def best_split(model: str, total: int, k: int, tolerance: float = 0.02) -> Dict[str, object]:
    """The generator/learner split of ``total`` GPUs with the shortest predicted step; among the
    splits within ``tolerance`` of it, the one with the most learner GPUs (headroom for longer
    responses: training grows with the mean length, generation with the longest)."""
    tp = 1
    found = []
    for gen in range(tp, total, tp):
        try:
            found.append((gen, total - gen, step(sizing_setup(model, gen, total - gen, k, tp))))
        except ValueError:
            continue
    if not found:
        raise ValueError(f"no split of {total} GPUs fits {model}")
    fastest = min(b.step for _, _, b in found)
    gen, learn, b = max((f for f in found if f[2].step <= fastest * (1 + tolerance)), key=lambda f: f[1])
    return {"model": model, "total": total, "k": k, "gen_gpus": gen, "learn_gpus": learn, **b.as_dict()}


def sizing_rows() -> List[Dict[str, object]]:
    return [best_split(m, t, k) for m in SIZING_MODELS for t in SIZING_TOTALS for k in (0, 1)]


# ----------------------------------------------------------------------------- CLI
def _fmt(x: float) -> str:
    return f"{x:.3g}" if x < 10 else f"{x:.0f}"


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="python -m dispo_ray.study.cost_model", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=sorted(MODELS), default="7b")
    p.add_argument("--gpu", choices=sorted(GPUS), default="h100")
    p.add_argument("--gen-gpus", type=int, default=8)
    p.add_argument("--learn-gpus", type=int, default=8)
    p.add_argument("--tp", type=int, default=1, help="generator tensor-parallel size")
    p.add_argument("--zero-stage", type=int, choices=(1, 2, 3), default=3)
    p.add_argument("--k", type=int, default=0, help="trainer.max_staleness")
    p.add_argument("--prompts", type=int, default=128, help="prompts per step")
    p.add_argument("--group", type=int, default=16, help="samples per prompt")
    p.add_argument("--prompt-tokens", type=float, default=256.0)
    p.add_argument("--median", type=float, default=300.0, help="response length median")
    p.add_argument("--p95", type=float, default=2000.0, help="response length p95")
    p.add_argument("--max-new-tokens", type=int, default=4096)
    p.add_argument("--reward-workers", type=int, default=64)
    p.add_argument("--mfu", type=float, default=Setup.mfu)
    p.add_argument("--checks", action="store_true", help="print the model against published numbers")
    p.add_argument("--sizing", action="store_true", help="print the GPU split table")
    a = p.parse_args(argv)
    if a.checks:
        print("| check | published | model | model / published |")
        print("|---|---:|---:|---:|")
        for r in check_rows():
            mark = " (calibrated)" if r["calibrated"] else ""
            print(f"| {r['name']}{mark} | {_fmt(r['published'])} s | {_fmt(r['model'])} s | {r['ratio']:.2f} |")
        return
    if a.sizing:
        print("| model | GPUs | k | generators : learners | step s | generate s | train s | sync s |")
        print("|---|---:|---:|---|---:|---:|---:|---:|")
        for r in sizing_rows():
            print(f"| {MODELS[r['model']].name} | {r['total']} | {r['k']} | {r['gen_gpus']} : {r['learn_gpus']} | "
                  f"{_fmt(r['step_s'])} | {_fmt(r['generate_s'])} | {_fmt(r['train_s'])} | {_fmt(r['sync_s'])} |")
        return
    s = Setup(model=MODELS[a.model], lengths=Lengths(a.median, a.p95, a.max_new_tokens), gen_gpus=a.gen_gpus,
              learn_gpus=a.learn_gpus, prompts=a.prompts, group=a.group, prompt_tokens=a.prompt_tokens, tp=a.tp,
              zero_stage=a.zero_stage, k=a.k, gpu=GPUS[a.gpu], reward_workers=a.reward_workers, mfu=a.mfu)
    b = step(s)
    m = s.model
    print(f"{m.name}: {m.params / 1e9:.2f} B parameters, {m.weight_bytes / 1e9:.1f} GB bf16, "
          f"KV {m.kv_bytes_per_token / 1024:.0f} KiB/token; {s.gpu.name}; {s.samples} samples/step, "
          f"mean response {s.lengths.mean:.0f} tokens, longest ~{s.lengths.expected_max(s.samples):.0f}")
    print(f"generators {s.gen_gpus} GPUs (tp {s.tp}, {engine_batch_limit(s):.0f} sequences/engine), "
          f"learners {s.learn_gpus} GPUs (ZeRO-{s.zero_stage}), k = {s.k}")
    for key, v in b.as_dict().items():
        print(f"  {key:<11} {v:10.2f}")
    formula = "generate + reward + train + sync" if s.k == 0 else "max(generate + reward, train) + sync"
    print(f"  step = {formula}")


if __name__ == "__main__":
    main()
