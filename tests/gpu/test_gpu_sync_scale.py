"""Weight sync at real model shapes, one GPU, no vLLM engine: checks (f) and (g) of ``tests/gpu/run.sh``.

(f) host-staging cost: Qwen2.5-7B's tensor shapes (15.2 GB in bf16; the embedding and LM head are
    1.1 GB each, the MLP matrices 136 MB) synced sender process -> receiver process for several
    bucket sizes. A tensor larger than a bucket arrives in pieces and is reassembled through host
    memory or on the device (the receive plan, :func:`dispo_ray.sync.protocol.plan_receive`);
    each bucket size runs once forced through the host and once on the device, so the difference
    is what host staging costs. The receiver copies every tensor into its own copy of the model,
    as an engine's ``load_weights`` does, and both sides' per-tensor fingerprints must agree.
(g) a ZeRO-3 bf16 learner (``LearnerGroup``, one rank) on a Qwen2.5-0.5B-shaped model (random init
    from its config: no download) takes a training step and broadcasts to a receiver process
    over NCCL, bucket by bucket through ``broadcast_weights`` (ZeRO-3 gathers) in the GPU preset's
    buckets (256 MiB: the 272 MB embedding arrives in pieces); the received tensors equal the
    learner's gathered state dict bit for bit.

Both use the two-processes-on-one-GPU set-up of ``test_gpu_weight_sync.py`` (distinct
``NCCL_HOSTID``, socket transport). Under real Ray (``run.sh``) the learner of (g) is a Ray actor
that keeps NCCL's defaults: only the receiver claims another host, which is enough on a node
without InfiniBand (with it, export ``NCCL_IB_DISABLE=1`` before starting the run). ``check_f`` / ``check_g`` take the device, so the GPU kit
(``tests/gpu/kit``) runs them on the lent GPU machine and its CPU test runs them small over gloo.
"""
from __future__ import annotations

import hashlib
import inspect
import time
from typing import Dict, List, Sequence, Tuple

import pytest
import torch

from test_gpu_weight_sync import CTX, _backend, _env, needs_nccl

pytestmark = pytest.mark.gpu

# Qwen2.5 configs (config.json of the Hugging Face repos), for shapes only: models are built from them.
QWEN25_7B = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                 num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768,
                 rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False)
QWEN25_0P5B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                   num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                   rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)
F_BUCKETS_MIB = (32, 256, 1024)


def qwen2_shapes(spec: dict) -> List[Tuple[str, Tuple[int, ...]]]:
    """HF parameter names and shapes of a Qwen2 model (built on the meta device: no memory)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    with torch.device("meta"):
        model = Qwen2ForCausalLM(Qwen2Config(**spec))
    return [(n, tuple(p.shape)) for n, p in model.named_parameters()]


def _fingerprint(t: torch.Tensor) -> Tuple[int, int]:
    """(sum, sum of squares) of the tensor's 16-bit words, on its own device: cheap at 15 GB."""
    x = t.detach().contiguous().view(-1).view(torch.int16).to(torch.int32)
    return int(x.sum()), int((x * x).sum())


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha1(t.detach().contiguous().view(-1).view(torch.uint8).cpu().numpy().tobytes()).hexdigest()


def _plans_supported() -> bool:
    from dispo_ray.sync import protocol as weight_sync
    return hasattr(weight_sync, "ReceivePlan") and "plan" in inspect.signature(weight_sync.receive_weights).parameters


def _schedule(buckets_mib: Sequence[int]) -> List[Tuple[int, str]]:
    """(bucket MiB, reassembly) per sync (no warm-up: a 15 GB sync costs seconds; the group's
    formation already ran NCCL's warm-up all-reduce)."""
    modes = ("host", "device") if _plans_supported() else ("default",)
    return [(b, m) for b in buckets_mib for m in modes]


