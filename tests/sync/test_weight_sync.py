"""The bucketed weight-sync protocol over a real gloo group between processes."""
from __future__ import annotations

import io
import multiprocessing as mp
import time

import pytest
import torch

from dispo_ray.sync.protocol import (ParamSpec, SyncSender, WeightSyncError, WeightSyncGroup, bucket_nbytes,
                                   direct_bytes_for, find_free_port, make_manifest, pack, plan_buckets, receive_weights,
                                   send_weights, unpack)

CTX = mp.get_context("spawn")


def _put(q, obj):
    """Results cross as bytes: a tensor put on a torch queue is shared through a file descriptor
    that vanishes when the child exits, possibly before the parent unpickles it."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    q.put(buf.getvalue())


def _get(q, timeout):
    return torch.load(io.BytesIO(q.get(timeout=timeout)), weights_only=False)


def _tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"embed.weight": torch.randn(50, 16, generator=g),
            "layer.0.norm": torch.randn(16, generator=g).to(torch.bfloat16),
            "layer.0.w": torch.randn(16, 33, generator=g),
            "layer.0.count": torch.arange(7, dtype=torch.int64),
            "head.bias": torch.randn(3, generator=g)}


def _receiver(port, rank, world, bucket_bytes, q, drop_last=False, die_after=None, direct_bytes=None):
    try:
        group = WeightSyncGroup("gloo", "127.0.0.1", port, rank, world, timeout_s=5)
        specs = make_manifest(_tensors().items())
        if drop_last:
            specs = specs[:-1]
        version, it = receive_weights(group, specs, bucket_bytes, direct_bytes)
        out = {}
        for i, (name, t) in enumerate(it):
            if die_after is not None and i >= die_after:
                import os
                os._exit(1)  # a peer dying mid-sync
            out[name] = t.clone()
        _put(q, ("ok", version, out))
    except Exception as e:  # report the error text to the test
        _put(q, ("error", type(e).__name__, str(e)))


def test_plan_pack_unpack_roundtrip_alignment():
    ts = _tensors(3)
    man = make_manifest(ts.items())
    assert man[1] == ParamSpec("layer.0.norm", (16,), "bfloat16")
    buckets = plan_buckets(man, bucket_bytes=2048)
    assert [p.name for b in buckets for p in b] == [p.name for p in man]  # manifest order kept
    assert all(bucket_nbytes(b) <= 2048 or len(b) == 1 for b in buckets)
    assert len(buckets[0]) == 1  # the 3200-byte embedding exceeds the bucket: alone
    for b in buckets:
        flat = pack([ts[p.name] for p in b])
        for name, t in unpack(flat, b):
            assert torch.equal(t, ts[name]) and t.dtype == ts[name].dtype
    with pytest.raises(ValueError):
        plan_buckets(man, 0)
    # direct_bytes: a tensor of >= 2000 bytes gets its own bucket even when it would fit one
    direct = plan_buckets(man, bucket_bytes=1 << 20, direct_bytes=2000)
    assert [[p.name for p in b] for b in direct] == [
        ["embed.weight"], ["layer.0.norm"], ["layer.0.w"], ["layer.0.count", "head.bias"]]
    assert len(plan_buckets(man, bucket_bytes=1 << 20)) == 1
    assert direct_bytes_for("gloo") == 256 << 10 and direct_bytes_for("nccl") == 0


@pytest.mark.parametrize("bucket_bytes,direct_bytes", [(256, None), (1 << 20, None), (1 << 20, 64)])
def test_broadcast_to_two_receivers_is_bit_exact(bucket_bytes, direct_bytes):
    # (1 MiB, 64): every tensor but the 12-byte bias goes unpacked, several in flight at once
    port, q = find_free_port(), CTX.Queue()
    procs = [CTX.Process(target=_receiver, args=(port, r, 3, bucket_bytes, q),
                         kwargs={"direct_bytes": direct_bytes}) for r in (1, 2)]
    for p in procs:
        p.start()
    ts = _tensors()
    group = WeightSyncGroup("gloo", "127.0.0.1", port, 0, 3, timeout_s=30)
    stats = send_weights(group, make_manifest(ts.items()), ts, bucket_bytes, version=11,
                         direct_bytes=direct_bytes)
    results = [_get(q, timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    expected_buckets = len(plan_buckets(make_manifest(ts.items()), bucket_bytes, direct_bytes or 0))
    assert stats["sync/buckets"] == expected_buckets and stats["sync/bytes"] > 0
    for status, version, out in results:
        assert status == "ok" and version == 11
        assert list(out) == list(ts)
        for k in ts:
            assert torch.equal(out[k], ts[k])


def _multi_receiver(port, rank, world, bucket_bytes, rounds, q):
    group = WeightSyncGroup("gloo", "127.0.0.1", port, rank, world, timeout_s=30)
    specs = make_manifest(_tensors().items())
    for _ in range(rounds):
        version, it = receive_weights(group, specs, bucket_bytes)
        _put(q, (version, {name: t.clone() for name, t in it}))


def test_successive_syncs_reuse_staging_without_stale_bytes():
    # 4 KiB buckets: two packed buckets per sync ([embed, norm], [w, count, bias]), so both
    # staging slots are reused across syncs; every version must arrive exactly as sent.
    port, q = find_free_port(), CTX.Queue()
    proc = CTX.Process(target=_multi_receiver, args=(port, 1, 2, 4096, 3, q))
    proc.start()
    group = WeightSyncGroup("gloo", "127.0.0.1", port, 0, 2, timeout_s=30)
    sent = {v: _tensors(seed=v) for v in (5, 6, 7)}
    for v, ts in sent.items():
        send_weights(group, make_manifest(ts.items()), ts, 4096, version=v)
    got = [_get(q, timeout=60) for _ in sent]
    proc.join(timeout=30)
    staging = group.staging_slots()
    assert set(staging) == {0, 1} and all(n <= 4096 for n in staging.values())
    for version, out in got:
        for k, t in sent[version].items():
            assert torch.equal(out[k], t), (version, k)
    out = torch.full((64,), 7, dtype=torch.uint8)
    flat = pack([torch.ones(3), torch.zeros(2)], out=out)
    assert flat.data_ptr() == out.data_ptr() and flat.numel() == 16 + 8
    with pytest.raises(ValueError, match="out has 8 bytes"):
        pack([torch.ones(3)], out=torch.empty(8, dtype=torch.uint8))


def test_unstable_sender_puts_each_unpacked_tensor_on_the_wire_before_returning():
    # ZeRO-3's case: the caller releases each gathered tensor as soon as send_bucket returns
    # (here: overwrites it); receivers must still get what was sent
    port, q = find_free_port(), CTX.Queue()
    proc = CTX.Process(target=_receiver, args=(port, 1, 2, 1 << 20, q), kwargs={"direct_bytes": 64})
    proc.start()
    ts = _tensors()
    sent = {k: t.clone() for k, t in ts.items()}
    group = WeightSyncGroup("gloo", "127.0.0.1", port, 0, 2, timeout_s=30)
    sender = SyncSender(group, make_manifest(ts.items()), 1 << 20, stable=False, direct_bytes=64)
    assert sum(len(b) == 1 for b in sender.buckets) == 3  # embed, norm (alone between two), w
    sender.begin(version=9)
    for bucket in sender.buckets:
        tensors = [ts[p.name] for p in bucket]
        sender.send_bucket(tensors)
        if len(bucket) == 1:
            assert sender.in_flight == 0  # finished, not just started
        for t in tensors:
            t.fill_(0)
    sender.end()
    status, version, out = _get(q, timeout=60)
    proc.join(timeout=30)
    assert status == "ok" and version == 9
    for k in sent:
        assert torch.equal(out[k], sent[k]), k


def test_manifest_mismatch_fails_loudly_on_both_sides():
    port, q = find_free_port(), CTX.Queue()
    p = CTX.Process(target=_receiver, args=(port, 1, 2, 1 << 20, q, True))
    p.start()
    ts = _tensors()
    group = WeightSyncGroup("gloo", "127.0.0.1", port, 0, 2, timeout_s=30)
    with pytest.raises(WeightSyncError, match="manifests differ"):
        send_weights(group, make_manifest(ts.items()), ts, 1 << 20, version=3)
    status, kind, msg = _get(q, timeout=30)
    p.join(timeout=30)
    assert status == "error" and kind == "WeightSyncError" and "manifests differ" in msg


def test_peer_dying_mid_sync_raises_within_timeout():
    port, q = find_free_port(), CTX.Queue()
    p = CTX.Process(target=_receiver, args=(port, 1, 2, 256, q, False, 1))
    p.start()
    ts = _tensors()
    group = WeightSyncGroup("gloo", "127.0.0.1", port, 0, 2, timeout_s=5)
    t0 = time.monotonic()
    # the sender notices in a bucket's broadcast or, when the last buckets already sat in TCP
    # buffers as the peer died, in the completion collective; either names version and rank
    with pytest.raises(WeightSyncError, match=r"(bucket \d+/\d+|completion) .*version 4.*rank 0/2"):
        send_weights(group, make_manifest(ts.items()), ts, 256, version=4)
    assert time.monotonic() - t0 < 5 + 10
    p.join(timeout=30)


def test_join_timeout_when_no_peer_arrives():
    t0 = time.monotonic()
    with pytest.raises(WeightSyncError, match="joining the group failed"):
        WeightSyncGroup("gloo", "127.0.0.1", find_free_port(), 0, 2, timeout_s=2)
    assert time.monotonic() - t0 < 15


# ------------------------------------------------------------------ GPU-path logic, through gloo
def test_one_backend_decision_and_device_choice():
    from types import SimpleNamespace as NS

    from dispo_ray.infra.devices import cuda_index_of, learner_world_timeout_s, sync_backend
    cfg = lambda lg, gg: NS(learner=NS(num_gpus_per_actor=lg), generator=NS(num_gpus_per_actor=gg))  # noqa: E731
    assert sync_backend(cfg(1, 1)) == "nccl" and sync_backend(cfg(0, 0)) == "gloo"
    assert sync_backend(cfg(0, 1)) == "gloo" and sync_backend(cfg(1, 0)) == "gloo"  # one CUDA side: host staging
    assert cuda_index_of(3, "3") == 0  # Ray narrowed CUDA_VISIBLE_DEVICES (its default)
    assert cuda_index_of("5", "4,5,6") == 1  # RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES=1
    assert cuda_index_of(2, None) == 2
    with pytest.raises(RuntimeError, match="not in CUDA_VISIBLE_DEVICES"):
        cuda_index_of(7, "0,1")
    for t in (1, 120, 600):  # ZeRO-3 ranks waiting in a gather outlast rank 0's sync deadline
        assert learner_world_timeout_s(t) > t + 30


def _join(port, backend, q):
    try:  # an explicit device: nothing touches CUDA before the handshake refuses the pairing
        WeightSyncGroup(backend, "127.0.0.1", port, 1, 2, timeout_s=5, device=torch.device("cuda", 0))
        _put(q, "joined")
    except Exception as e:
        _put(q, f"{type(e).__name__}: {e}")


def test_backend_mismatch_fails_at_formation_with_one_line_on_both_sides():
    port, q = find_free_port(), CTX.Queue()
    p = CTX.Process(target=_join, args=(port, "nccl", q))
    p.start()
    with pytest.raises(WeightSyncError, match="backend mismatch: rank 0 speaks gloo, rank 1 speaks nccl") as err:
        WeightSyncGroup("gloo", "127.0.0.1", port, 0, 2, timeout_s=5, join_timeout_s=60)
    other = _get(q, timeout=60)
    p.join(timeout=30)
    assert "\n" not in str(err.value)
    assert other.startswith("WeightSyncError") and "rank 1 speaks nccl, rank 0 speaks gloo" in other


def test_disabled_communicator_is_refused(monkeypatch):
    from types import SimpleNamespace as NS

    from dispo_ray.sync.nccl import check_communicator
    monkeypatch.setenv("VLLM_DISABLE_PYNCCL", "1")  # read by vLLM's envs, as PyNcclCommunicator does
    with pytest.raises(WeightSyncError, match="disabled .*VLLM_DISABLE_PYNCCL"):
        check_communicator(NS(disabled=True), 3)
    check_communicator(NS(disabled=False), 3)
    check_communicator(NS(disabled=True), 1)  # a world of one moves nothing anyway


class _Event:
    def __init__(self, done):
        self.done = done

    def query(self):
        return self.done


def test_nccl_handle_waits_for_its_own_collective_only_and_a_timeout_breaks_the_group():
    from dispo_ray.sync.transport import NcclWork
    # the NCCL wait logic without a GPU: an nccl rank that never joined, waiting on handles
    g = WeightSyncGroup("nccl", "127.0.0.1", 0, 0, 2, timeout_s=0.3, device=torch.device("cpu"), join=False)
    first, later = NcclWork(_Event(True)), NcclWork(_Event(False))  # bucket k done, k+1 still running
    t0 = time.monotonic()
    g.wait(first, "bucket 0")
    assert time.monotonic() - t0 < 0.1
    with pytest.raises(TimeoutError, match="bucket 1 timed out"):
        g.wait(later, "bucket 1")
    with pytest.raises(WeightSyncError, match="unusable .*bucket 1"):
        g.wait(first, "bucket 2")


def test_formation_deadline_bounds_a_call_that_never_returns():
    from dispo_ray.sync.transport import run_with_deadline
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="ncclCommInitRank did not finish within 0.5s"):
        run_with_deadline(lambda: time.sleep(60), 0.5, "ncclCommInitRank")
    assert time.monotonic() - t0 < 2
    assert run_with_deadline(lambda: 7, 5, "quick") == 7


def _late_receiver(port, rank, world, busy_s, q):
    group = WeightSyncGroup("gloo", "127.0.0.1", port, rank, world, timeout_s=1, join_timeout_s=60)
    time.sleep(busy_s)  # a long generation before update_weights runs
    version, it = receive_weights(group, make_manifest(_tensors().items()), 1024)
    _put(q, (rank, version, {n: t.clone() for n, t in it}))


def test_no_sync_deadline_runs_while_a_receiver_is_still_busy():
    # sync timeout 1 s; receiver 2 starts receiving 3 s after receiver 1: neither the sender nor
    # the early receiver may time out meanwhile, and a later sync is unaffected
    port, q = find_free_port(), CTX.Queue()
    procs = [CTX.Process(target=_late_receiver, args=(port, r, 3, busy, q)) for r, busy in ((1, 0.0), (2, 3.0))]
    for p in procs:
        p.start()
    ts = _tensors()
    group = WeightSyncGroup("gloo", "127.0.0.1", port, 0, 3, timeout_s=1, join_timeout_s=60)
    t0 = time.monotonic()
    stats = send_weights(group, make_manifest(ts.items()), ts, 1024, version=5)
    waited = time.monotonic() - t0
    got = [_get(q, timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    assert waited > 2.5 and stats["sync/seconds"] < 1  # the wait was readiness, not a collective
    for _, version, out in got:
        assert version == 5 and all(torch.equal(out[k], ts[k]) for k in ts)


def _aborted_receiver(port, q):
    group = WeightSyncGroup("gloo", "127.0.0.1", port, 1, 2, timeout_s=1, join_timeout_s=60)
    t0 = time.monotonic()
    try:
        receive_weights(group, make_manifest(_tensors().items()), 1024)
        _put(q, "received")
    except WeightSyncError as e:
        _put(q, (str(e), time.monotonic() - t0))


def test_driver_gate_sees_readiness_and_its_abort_releases_waiting_receivers():
    from dispo_ray.sync.protocol import SyncGate
    port, q = find_free_port(), CTX.Queue()
    p = CTX.Process(target=_aborted_receiver, args=(port, q))
    p.start()
    group = WeightSyncGroup("gloo", "127.0.0.1", port, 0, 2, timeout_s=1, join_timeout_s=60)
    gate = SyncGate("127.0.0.1", port, receivers=1)
    assert gate.wait_ready() == 0  # the receiver is waiting for the start (longer than its timeout)
    time.sleep(1.5)
    gate.abort("learner failed")
    msg, waited = _get(q, timeout=30)
    p.join(timeout=30)
    assert "aborted before it started (abort: learner failed)" in msg and waited > 1.4
    group.close()


def test_sync_settings_cross_an_rpc_as_plain_values():
    # vLLM's RPC to a separate engine process serializes plain values only (tuples may come back as
    # lists): the worker rebuilds the same settings, and the manifest the same ParamSpecs
    import json

    from dispo_ray.sync.settings import SyncSettings
    specs = make_manifest(_tensors().items())
    settings = SyncSettings("127.0.0.1", 1234, 3, specs, 4096, 5.0, "gloo")
    wire = json.loads(json.dumps(settings.to_wire()))
    assert SyncSettings.from_wire(wire) == settings and settings.specs() == specs
    with pytest.raises(ValueError, match="gloo or nccl"):
        SyncSettings("127.0.0.1", 1234, 3, specs, 4096, 5.0, "mpi")
