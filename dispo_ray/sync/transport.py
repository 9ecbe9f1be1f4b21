"""Weight-sync transport: the group of processes a broadcast runs over, and the readiness gate.

:class:`WeightSyncGroup` is one rank of a group outside any DeepSpeed/vLLM world: rank 0 hosts a
``TCPStore`` at ``host:port``, the others connect. ``gloo`` runs a ``ProcessGroupGloo`` over it
(CPU); ``nccl`` runs vLLM 0.32's ``PyNcclCommunicator`` over a ``StatelessProcessGroup`` wrapped
around the same store (GPU). The contract of every rank:

* Formation is bounded by ``timeout_s`` as a whole (store, backend handshake, ``ncclCommInitRank``,
  warm-up all-reduce), and ranks that name different backends fail there with one line.
* A communicator vLLM silently disabled (``VLLM_DISABLE_PYNCCL``, NCCL not loadable) is refused:
  its collectives return at once without moving a byte.
* NCCL collectives run on the group's own CUDA stream, never on the caller's: a broadcast stuck
  behind a dead peer then cannot block the engine's or DeepSpeed's stream (vLLM makes its
  dedicated stream torch's current one). The comm stream waits for the caller's stream before each
  collective (the tensor was produced there), and the caller's stream waits for the collective's
  event once it completed, before consuming the buffer.
* :meth:`broadcast_async` returns a handle whose event is recorded right after the enqueue, so
  :meth:`wait` waits for that collective only, not for later ones.
* Every wait has the ``timeout_s`` deadline; a timeout aborts the communicator (``destroy()``,
  which unblocks the stream) and marks the group broken: it refuses further use, the caller
  re-forms it. :meth:`close` destroys the communicator too.

Readiness (why: a generator's ``update_weights`` may queue behind a long ``generate`` call, and
no deadline a legitimate generation can exceed may run meanwhile). Per sync ``seq`` (counted on
every rank since formation): each receiver adds 1 to ``ready/<seq>`` when it starts receiving and
waits, without a deadline, for ``go/<seq>``; the sender waits until every receiver is ready and
sets ``go/<seq>`` just before its first collective. :class:`SyncGate` lets a third process (the
driver) watch readiness before it starts the sender, and abort a sync (``go/<seq> = abort``) so
that waiting receivers fail at once. A receiver also stops waiting when the store (rank 0) dies.
"""
from __future__ import annotations

import threading
import time
from datetime import timedelta
from typing import Any, Callable, Dict, Optional, Tuple

import torch

# the transport's one import surface: ports and the bound store (net), the NCCL refusal (nccl)
from dispo_ray.sync.errors import WeightSyncError  # noqa: F401
from dispo_ray.sync.nccl import check_communicator
from dispo_ray.sync.net import LOOPBACK, bound_store, find_free_port, local_ip, source_address  # noqa: F401

_POLL_S = 0.01  # longest store polling interval of the readiness gate (latency it adds to a sync)


def _backoff(sleep_s: float) -> float:
    """Sleep, then the next interval: from 0.5 ms up to _POLL_S, so an idle receiver costs a sync
    well under a millisecond while one behind a minutes-long generation polls 100 times a second."""
    time.sleep(sleep_s)
    return min(_POLL_S, sleep_s * 2)


def _gloo_options(host: str, timeout_s: float) -> Any:
    """gloo's default device listens on the address the machine's hostname resolves to; this one on
    the interface that reaches the rendezvous host (loopback in a local run). GLOO_SOCKET_IFNAME,
    when set, still names the interface."""
    import os
    gloo = torch.distributed.ProcessGroupGloo
    opts = gloo._Options()
    opts._timeout = timedelta(seconds=timeout_s)  # per collective
    ifname = os.environ.get("GLOO_SOCKET_IFNAME", "").split(",")[0]
    opts._devices = [gloo.create_device(interface=ifname) if ifname else
                     gloo.create_device(hostname=source_address(host))]
    return opts


def run_with_deadline(fn: Callable[[], Any], seconds: float, what: str) -> Any:
    """``fn()`` in a daemon thread; raises ``TimeoutError`` if it has not returned in ``seconds``.

    For blocking C calls that take no timeout (``ncclCommInitRank``, a stream synchronize): the
    thread cannot be killed, so ``fn`` must clean up after itself if it finishes late (see
    ``WeightSyncGroup._abandoned``)."""
    box: dict = {}
    done = threading.Event()

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = e
        finally:
            done.set()

    threading.Thread(target=run, daemon=True, name=f"weight-sync: {what}").start()
    if not done.wait(seconds):
        raise TimeoutError(f"{what} did not finish within {seconds}s")
    if "error" in box:
        raise box["error"]
    return box.get("value")


