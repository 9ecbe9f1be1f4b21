"""Weight sync: (a) the bucketed protocol against a raw broadcast, (b) its share of a training step.

(a) Protocol efficiency. Effective bytes/s of ``dispo_ray.sync.protocol`` (``send_weights`` on this
process as rank 0, ``receive_weights`` on 1 and then 2 receiver processes, spawned as the tests do)
divided by ONE raw flat ``WeightSyncGroup.broadcast`` of the same payload bytes (a resident buffer
holding them, packed once before timing) on the same gloo group (goal >= 0.9), at the configured bucket size (``learner.sync_bucket_mb``). The payload is the
named parameters of a ~38 M-parameter Qwen2 (shapes taken
from a transformers ``Qwen2Config`` built on the meta device, random float32 values), so the manifest
has a real model's mix of large and small tensors. What the protocol adds is all counted: the
header, manifest-agreement and completion collectives, packing the multi-tensor buckets into the
sender's staging buffers, a fresh buffer per bucket on the receivers (the baseline's receivers
also allocate a fresh buffer each time), and one broadcast per bucket. Both sides end with the same one-element all-reduce so
the sender's clock stops only when every receiver has the data. Protocol and raw rounds alternate
(AB, BA, ...) on the same group; each session (fresh processes) gives a best-of-rounds ratio and
the median session is reported, every session's ratio in the notes.

(b) Share of a training step on the embedded default (goal <= 5%). A training step is the whole
data flow of DESIGN.md ("The data flow of one training step": generate, reward, train, sync);
the share of the learner's train call alone is reported beside it, without a goal. A real ``dispo_ray.rollout.driver.Trainer``
(reward pool, vLLM generator actor, DeepSpeed learner group, the sync group formed by its own
``WeightSync.connect``) runs synchronous steps exactly as ``Trainer.fit`` does, minus logging and
evaluation: ``RolloutProducer.collect`` (generate + reward + dynamic sampling), ``Trainer.train_on``
(the learner step), ``WeightSync.publish`` (rank-0 bucketed broadcast into the running engine,
what the driver logs as ``timing/sync``). Reported: median sync time / median learner step time,
and median sync / median whole step (generate + reward + train + sync).
"""
from __future__ import annotations

import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from typing import Dict, List, Sequence, Tuple

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

BUDGET_S = 330  # run_all's per-module wall-clock limits (s)
BUDGET_QUICK_S = 200
CTX = mp.get_context("spawn")


# ---------------------------------------------------------------------------------- (a) protocol
def payload_manifest(num_layers: int):
    """ParamSpecs of a Qwen2 with a 32k vocabulary, hidden 640: ~20 M embedding (tied) + ~4.3 M per layer."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from dispo_ray.sync.protocol import make_manifest

    cfg = Qwen2Config(vocab_size=32000, hidden_size=640, intermediate_size=1728, num_hidden_layers=num_layers,
                      num_attention_heads=10, num_key_value_heads=2, tie_word_embeddings=True)
    with torch.device("meta"):
        model = Qwen2ForCausalLM(cfg)
    return make_manifest(model.named_parameters())


def _ack(group) -> None:
    group.all_reduce_min(torch.ones(1, dtype=torch.int64), "ack")


def _receiver(port: int, rank: int, world: int, manifest, schedule, q) -> None:
    """Mirror the sender's schedule; report a checksum of the first bucketed receive."""
    from dispo_ray.sync.protocol import WeightSyncGroup, receive_weights

    try:
        torch.set_num_threads(1)
        group = WeightSyncGroup("gloo", "127.0.0.1", port, rank, world, timeout_s=120)
        checksum = None
        nbytes = sum(p.nbytes for p in manifest)
        for kind, bucket_bytes in schedule:
            if kind == "raw":
                group.broadcast(torch.empty(nbytes, dtype=torch.uint8), 0, "raw")
            else:
                _, stream = receive_weights(group, manifest, bucket_bytes)
                if checksum is None:  # the first (warm-up) bucketed receive is checked
                    checksum = sum(float(t.double().sum()) for _, t in stream)
                else:
                    for _ in stream:
                        pass
            _ack(group)
        q.put(("ok", rank, checksum))
    except Exception as e:  # noqa: BLE001 - reported to the sender
        q.put(("error", rank, f"{type(e).__name__}: {e}"))


