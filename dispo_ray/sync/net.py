"""Where the weight-sync group meets: ports, the rendezvous host, and a ``TCPStore`` that listens
on that host only (docs/security.md). Also used by the learner world's own rendezvous
(:mod:`actors.learner`), so no rendezvous of a local run listens beyond loopback.
"""
from __future__ import annotations

import socket
from datetime import timedelta

import torch

LOOPBACK = "127.0.0.1"


def find_free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def local_ip() -> str:
    """The address the rendezvous of this node binds to and its peers dial (docs/security.md).

    Loopback when every live node of the Ray cluster is this machine (a local run, also several
    raylets of ``ray.cluster_utils.Cluster``): nothing of a sync then needs to leave the machine, and
    no other host can reach it. On a cluster, this node's IP as Ray sees it. Loopback without Ray."""
    import ray
    if not ray.is_initialized():
        return LOOPBACK
    me = ray.util.get_node_ip_address()
    hosts = {n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")}
    return LOOPBACK if hosts <= {me} else me


def source_address(host: str) -> str:
    """The local address this process reaches ``host`` from (loopback for a loopback host): the
    interface the group's connections use. No packet is sent (a UDP socket's connect only routes)."""
    family, _, _, _, addr = socket.getaddrinfo(host, 9, type=socket.SOCK_DGRAM)[0]
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect(addr)
        return s.getsockname()[0]


def listen_fd(host: str, port: int) -> int:
    """A TCP socket bound to ``host:port`` only, as a raw fd for ``TCPStore(master_listen_fd=)``: torch's
    master otherwise listens on every interface whatever host it is given (c10d ``Socket::listen(port)``
    binds the wildcard address). The store takes the fd over (listens, closes it)."""
    family, _, _, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(addr)
    except BaseException:
        s.close()
        raise
    return s.detach()


def bound_store(host: str, port: int, rank: int, world_size: int, timeout_s: float):
    """Rank 0: the master ``TCPStore`` listening on ``host:port`` only; other ranks: a client of it."""
    # use_libuv=False as vLLM's StatelessProcessGroup.create (pytorch#150215); rank 0 listens on
    # host only (listen_fd)
    fd = listen_fd(host, port) if rank == 0 else None
    try:
        return torch.distributed.TCPStore(host, port, world_size, is_master=(rank == 0), master_listen_fd=fd,
                                          timeout=timedelta(seconds=timeout_s), use_libuv=False)
    except BaseException:
        if fd is not None:
            try:
                import os
                os.close(fd)
            except OSError:
                pass
        raise
