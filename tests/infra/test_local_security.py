"""A local run keeps its doors closed (docs/security.md), checked with real sockets on a real local
Ray (the session's ``ray.init``, as ``make run`` starts it) and a real weight-sync group (a DeepSpeed
learner and an ``hf`` generator actor joined by a :class:`dispo_ray.sync.coordinator.WeightSync`, as
the loop does):

* Ray's token authentication is on: a client without the token, or with a wrong one, is refused by
  GCS; the same call with the local token succeeds.
* Everything the sync group opened listens on loopback only: its store port answers on 127.0.0.1
  and refuses a connection on this machine's non-loopback address (``ip -4 addr``).
* The DeepSpeed learner world's own rendezvous store does too (``actors/learner.py`` builds it on the
  sync transport's bound socket, ``dispo_ray.sync.net.bound_store``).
"""
from __future__ import annotations

import ipaddress
import os
import socket
import subprocess
import sys

import psutil
import pytest

from conftest import call_on
from dispo_ray.infra.config import compose


def _non_loopback_ipv4() -> str:
    out = subprocess.run(["ip", "-4", "-o", "addr", "show", "scope", "global"], capture_output=True, text=True).stdout
    addrs = [line.split()[3].split("/")[0] for line in out.splitlines() if len(line.split()) > 3]
    if not addrs:
        pytest.skip("this machine has no non-loopback IPv4 address to probe from")
    return addrs[0]


def _loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def _listening(pids: list) -> set:
    return {(pid, c.laddr.ip, c.laddr.port) for pid in pids
            for c in psutil.Process(pid).net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=5):
            return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def sync_run(ray_cluster, tmp_path_factory):
    """Pools up, listening sockets of their processes recorded (learner rank 0 first), then the
    sync group formed by the weight sync's owner."""
    from actors.generator import GeneratorPool
    from actors.learner_group import LearnerGroup
    from dispo_ray.sync.coordinator import WeightSync
    from dispo_ray.tiny.model import build_tiny_model

    cfg = compose(["generator.backend=hf", f"model.cache_dir={tmp_path_factory.mktemp('model')}",
                   "learner.num_actors=1", "generator.num_actors=1", "learner.sync_bucket_mb=1"])
    path = build_tiny_model(cfg.model)
    generators, learners = GeneratorPool(cfg, path), LearnerGroup(cfg, path)
    try:
        sync = WeightSync(cfg, learners, generators)
        pids = call_on(learners.actors[:1] + generators.actors, lambda _: os.getpid())
        before = _listening(pids)
        sync.connect()
        yield sync, pids, before, _listening(pids)
    finally:
        generators.shutdown()
        learners.shutdown()


def test_local_ray_refuses_a_client_without_the_token(ray_cluster, tmp_path):
    import ray
    from ray._raylet import AuthenticationMode, get_authentication_mode

    assert get_authentication_mode() == AuthenticationMode.TOKEN  # the local run kept Ray's default
    assert os.environ.get("RAY_AUTH_MODE") != "disabled"
    gcs = ray.get_runtime_context().gcs_address
    probe = (f"from ray._raylet import GcsClient\n"
             f"print('KEYS', len(GcsClient(address={gcs!r}).internal_kv_keys(b'', None, timeout=10)))")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env["HOME"] = str(tmp_path)  # no ~/.ray/auth_token either
    from ray._raylet import AuthenticationTokenLoader
    token = AuthenticationTokenLoader.instance().get_token_for_http_header()["authorization"].split()[-1]
    results = {}
    for name, extra in (("none", {}), ("wrong", {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64}),
                        ("right", {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token})):
        p = subprocess.run([sys.executable, "-c", probe], env={**env, **extra}, capture_output=True, text=True, timeout=120)
        results[name] = (p.returncode, p.stdout + p.stderr[-1500:])
    for name in ("none", "wrong"):
        assert results[name][0] != 0 and "InvalidAuthToken" in results[name][1], (name, results[name][1])
    assert results["right"][0] == 0 and "KEYS" in results["right"][1], results["right"][1]


def test_weight_sync_ports_listen_on_loopback_only(sync_run):
    sync, pids, before, after = sync_run
    host, store_port = sync.readiness.address
    assert host == "127.0.0.1"  # the driver's gate dials rank 0's host: loopback in a local run
    assert (sync.settings.host, sync.settings.port) == (host, store_port)
    opened = after - before
    ports = {port for _, _, port in opened}
    assert store_port in ports, (store_port, sorted(opened))  # the rendezvous itself
    assert len(opened) >= 2, sorted(opened)  # and the gloo device of each rank
    wide = sorted(s for s in opened if not _loopback(s[1]))
    assert not wide, f"listening beyond loopback (pid, address, port): {wide}"
    # real connections: the store answers on loopback, and refuses on this machine's other address
    other = _non_loopback_ipv4()
    assert _reachable("127.0.0.1", store_port)
    for _, _, port in sorted(opened):
        assert not _reachable(other, port), f"port {port} answers on {other}"
    # the group still works over loopback
    sync.publish(1)
    assert sync.generators.versions() == [1]


def test_learner_world_rendezvous_listens_on_loopback_only(sync_run):
    sync, pids, before, _ = sync_run
    host, port = sync.learners.master  # rank 0's answer, published to every learner rank
    assert host == "127.0.0.1"
    rank0 = {(ip, p) for pid, ip, p in before if pid == pids[0]}
    store = sorted(ip for ip, p in rank0 if p == port)
    assert store, (port, sorted(rank0))  # learner rank 0 hosts the world's store while the world lives
    assert all(_loopback(ip) for ip in store), f"the learner world's store listens on {store}"
    assert _reachable("127.0.0.1", port) and not _reachable(_non_loopback_ipv4(), port)


def test_nothing_in_the_project_switches_ray_auth_off():
    """Ray's token auth stays on: no code, Makefile target, config or deploy file sets RAY_AUTH_MODE=disabled."""
    import re
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    files = [p for d in ("dispo_ray", "actors", "conf", "deploy", "docker", "bench") for p in (repo / d).rglob("*")
             if p.is_file() and p.suffix in (".py", ".yaml", ".yml", ".sh", ".tpl", ".json", "")]
    files.append(repo / "Makefile")
    assert len(files) > 20
    off = re.compile(r"""RAY_AUTH_MODE["']?\]?\s*[:=,]\s*\{?\s*(value:\s*)?["']?disabled""")
    hits = [str(p.relative_to(repo)) for p in files if off.search(p.read_text(errors="ignore"))]
    assert not hits, hits
    assert off.search('env["RAY_AUTH_MODE"] = "disabled"') and off.search("- {name: RAY_AUTH_MODE, value: disabled}")
