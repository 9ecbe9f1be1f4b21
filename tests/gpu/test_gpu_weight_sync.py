"""NCCL weight sync on one GPU, no Ray: checks (a) and (d) of ``tests/gpu/run.sh``.

The sender (learner side, :func:`send_weights`) and the receiver (:func:`receive_weights`, CUDA
buffers) run in two spawned processes on the same device. NCCL refuses two ranks on one GPU of
one host ("Duplicate GPU detected") unless they claim different hosts: each process gets its own
``NCCL_HOSTID``, and with P2P and SHM off the ranks talk over the socket transport.

(a) bit-exact transfer (bf16 and fp32, one tensor larger than a bucket, so it travels in pieces
    through host memory), the version stamped by the sender, GB/s printed;
(d) the receiver SIGKILLs itself mid-sync: the sender raises within its timeout, and a group
    re-formed in the same sender process with a fresh receiver syncs correctly (the aborted
    communicator and its stream block nothing).
"""
from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import time

import pytest
import torch

pytestmark = pytest.mark.gpu
CTX = mp.get_context("spawn")
BUCKET = 8 << 20
TIMEOUT = 20.0


def _nccl_usable() -> str:
    """Why NCCL cannot run here ('' if it can)."""
    if not torch.cuda.is_available():
        return "needs a CUDA GPU"
    try:
        from vllm.distributed.device_communicators.pynccl_wrapper import NCCLLibrary
        NCCLLibrary()
    except Exception as e:  # noqa: BLE001 - the CPU build of vLLM has no NCCL
        return f"needs vLLM's CUDA build with a loadable NCCL ({type(e).__name__})"
    return ""


needs_nccl = pytest.mark.skipif(bool(_nccl_usable()), reason=_nccl_usable() or "ok")


def _env(host_id: str) -> None:
    os.environ.update({"NCCL_HOSTID": host_id, "NCCL_P2P_DISABLE": "1", "NCCL_SHM_DISABLE": "1",
                       "NCCL_IB_DISABLE": "1", "NCCL_NET": "Socket"})


def _tensors(big_mb: int, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    ts = {"embed.weight": torch.randn(BUCKET // 64, 64, generator=g, device="cuda").bfloat16(),  # 2 buckets: pieces
          "norm.weight": torch.randn(64, generator=g, device="cuda").bfloat16(),
          "count": torch.arange(7, device="cuda")}
    for i in range(big_mb // 8):  # the throughput payload: 8 MiB fp32 matrices
        ts[f"layer.{i}.w"] = torch.randn(1024, 2048, generator=g, device="cuda")
    return ts


def _digest(ts) -> dict:
    return {n: hashlib.sha1(t.detach().contiguous().view(-1).view(torch.uint8).cpu().numpy().tobytes()).hexdigest()
            for n, t in ts.items()}


def _receiver(port, big_mb, q, die_after=None):
    _env("dispo-receiver")
    try:
        from dispo_ray.infra.weight_sync import WeightSyncGroup, make_manifest, receive_weights
        group = WeightSyncGroup("nccl", "127.0.0.1", port, 1, 2, timeout_s=TIMEOUT, device=torch.device("cuda", 0),
                                join_timeout_s=120)
        manifest = make_manifest(_tensors(big_mb).items())  # same names/shapes/dtypes as the sender
        for _ in range(2):  # a cold and a warm sync
            version, it = receive_weights(group, manifest, BUCKET)
            got = {}
            for i, (name, t) in enumerate(it):
                if die_after is not None and i >= die_after:
                    os.kill(os.getpid(), 9)  # SIGKILL mid-sync
                got[name] = t.clone()
            q.put(("ok", version, _digest(got), {n: str(t.device) for n, t in got.items()}))
        group.close()
    except Exception as e:  # noqa: BLE001
        q.put(("error", type(e).__name__, str(e), {}))


def _sender(ports, big_mb, q):
    _env("dispo-sender")
    from dispo_ray.infra.weight_sync import WeightSyncError, WeightSyncGroup, make_manifest, send_weights
    ts = _tensors(big_mb)
    manifest = make_manifest(ts.items())
    q.put(("digest", _digest(ts)))
    for phase, port in enumerate(ports):
        try:
            group = WeightSyncGroup("nccl", "127.0.0.1", port, 0, 2, timeout_s=TIMEOUT,
                                    device=torch.device("cuda", 0), join_timeout_s=120)
            for version in (3 + phase, 4 + phase):
                t0 = time.monotonic()
                stats = send_weights(group, manifest, ts, BUCKET, version, ready_timeout_s=120)
                q.put(("sent", phase, version, stats["sync/bytes"] / stats["sync/seconds"] / 1e9, stats["sync/bytes"]))
            group.close()
        except WeightSyncError as e:
            q.put(("failed", phase, str(e), time.monotonic() - t0))


def _run(ports, receivers, big_mb):
    q_s, q_r = CTX.Queue(), CTX.Queue()
    sender = CTX.Process(target=_sender, args=(ports, big_mb, q_s))
    sender.start()
    out_r = []
    for port, kw in zip(ports, receivers):
        p = CTX.Process(target=_receiver, args=(port, big_mb, q_r), kwargs=kw)
        p.start()
        p.join(timeout=300)
        while not q_r.empty():
            out_r.append(q_r.get())
    sender.join(timeout=300)
    out_s = []
    while not q_s.empty():
        out_s.append(q_s.get())
    return out_s, out_r


@needs_nccl
def test_a_one_gpu_nccl_sender_and_cuda_receiver_bit_exact():
    out_s, out_r = _run([23000 + os.getpid() % 2000], [{}], big_mb=512)
    sent_digest = out_s[0][1]
    sent = [o for o in out_s if o[0] == "sent"]
    assert len(sent) == 2, out_s
    print(f"\n(a) NCCL on one GPU, socket transport, {sent[-1][4] / 2**20:.0f} MiB: {sent[-1][3]:.2f} GB/s warm "
          f"({sent[0][3]:.2f} cold)")
    assert [o[0] for o in out_r] == ["ok", "ok"], out_r
    assert [o[1] for o in out_r] == [3, 4]  # the versions the sender stamped
    for _, _, digest, devices in out_r:
        assert digest == sent_digest  # bit-exact
        assert devices["layer.0.w"].startswith("cuda") and devices["embed.weight"] == "cpu"  # pieces via host


@needs_nccl
def test_d_receiver_killed_mid_sync_sender_raises_in_time_then_reformed_group_works():
    base = 25000 + os.getpid() % 2000
    out_s, out_r = _run([base, base + 1], [{"die_after": 2}, {}], big_mb=64)
    failed = [o for o in out_s if o[0] == "failed"]
    assert failed and failed[0][1] == 0, out_s  # phase 0: the killed receiver
    print(f"\n(d) sender raised after {failed[0][3]:.1f}s (timeout {TIMEOUT}s): {failed[0][2][:160]}")
    assert failed[0][3] < TIMEOUT + 15 and "version 3" in failed[0][2]
    assert [o[2] for o in out_s if o[0] == "sent" and o[1] == 1] == [4, 5]  # re-formed group: both syncs
    assert [o[1] for o in out_r if o[0] == "ok"] == [4, 5]
    assert all(o[2] == out_s[0][1] for o in out_r if o[0] == "ok")