class NcclWork:
    """Handle of one enqueued NCCL collective: the event recorded on the comm stream after it."""

    def __init__(self, event: Any):
        self.event = event


def _handshake(store: Any, backend: str, rank: int, world_size: int, timeout_s: float) -> None:
    """Every rank publishes its backend; rank 0 checks all, the others check rank 0's."""
    store.set(f"backend/{rank}", backend)
    peers = range(1, world_size) if rank == 0 else [0]
    keys = [f"backend/{r}" for r in peers]
    store.wait(keys, timedelta(seconds=timeout_s))
    other = {r: store.get(k).decode() for r, k in zip(peers, keys)}
    wrong = {r: b for r, b in other.items() if b != backend}
    if wrong:
        mine = f"rank {rank} speaks {backend}"
        theirs = ", ".join(f"rank {r} speaks {b}" for r, b in sorted(wrong.items()))
        raise WeightSyncError(f"weight sync backend mismatch: {mine}, {theirs} (the driver decides it "
                              "once, dispo_ray.infra.devices.sync_backend, and passes it to both sides)")


class WeightSyncGroup:
    """A broadcast group of ``world_size`` processes; rank 0 hosts the store at ``host:port``."""

    def __init__(self, backend: str, host: str, port: int, rank: int, world_size: int,
                 timeout_s: float = 120.0, device: Optional[torch.device] = None,
                 join_timeout_s: Optional[float] = None, join: bool = True):
        """``timeout_s`` bounds every collective wait; ``join_timeout_s`` (default: the same)
        bounds formation as a whole, including waiting for every rank to arrive. ``join=False``
        builds this rank's state without forming the group: nothing is connected, collectives fail,
        and :meth:`wait` on a handle works as on a formed group (the NCCL wait logic's tests)."""
        if backend not in ("gloo", "nccl"):
            raise ValueError(f"weight sync backend must be gloo or nccl, got {backend!r}")
        self.backend, self.rank, self.world_size, self.timeout_s = backend, rank, world_size, timeout_s
        self.peer = f"rank {rank}/{world_size} at {host}:{port}"
        self.syncs = 0  # syncs begun since formation: the readiness keys' sequence number
        self._store = self._pg = self._comm = self._stream = None
        self._broken: Optional[str] = None
        self._lock = threading.Lock()
        self._abandoned = False  # formation timed out: a late-finishing creator tears down
        self._staging: dict = {}  # slot -> persistent pack buffer of the sender
        if backend == "gloo":
            self.device = torch.device("cpu")
        else:
            from dispo_ray.infra.devices import assigned_cuda_index
            device = torch.device(device) if device is not None else torch.device("cuda", assigned_cuda_index())
            # an explicit index: tensors report one, and device equality decides zero-copy paths
            if device.type == "cuda" and device.index is None:
                device = torch.device("cuda", torch.cuda.current_device())
            self.device = device
        if not join:
            return
        join_s = float(join_timeout_s if join_timeout_s is not None else timeout_s)
        try:
            run_with_deadline(lambda: self._form(host, port, join_s), join_s, "joining the group")
        except Exception as e:
            with self._lock:
                self._abandoned = True
            self._teardown()
            raise WeightSyncError(f"weight sync: joining the group failed on {self.peer}: {e}") from e

    @classmethod
    def for_settings(cls, settings: Any, rank: int, device: Optional[torch.device] = None) -> "WeightSyncGroup":
        """Join the group a :class:`~dispo_ray.sync.settings.SyncSettings` describes, as ``rank``."""
        return cls(settings.backend, settings.host, settings.port, rank, settings.world_size,
                   timeout_s=settings.timeout_s, device=device)

    # ------------------------------------------------------------------ formation / teardown
    def _form(self, host: str, port: int, join_s: float) -> None:
        store = bound_store(host, port, self.rank, self.world_size, join_s)
        with self._lock:
            self._store = store
        _handshake(store, self.backend, self.rank, self.world_size, join_s)
        if self.backend == "gloo":
            pg = torch.distributed.ProcessGroupGloo(store, self.rank, self.world_size,
                                                    _gloo_options(host, self.timeout_s))
            with self._lock:
                self._pg = pg
            return
        from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
        from vllm.distributed.utils import StatelessProcessGroup

        torch.cuda.set_device(self.device)  # this thread's device, for the stream and NCCL
        stream = torch.cuda.Stream(device=self.device)
        spg = StatelessProcessGroup(rank=self.rank, world_size=self.world_size, store=store)
        # vLLM's warm-up all-reduce and its synchronize run on the current stream: ours
        with torch.cuda.stream(stream):
            comm = PyNcclCommunicator(spg, device=self.device)
        with self._lock:
            self._comm, self._stream = comm, stream
            late = self._abandoned
        if late:
            self._teardown()
        check_communicator(comm, self.world_size)

    def _teardown(self) -> None:
        with self._lock:
            comm, self._comm, self._pg, self._store = self._comm, None, None, None
            self._staging.clear()
        if comm is not None:
            comm.destroy()  # ncclCommAbort (in vLLM's daemon thread): frees a stuck stream

    def staging(self, slot: int, nbytes: int) -> torch.Tensor:
        """A persistent uint8 buffer of at least ``nbytes`` for ``slot``, kept across syncs.

        Why: a fresh 32 MB CPU buffer per bucket is a fresh mmap whose first touch page-faults
        and zero-fills every page, which costs about twice the pack copy itself."""
        buf = self._staging.get(slot)
        if buf is None or buf.numel() < nbytes:
            buf = self._staging[slot] = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        return buf

    def staging_slots(self) -> Dict[Any, int]:
        """Bytes of each persistent staging buffer kept across syncs, by slot (0.. for the sender's
        pack buffers, ``"host"`` and ``"recv piece i"`` for a receiver's)."""
        return {slot: buf.numel() for slot, buf in self._staging.items()}

    def host_staging(self, nbytes: int) -> torch.Tensor:
        """The one persistent host buffer (at least ``nbytes``) that a receiver reassembles tensors
        larger than a bucket in when its device has no room for them (see
        :func:`dispo_ray.sync.memory.plan_receive`); pinned when this group computes on CUDA,
        so the device-to-host copies into it and the engine's host-to-device loads out of it run
        at DMA speed. Grows (once) to the largest tensor, then is reused by every one."""
        buf = self._staging.get("host")
        if buf is None or buf.numel() < nbytes:
            self._staging.pop("host", None)  # free the smaller one first
            buf = self._staging["host"] = torch.empty(nbytes, dtype=torch.uint8,
                                                      pin_memory=self.device.type == "cuda")
        return buf

    def abort(self, reason: str) -> None:
        """Mark the group unusable and destroy its communicator (after a timeout or failure)."""
        self._broken = self._broken or reason
        self._teardown()

    def close(self) -> None:
        self._broken = self._broken or "closed"
        self._teardown()

    def _usable(self) -> None:
        if self._broken is not None:
            raise WeightSyncError(f"weight sync group on {self.peer} is unusable ({self._broken}); re-form it")

    # ------------------------------------------------------------------ collectives
    def _enqueue(self, tensor: torch.Tensor, op: Callable[[Any], None]) -> NcclWork:
        self._usable()
        self._stream.wait_stream(torch.cuda.current_stream(self.device))  # the bytes exist first
        # the allocator must not hand this memory out again before NCCL is done with it, even
        # if the collective never completes (a timeout): then it stays reserved
        tensor.record_stream(self._stream)
        op(self._stream)
        event = torch.cuda.Event()
        event.record(self._stream)
        return NcclWork(event)

    def broadcast_async(self, tensor: torch.Tensor, src: int = 0) -> Any:
        """Start a broadcast; finish it with :meth:`wait` (which waits for this one only)."""
        self._usable()
        if self.backend == "gloo":
            opts = torch.distributed.BroadcastOptions()
            opts.rootRank, opts.rootTensor = src, 0
            return self._pg.broadcast([tensor], opts)
        return self._enqueue(tensor, lambda s: self._comm.broadcast(tensor, src=src, stream=s))

    def wait(self, handle: Any, what: str = "broadcast") -> None:
        self._usable()
        try:
            if self.backend == "gloo":
                if not handle.wait(timedelta(seconds=self.timeout_s)):
                    raise TimeoutError(f"{what} timed out after {self.timeout_s}s")
                return
            deadline = time.monotonic() + self.timeout_s
            while not handle.event.query():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{what} timed out after {self.timeout_s}s")
                time.sleep(0.0005)
        except Exception as e:
            self.abort(f"{what}: {e}")
            raise
        if self.device.type == "cuda":  # consumers of the buffer run after the collective
            torch.cuda.current_stream(self.device).wait_event(handle.event)

    def broadcast(self, tensor: torch.Tensor, src: int = 0, what: str = "broadcast") -> None:
        self.wait(self.broadcast_async(tensor, src), what)

    def all_reduce_min(self, tensor: torch.Tensor, what: str = "all_reduce") -> None:
        self._usable()
        if self.backend == "gloo":
            opts = torch.distributed.AllreduceOptions()
            opts.reduceOp = torch.distributed.ReduceOp.MIN
            self.wait(self._pg.allreduce([tensor], opts), what)
            return
        # PyNccl's all_reduce writes to an out tensor; passing the input as out keeps it in place
        self.wait(self._enqueue(tensor, lambda s: self._comm.all_reduce(
            tensor, out_tensor=tensor, op=torch.distributed.ReduceOp.MIN, stream=s)), what)

    # ------------------------------------------------------------------ readiness
    def arrive_and_wait_go(self) -> int:
        """Receiver: declare this rank ready for the next sync, then wait (no deadline) until the
        sender starts it. Returns the sync's sequence number."""
        self._usable()
        seq, self.syncs = self.syncs, self.syncs + 1
        try:
            self._store.add(f"ready/{seq}", 1)
            key, pause = f"go/{seq}", 0.0005
            while not self._store.check([key]):
                pause = _backoff(pause)
            signal = self._store.get(key).decode()
        except Exception as e:  # the store (rank 0) went away
            self.abort(f"readiness: {e}")
            raise WeightSyncError(f"weight sync {seq}: waiting for the sender failed on {self.peer}: {e}") from e
        if signal != "go":
            self.abort(signal)
            raise WeightSyncError(f"weight sync {seq} aborted before it started ({signal}), seen on {self.peer}")
        return seq

    def wait_ready_and_go(self, ready_timeout_s: Optional[float]) -> int:
        """Sender: wait until every receiver is ready for the next sync (``ready_timeout_s``:
        None = no deadline), then release them. Returns the sync's sequence number."""
        self._usable()
        seq, self.syncs = self.syncs, self.syncs + 1
        try:
            wait_ready(self._store, seq, self.world_size - 1, ready_timeout_s)
            self._store.set(f"go/{seq}", "go")
        except Exception as e:
            self.abort(f"readiness: {e}")
            raise WeightSyncError(f"weight sync {seq}: receivers not ready on {self.peer}: {e}") from e
        for old in (f"ready/{seq - 1}", f"go/{seq - 1}"):  # every rank is past sync seq - 1
            if seq > 0:
                self._store.delete_key(old)
        return seq


