"""The bucketed weight-sync protocol over a real gloo group between processes."""
from __future__ import annotations

import multiprocessing as mp
import time

import pytest
import torch

from dispo_ray.weight_sync import (ParamSpec, SyncSender, WeightSyncError, WeightSyncGroup, bucket_nbytes,
                                   direct_bytes_for, find_free_port, make_manifest, pack, plan_buckets, receive_weights,
                                   send_weights, unpack)

CTX = mp.get_context("spawn")


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
        q.put(("ok", version, out))
    except Exception as e:  # report the error text to the test
        q.put(("error", type(e).__name__, str(e)))


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
    results = [q.get(timeout=60) for _ in procs]
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
        q.put((version, {name: t.clone() for name, t in it}))


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
    got = [q.get(timeout=60) for _ in sent]
    proc.join(timeout=30)
    staging = group._staging
    assert set(staging) == {0, 1} and all(b.numel() <= 4096 for b in staging.values())
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
            assert not sender._in_flight  # finished, not just started
        for t in tensors:
            t.fill_(0)
    sender.end()
    status, version, out = q.get(timeout=60)
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
    status, kind, msg = q.get(timeout=30)
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
