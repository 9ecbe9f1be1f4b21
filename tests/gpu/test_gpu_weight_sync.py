"""NCCL weight sync on one GPU, no Ray: checks (a) and (d) of ``tests/gpu/run.sh``.

The sender (learner side, :func:`send_weights`) and the receiver (:func:`receive_weights`, CUDA
buffers) run in two spawned processes on the same device. NCCL refuses two ranks on one GPU of
one host ("Duplicate GPU detected") unless they claim different hosts: each process gets its own
``NCCL_HOSTID``, and with P2P and SHM off the ranks talk over the socket transport.

(a) bit-exact transfer (bf16 and fp32, one tensor larger than a bucket, so it travels in pieces),
    the version stamped by the sender, GB/s printed;
(d) the receiver SIGKILLs itself mid-sync: the sender raises within its timeout, and a group
    re-formed in the same sender process with a fresh receiver syncs correctly (the aborted
    communicator and its stream block nothing).

:func:`check_a` and :func:`check_d` take the device: ``cuda`` (NCCL, as here) or ``cpu`` (the same
two processes over gloo), so the GPU kit (``tests/gpu/kit``) runs them on the lent GPU machine and
its CPU test runs the same protocol over gloo.
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


def _backend(device: str) -> str:
    return "nccl" if device == "cuda" else "gloo"


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


def _env(host_id: str, device: str = "cuda") -> None:
    if device != "cuda":
        return
    os.environ.update({"NCCL_HOSTID": host_id, "NCCL_P2P_DISABLE": "1", "NCCL_SHM_DISABLE": "1",
                       "NCCL_IB_DISABLE": "1", "NCCL_NET": "Socket"})


def _tensors(big_mb: int, seed: int = 0, device: str = "cuda"):
    g = torch.Generator(device=device).manual_seed(seed)
    ts = {"embed.weight": torch.randn(BUCKET // 64, 64, generator=g, device=device).bfloat16(),  # 2 buckets: pieces
          "norm.weight": torch.randn(64, generator=g, device=device).bfloat16(),
          "count": torch.arange(7, device=device)}
    for i in range(big_mb // 8):  # the throughput payload: 8 MiB fp32 matrices
        ts[f"layer.{i}.w"] = torch.randn(1024, 2048, generator=g, device=device)
    return ts


def _digest(ts) -> dict:
    return {n: hashlib.sha1(t.detach().contiguous().view(-1).view(torch.uint8).cpu().numpy().tobytes()).hexdigest()
            for n, t in ts.items()}


def _receiver(port, big_mb, q, die_after=None, device="cuda", timeout=TIMEOUT):
    _env("dispo-receiver", device)
    try:
        from dispo_ray.sync.protocol import WeightSyncGroup, make_manifest, receive_weights
        group = WeightSyncGroup(_backend(device), "127.0.0.1", port, 1, 2, timeout_s=timeout,
                                device=torch.device("cuda", 0) if device == "cuda" else None, join_timeout_s=120)
        manifest = make_manifest(_tensors(big_mb, device=device).items())  # same names/shapes/dtypes as the sender
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


def _sender(ports, big_mb, q, device="cuda", timeout=TIMEOUT):
    _env("dispo-sender", device)
    from dispo_ray.sync.protocol import WeightSyncError, WeightSyncGroup, make_manifest, send_weights
    ts = _tensors(big_mb, device=device)
    manifest = make_manifest(ts.items())
    q.put(("digest", _digest(ts)))
    t0 = time.monotonic()
    for phase, port in enumerate(ports):
        try:
            group = WeightSyncGroup(_backend(device), "127.0.0.1", port, 0, 2, timeout_s=timeout,
                                    device=torch.device("cuda", 0) if device == "cuda" else None, join_timeout_s=120)
            for version in (3 + phase, 4 + phase):
                t0 = time.monotonic()
                stats = send_weights(group, manifest, ts, BUCKET, version, ready_timeout_s=120)
                q.put(("sent", phase, version, stats["sync/bytes"] / stats["sync/seconds"] / 1e9, stats["sync/bytes"]))
            group.close()
        except WeightSyncError as e:
            q.put(("failed", phase, str(e), time.monotonic() - t0))


def _run(ports, receivers, big_mb, device="cuda", timeout=TIMEOUT):
    q_s, q_r = CTX.Queue(), CTX.Queue()
    sender = CTX.Process(target=_sender, args=(ports, big_mb, q_s), kwargs={"device": device, "timeout": timeout})
    sender.start()
    out_r = []
    for port, kw in zip(ports, receivers):
        p = CTX.Process(target=_receiver, args=(port, big_mb, q_r), kwargs={**kw, "device": device, "timeout": timeout})
        p.start()
        p.join(timeout=300)
        while not q_r.empty():
            out_r.append(q_r.get())
    sender.join(timeout=300)
    out_s = []
    while not q_s.empty():
        out_s.append(q_s.get())
    return out_s, out_r


def check_a(device: str = "cuda", big_mb: int = 512) -> dict:
    """(a): two syncs (cold, warm) of ``big_mb`` MiB + a tensor in pieces, bit-exact; returns GB/s."""
    from dispo_ray.sync.protocol import find_free_port
    out_s, out_r = _run([find_free_port()], [{}], big_mb=big_mb, device=device)
    sent_digest = out_s[0][1]
    sent = [o for o in out_s if o[0] == "sent"]
    assert len(sent) == 2, out_s
    print(f"\n(a) {_backend(device)} on one {device}, {sent[-1][4] / 2**20:.0f} MiB: {sent[-1][3]:.2f} GB/s warm "
          f"({sent[0][3]:.2f} cold)")
    assert [o[0] for o in out_r] == ["ok", "ok"], out_r
    assert [o[1] for o in out_r] == [3, 4]  # the versions the sender stamped
    for _, _, digest, devices in out_r:
        assert digest == sent_digest  # bit-exact
        assert devices["layer.0.w"].startswith(device)  # a bucket that fits lands on the receiver's device
    # where a tensor larger than a bucket was reassembled (the receive plan decides: device or host)
    return {"gbps_warm": sent[-1][3], "gbps_cold": sent[0][3], "mib": sent[-1][4] / 2**20,
            "pieces_on": out_r[-1][3]["embed.weight"]}


def check_d(device: str = "cuda", big_mb: int = 64, timeout: float = TIMEOUT) -> dict:
    """(d): the first receiver SIGKILLs itself mid-sync; the sender raises within its timeout; a
    group re-formed in the same sender process with a fresh receiver then syncs twice, bit-exact."""
    from dispo_ray.sync.protocol import find_free_port
    ports = [find_free_port()]
    while len(ports) < 2:  # two groups, two stores
        ports += [p for p in [find_free_port()] if p != ports[0]]
    out_s, out_r = _run(ports, [{"die_after": 2}, {}], big_mb=big_mb, device=device, timeout=timeout)
    failed = [o for o in out_s if o[0] == "failed"]
    assert failed and failed[0][1] == 0, out_s  # phase 0: the killed receiver
    print(f"\n(d) sender raised after {failed[0][3]:.1f}s (timeout {timeout}s): {failed[0][2][:160]}")
    assert failed[0][3] < timeout + 15 and "version 3" in failed[0][2]
    assert [o[2] for o in out_s if o[0] == "sent" and o[1] == 1] == [4, 5]  # re-formed group: both syncs
    assert [o[1] for o in out_r if o[0] == "ok"] == [4, 5]
    assert all(o[2] == out_s[0][1] for o in out_r if o[0] == "ok")
    return {"raised_after_s": failed[0][3], "timeout_s": timeout, "error": failed[0][2][:160]}


@needs_nccl
def test_a_one_gpu_nccl_sender_and_cuda_receiver_bit_exact():
    check_a("cuda")


@needs_nccl
def test_d_receiver_killed_mid_sync_sender_raises_in_time_then_reformed_group_works():
    check_d("cuda")