def measure_protocol(manifest, n_receivers: int, bucket_sizes: Sequence[int], rounds: int) -> Dict[str, List[float]]:
    """Seconds per transfer for "raw" and each bucket size, alternating order round by round."""
    from dispo_ray.sync.protocol import WeightSyncGroup, find_free_port, pack, send_weights

    g = torch.Generator().manual_seed(0)
    tensors = {p.name: torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.torch_dtype) for p in manifest}
    nbytes = sum(p.nbytes for p in manifest)
    # The raw side sends one pre-packed buffer holding the very same bytes. It must be written:
    # a never-touched torch.empty maps the kernel's shared zero page, so sending it reads one
    # cached 4 KiB page over and over and costs the sender's socket thread ~3x less CPU than
    # any real payload (measured per thread: 28 vs 92 ms per 151 MB).
    flat = pack([tensors[p.name] for p in manifest])
    kinds = [("raw", 0)] + [("bucketed", b) for b in bucket_sizes]
    schedule = list(kinds)  # warm-up round (first connections, page faults)
    for r in range(rounds):
        schedule += kinds if r % 2 == 0 else kinds[::-1]
    port, q = find_free_port(), CTX.Queue()
    world = n_receivers + 1
    procs = [CTX.Process(target=_receiver, args=(port, r, world, manifest, schedule, q), daemon=True)
             for r in range(1, world)]
    for p in procs:
        p.start()
    times: Dict[str, List[float]] = {f"{k}:{b}": [] for k, b in kinds}
    try:
        group = WeightSyncGroup("gloo", "127.0.0.1", port, 0, world, timeout_s=120)
        for i, (kind, bucket_bytes) in enumerate(schedule):
            t0 = time.perf_counter()
            if kind == "raw":
                group.broadcast(flat, 0, "raw")
            else:
                send_weights(group, manifest, tensors, bucket_bytes, version=i)
            _ack(group)
            if i >= len(kinds):
                times[f"{kind}:{bucket_bytes}"].append(time.perf_counter() - t0)
        reports = [q.get(timeout=120) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    expected = sum(float(t.double().sum()) for t in tensors.values())
    for status, rank, info in reports:
        if status != "ok":
            raise RuntimeError(f"receiver rank {rank} failed: {info}")
        if abs(info - expected) > 1e-6 * max(1.0, abs(expected)):
            raise RuntimeError(f"receiver rank {rank}: checksum {info} != sent {expected}")
    return times


def protocol_rows(quick: bool) -> List[dict]:
    from dispo_ray.infra.config import compose
    from dispo_ray.sync.protocol import direct_bytes_for, plan_buckets

    default_mb = int(compose([]).learner.sync_bucket_mb)
    manifest = payload_manifest(4)
    params = sum(torch.Size(p.shape).numel() for p in manifest)
    nbytes = sum(p.nbytes for p in manifest)
    sizes = [default_mb << 20]
    # Whole measurement sessions (fresh receiver processes, fresh group) differ more from each
    # other on this shared VM than rounds within one do, so take several sessions.
    sessions, rounds = (1, 6) if quick else (3, 16)
    rows = []
    for n_recv in (1, 2):
        t0 = time.perf_counter()
        runs = [measure_protocol(manifest, n_recv, sizes, rounds) for _ in range(sessions)]
        print(f"  protocol, {n_recv} receiver(s): {time.perf_counter() - t0:.1f} s", flush=True)
        for b in sizes:
            key = f"bucketed:{b}"
            # each session is a paired comparison (same processes, alternating rounds); report
            # the median session, by its best-of-rounds ratio
            ratios = [min(r["raw:0"]) / min(r[key]) for r in runs]
            med = runs[sorted(range(sessions), key=lambda i: ratios[i])[sessions // 2]]
            raw, t = min(med["raw:0"]), min(med[key])
            per_session = ", ".join(f"{x:.2f}" for x in ratios)
            times = {k: [x for r in runs for x in r[k]] for k in runs[0]}
            plan = plan_buckets(manifest, b, direct_bytes_for("gloo"))
            n_packed = sum(len(bk) > 1 for bk in plan)
            rows.append({
                "name": f"weight sync, bucketed ({b >> 20} MB) / raw broadcast, {n_recv} receiver(s)",
                "value": round(nbytes / t / 1e6, 1), "baseline": round(nbytes / raw / 1e6, 1),
                "ratio": round(raw / t, 3), "goal": ">= 0.9", "unit": "MB/s",
                "notes": f"Qwen2 payload {params / 1e6:.1f} M params = {nbytes / 1e6:.0f} MB float32, "
                         f"{len(manifest)} tensors in {len(plan)} buckets ({n_packed} packed, <= {b >> 20} MB; tensors "
                         f">= {direct_bytes_for('gloo') >> 10} KiB unpacked); gloo over loopback; best of "
                         f"{rounds} alternating rounds in the median of {sessions} sessions (per session: {per_session}; "
                         f"median of all rounds "
                         f"{statistics.median(times[f'bucketed:{b}']):.3f} vs {statistics.median(times['raw:0']):.3f} s)"})
    return rows


# --------------------------------------------------------------------------- (b) share of a step
def step_share_rows(quick: bool, raw_bytes_per_s: float) -> List[dict]:
    import ray

    from dispo_ray.infra.config import compose
    from dispo_ray.rollout.driver import Trainer
    from dispo_ray.rollout.producer import RolloutProducer

    steps = 3 if quick else 6
    rows: List[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-sync-") as run_dir:
        cfg = compose([f"trainer.run_dir={run_dir}", "trainer.progress_bar=false", "trainer.tensorboard=false"])
        t0 = time.perf_counter()
        trainer = Trainer(cfg)  # actors + the weight-sync group, as `make run` starts them
        print(f"  trainer up in {time.perf_counter() - t0:.1f} s", flush=True)
        try:
            producer = RolloutProducer(cfg, trainer.train_set, trainer.generators, trainer.rewards, trainer.gate,
                                       start_step=0, total_steps=steps + 1)
            t: Dict[str, List[float]] = {"gen": [], "reward": [], "train": [], "sync": [], "samples": []}
            manifest = trainer.learners.weight_manifest()
            for step in range(steps + 1):  # step 0 warms up every path
                batch = producer.collect(step)  # synchronous (max_staleness = 0): on-policy
                metrics = trainer.train_on(batch)
                sync_s = trainer.weight_sync.publish(step + 1)
                trainer.step = step + 1
                if step:
                    t["gen"].append(batch.seconds["timing/generate"])
                    t["reward"].append(batch.seconds["timing/reward"])
                    t["train"].append(metrics.get("timing/train", float("nan")))
                    t["sync"].append(sync_s)
                    t["samples"].append(len(batch.samples))
                print(f"  step {step}: gen {batch.seconds['timing/generate']:.2f} s, reward "
                      f"{batch.seconds['timing/reward']:.2f} s, train {metrics.get('timing/train', 0):.2f} s, "
                      f"sync {sync_s:.3f} s ({len(batch.samples)} samples)", flush=True)
        finally:
            trainer.shutdown()
            ray.shutdown()
    med = {k: statistics.median(v) for k, v in t.items()}
    whole = med["gen"] + med["reward"] + med["train"] + med["sync"]
    nbytes = sum(p.nbytes for p in manifest)
    common = (f"embedded default (tiny Qwen2, {nbytes / 1e6:.2f} MB float32, bucket {cfg.learner.sync_bucket_mb} MB, "
              f"vLLM generator, DeepSpeed ZeRO-{cfg.learner.zero_stage}); median of {steps} synchronous steps "
              f"of ~{med['samples']:.0f} samples after a warm-up step; sync = WeightSync.publish")
    wire_ms = 1e3 * nbytes / raw_bytes_per_s
    common += (f"; at the raw broadcast rate of (a) the payload itself takes ~{wire_ms:.1f} ms, the rest is "
               "per-sync overhead around the broadcast (Ray calls, vLLM collective_rpc, the engine's in-place load)")
    rows.append({"name": "weight sync time / learner train call only (embedded default)",
                 "value": round(med["sync"], 4), "baseline": round(med["train"], 3),
                 "ratio": round(med["sync"] / med["train"], 4), "goal": "-", "unit": "s",
                 "notes": f"{common}; train = Trainer.train_on (LearnerGroup.train_step); informational: "
                          "the goal is on the whole step (DESIGN.md's training step), next row"})
    rows.append({"name": "weight sync time / training step = generate + reward + train + sync (embedded default)",
                 "value": round(med["sync"], 4), "baseline": round(whole, 3),
                 "ratio": round(med["sync"] / whole, 4), "goal": "<= 5%", "unit": "s",
                 "notes": f"{common}; step = generate {med['gen']:.2f} + reward {med['reward']:.2f} + "
                          f"train {med['train']:.2f} + sync {med['sync']:.3f} s"})
    return rows


def main(quick: bool = False) -> List[dict]:
    t0 = time.perf_counter()
    rows = protocol_rows(quick)
    print(f"  (a) done in {time.perf_counter() - t0:.1f} s", flush=True)
    rows += step_share_rows(quick, raw_bytes_per_s=rows[0]["baseline"] * 1e6)  # 1 receiver, raw MB/s
    return rows


if __name__ == "__main__":
    from bench import print_rows

    print_rows(main(quick="--quick" in sys.argv))