def wait_ready(store: Any, seq: int, receivers: int, timeout_s: Optional[float],
               failed: Optional[Callable[[], None]] = None, check_every_s: float = 0.2) -> None:
    """Block until ``receivers`` ranks declared sync ``seq`` ready; ``failed()`` (called every
    ``check_every_s``) may raise to give up, e.g. when a receiver's call already ended in error."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    next_check, pause = time.monotonic(), 0.0005
    while store.add(f"ready/{seq}", 0) < receivers:
        now = time.monotonic()
        if deadline is not None and now > deadline:
            raise TimeoutError(f"only {store.add(f'ready/{seq}', 0)} of {receivers} receivers ready "
                               f"after {timeout_s}s")
        if failed is not None and now >= next_check:
            failed()
            next_check = now + check_every_s
        pause = _backoff(pause)


class SyncGate:
    """A client of a group's store for a process outside the group (the driver): watch readiness
    before starting the sender, abort a sync so that waiting receivers fail at once."""

    def __init__(self, host: str, port: int, receivers: int, timeout_s: float = 60.0):
        self.receivers, self.seq = receivers, 0
        self._store = torch.distributed.TCPStore(host, port, is_master=False, wait_for_workers=False,
                                                 timeout=timedelta(seconds=timeout_s), use_libuv=False)

    @property
    def address(self) -> Tuple[str, int]:
        """(host, port) of the store this gate is a client of: the group's rendezvous."""
        return self._store.host, self._store.port

    def wait_ready(self, failed: Optional[Callable[[], None]] = None) -> int:
        """Block (no deadline) until every receiver is ready for the next sync; its number."""
        self.seq += 1
        wait_ready(self._store, self.seq - 1, self.receivers, None, failed)
        return self.seq - 1

    def abort(self, reason: str) -> None:
        """Abort the sync last waited for: receivers still waiting for its start fail at once."""
        try:
            self._store.set(f"go/{self.seq - 1}", f"abort: {reason}")
        except Exception:  # noqa: BLE001 - the store is gone: receivers notice that themselves
            pass
