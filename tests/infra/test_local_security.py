"""A local run keeps its doors closed (docs/security.md), checked with real sockets on a real local
Ray (the session's ``ray.init``, as ``make run`` starts it) and a real weight-sync group (a DeepSpeed
learner and an ``hf`` generator actor joined by ``Trainer.connect_weight_sync``, as the loop does):

* Ray's token authentication is on: a client without the token, or with a wrong one, is refused by
  GCS; the same call with the local token succeeds.
* Everything the sync group opened listens on loopback only: its store port answers on 127.0.0.1
  and refuses a connection on this machine's non-loopback address (``ip -4 addr``).
"""
from __future__ import annotations

import ipaddress
import os
import socket
import subprocess
import sys
import threading

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
    """Pools up, listening sockets of their processes recorded, then the sync group formed."""
    from actors.generator import GeneratorPool
    from actors.learner_group import LearnerGroup
    from dispo_ray.tiny.model import build_tiny_model
    from dispo_ray.rollout.driver import Trainer
    from dispo_ray.rollout.staleness import StalenessGate

    cfg = compose(["generator.backend=hf", f"model.cache_dir={tmp_path_factory.mktemp('model')}",
                   "learner.num_actors=1", "generator.num_actors=1", "learner.sync_bucket_mb=1"])
    path = build_tiny_model(cfg.model)
    t = Trainer.__new__(Trainer)  # the sync path only, as tests/sync_trainer.py
    t.cfg, t.step, t.version, t._sync_lock = cfg, 0, 0, threading.RLock()
    t.gate = StalenessGate(0, version=0)
    t.generators, t.learners = GeneratorPool(cfg, path), LearnerGroup(cfg, path)
    try:
        pids = call_on(t.learners.actors[:1] + t.generators.actors, lambda _: os.getpid())
        before = _listening(pids)
        t.connect_weight_sync()
        yield t, pids, before, _listening(pids)
    finally:
        t.shutdown()


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
    trainer, pids, before, after = sync_run
    store = trainer._sync_gate._store
    assert store.host == "127.0.0.1"  # the driver's gate dials rank 0's host: loopback in a local run
    opened = after - before
    ports = {port for _, _, port in opened}
    assert store.port in ports, (store.port, sorted(opened))  # the rendezvous itself
    assert len(opened) >= 2, sorted(opened)  # and the gloo device of each rank
    wide = sorted(s for s in opened if not _loopback(s[1]))
    assert not wide, f"listening beyond loopback (pid, address, port): {wide}"
    # real connections: the store answers on loopback, and refuses on this machine's other address
    other = _non_loopback_ipv4()
    assert _reachable("127.0.0.1", store.port)
    for _, _, port in sorted(opened):
        assert not _reachable(other, port), f"port {port} answers on {other}"
    # the group still works over loopback
    trainer.sync_weights(1)
    assert trainer.generators.versions() == [1]


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