def _f_tensors(shapes, device: str) -> Dict[str, torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(0)
    return {n: torch.randn(s, generator=g, device=device, dtype=torch.bfloat16) for n, s in shapes}


def _f_sender(port, shapes, schedule, device, q):
    _env("dispo-sender", device)
    try:
        from dispo_ray.sync.protocol import WeightSyncGroup, make_manifest, send_weights
        ts = _f_tensors(shapes, device)
        q.put(("fingerprints", {n: _fingerprint(t) for n, t in ts.items()}))
        manifest = make_manifest(ts.items())
        group = WeightSyncGroup(_backend(device), "127.0.0.1", port, 0, 2, timeout_s=300,
                                device=torch.device("cuda", 0) if device == "cuda" else None, join_timeout_s=300)
        for version, (mib, mode) in enumerate(schedule, 1):
            stats = send_weights(group, manifest, ts, mib << 20, version, ready_timeout_s=300)
            q.put(("sent", mib, mode, stats["sync/seconds"], stats["sync/bytes"]))
        group.close()
    except Exception as e:  # noqa: BLE001 - reported to the parent
        q.put(("error", f"sender: {type(e).__name__}: {e}"))


def _f_receiver(port, shapes, schedule, device, q):
    _env("dispo-receiver", device)
    try:
        from dispo_ray.sync import protocol as ws
        dst = {n: torch.empty(s, dtype=torch.bfloat16, device=device) for n, s in shapes}
        manifest = ws.make_manifest(dst.items())
        group = ws.WeightSyncGroup(_backend(device), "127.0.0.1", port, 1, 2, timeout_s=300,
                                   device=torch.device("cuda", 0) if device == "cuda" else None, join_timeout_s=300)
        for mib, mode in schedule:
            kw = {}
            if mode != "default":
                large = ws.large_tensor_bytes(manifest, mib << 20, ws.direct_bytes_for(group.backend))
                kw["plan"] = ws.ReceivePlan(mode == "device", 0 if mode == "device" else max(large, default=0))
            version, it = ws.receive_weights(group, manifest, mib << 20, **kw)
            staged = 0
            for name, t in it:
                if group.device.type == "cuda" and t.device.type == "cpu":  # reassembled in host memory
                    staged += t.numel() * t.element_size()
                dst[name].copy_(t)  # what an engine's load_weights does
            q.put(("received", mib, mode, version, staged))
        group.close()
        if device == "cuda":
            torch.cuda.synchronize()
        q.put(("fingerprints", {n: _fingerprint(t) for n, t in dst.items()}))
    except Exception as e:  # noqa: BLE001
        q.put(("error", f"receiver: {type(e).__name__}: {e}"))


def _drain(q, procs, timeout_s: float) -> list:
    out, deadline = [], time.monotonic() + timeout_s
    for p in procs:
        p.join(timeout=max(1.0, deadline - time.monotonic()))
    while not q.empty():
        out.append(q.get())
    for p in procs:
        if p.is_alive():
            p.kill()
    return out


def check_f(device: str = "cuda", spec: dict = QWEN25_7B, buckets_mib: Sequence[int] = F_BUCKETS_MIB,
            timeout_s: float = 400) -> dict:
    """(f): seconds per sync for each (bucket size, reassembly); returns them with the bytes staged."""
    from dispo_ray.sync.protocol import find_free_port
    schedule = _schedule(buckets_mib)
    shapes = qwen2_shapes(spec)
    port = find_free_port()
    q_s, q_r = CTX.Queue(), CTX.Queue()
    procs = [CTX.Process(target=_f_sender, args=(port, shapes, schedule, device, q_s)),
             CTX.Process(target=_f_receiver, args=(port, shapes, schedule, device, q_r))]
    for p in procs:
        p.start()
    out_r = _drain(q_r, procs[1:], timeout_s)
    out_s = _drain(q_s, procs[:1], 60)
    errors = [o[1] for o in out_s + out_r if o[0] == "error"]
    assert not errors, errors
    sent = [o for o in out_s if o[0] == "sent"]
    received = [o for o in out_r if o[0] == "received"]
    assert len(sent) == len(received) == len(schedule), (out_s, out_r)
    fp_s = next(o[1] for o in out_s if o[0] == "fingerprints")
    fp_r = next(o[1] for o in out_r if o[0] == "fingerprints")
    assert fp_s == fp_r  # every tensor arrived intact (all syncs carry the same weights)
    rows = []
    for (_, mib, mode, secs, nbytes), (_, _, _, _, staged) in zip(sent, received):
        rows.append({"bucket_mib": mib, "reassembly": mode, "seconds": round(secs, 3),
                     "gbps": round(nbytes / secs / 1e9, 2), "staged_gb": round(staged / 1e9, 2)})
    total = sent[0][4]
    print(f"\n(f) {total / 1e9:.1f} GB per sync ({_backend(device)}, {device}):")
    for r in rows:
        print(f"    bucket {r['bucket_mib']:>5} MiB, {r['reassembly']:>7}: {r['seconds']:7.2f} s  "
              f"{r['gbps']:6.2f} GB/s  {r['staged_gb']:5.2f} GB via host")
    return {"gb_per_sync": round(total / 1e9, 2), "rows": rows}


def _g_receiver(host, port, manifest, bucket_bytes, syncs, device, q):
    _env("dispo-receiver", device)
    try:
        from dispo_ray.sync.protocol import WeightSyncGroup, receive_weights
        group = WeightSyncGroup(_backend(device), host, port, 1, 2, timeout_s=300,
                                device=torch.device("cuda", 0) if device == "cuda" else None, join_timeout_s=600)
        for _ in range(syncs):
            version, it = receive_weights(group, manifest, bucket_bytes)
            q.put(("ok", version, {name: _digest(t) for name, t in it}))
        group.close()
    except Exception as e:  # noqa: BLE001
        q.put(("error", f"receiver: {type(e).__name__}: {e}"))


def _gpu_preset(group: str, key: str, default):
    """A value of conf/preset/gpu.yaml (the GPU runs' defaults), ``default`` without the preset."""
    import os

    from omegaconf import OmegaConf

    from dispo_ray.infra.config import CONF_DIR
    path = os.path.join(CONF_DIR, "preset", "gpu.yaml")
    if not os.path.isfile(path):
        return default
    return OmegaConf.select(OmegaConf.load(path), f"{group}.{key}", default=default)


def _batch(n: int, prompt: int, resp: int, vocab: int):
    from test_gpu_learner import _batch as batch
    return batch(n, prompt, resp, vocab)


def check_g(tmp_path, device: str = "cuda", spec: dict = QWEN25_0P5B, syncs: int = 2) -> dict:
    """(g): ZeRO-3 bf16 learner -> receiver process, every tensor bit-exact; returns GB/s."""
    import ray
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from actors.learner_group import LearnerGroup
    from dispo_ray.infra.config import compose
    from dispo_ray.sync.settings import SyncSettings

    _env("dispo-sender", device)  # the learner's process (in the GPU kit, this one)
    path = str(tmp_path / "qwen2-shaped")
    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(**spec)).to(torch.bfloat16).save_pretrained(path)  # random init, no download
    gpus = 1 if device == "cuda" else 0
    overrides = [f"learner.num_actors=1", f"learner.num_gpus_per_actor={gpus}", "learner.num_cpus_per_actor=1",
                 "learner.zero_stage=3", "model.dtype=bfloat16", "learner.micro_batch_size=4",
                 f"model.cache_dir={tmp_path}/cache"]
    if device == "cuda":  # the GPU runs' bucket size (+preset=gpu), where the embedding exceeds a bucket
        overrides.append(f"learner.sync_bucket_mb={_gpu_preset('learner', 'sync_bucket_mb', 256)}")
    cfg = compose(overrides)
    t0 = time.perf_counter()
    group = LearnerGroup(cfg, model_path=path)
    proc = None
    try:
        assert group.info[0]["zero_stage"] == 3
        setup_s = time.perf_counter() - t0
        metrics = group.train_step(_batch(8, 16, 16, spec["vocab_size"]))
        manifest = group.weight_manifest()
        bucket_bytes = cfg.learner.sync_bucket_mb << 20
        host, port = group.weight_sync_endpoint()
        q = CTX.Queue()
        proc = CTX.Process(target=_g_receiver, args=(host, port, manifest, bucket_bytes, syncs, device, q))
        proc.start()
        settings = SyncSettings(host, port, 2, manifest, bucket_bytes, cfg.learner.sync_timeout_s, _backend(device))
        ray.get(group.init_weight_sync(settings, wait=False), timeout=600)
        stats = [group.broadcast_weights(v) for v in range(1, syncs + 1)]
        proc.join(timeout=300)
        out = []
        while not q.empty():
            out.append(q.get())
        assert [o[0] for o in out] == ["ok"] * syncs, out
        assert [o[1] for o in out] == list(range(1, syncs + 1))
        sent = {n: _digest(t) for n, t in group.hf_state_dict().items()}
        assert set(sent) == {p.name for p in manifest}
        for _, _, got in out:
            assert got == sent  # bit-exact, every tensor
        gbps = stats[-1]["sync/bytes"] / stats[-1]["sync/seconds"] / 1e9
        n_params = sum(int(torch.tensor(p.shape).prod()) for p in manifest)
        print(f"\n(g) ZeRO-3 bf16 learner, {n_params / 1e6:.0f}M params, {stats[-1]['sync/bytes'] / 2**20:.0f} MiB in "
              f"{int(stats[-1]['sync/buckets'])} buckets of {cfg.learner.sync_bucket_mb} MiB: {gbps:.2f} GB/s warm "
              f"({stats[0]['sync/bytes'] / stats[0]['sync/seconds'] / 1e9:.2f} cold), bit-exact; setup {setup_s:.0f}s")
        return {"params_m": round(n_params / 1e6), "gbps_warm": round(gbps, 2), "bucket_mib": cfg.learner.sync_bucket_mb,
                "loss": metrics["actor/loss"], "setup_s": round(setup_s, 1)}
    finally:
        try:
            group.close_weight_sync()
        finally:
            group.shutdown()
            if proc is not None and proc.is_alive():
                proc.kill()


@needs_nccl
def test_f_host_staging_cost_at_qwen25_7b_shapes():
    check_f("cuda")


@needs_nccl
def test_g_zero3_bf16_learner_broadcasts_over_nccl_bit_exact(ray_cluster, tmp_path):
    check_g(tmp_path, "cuda")
