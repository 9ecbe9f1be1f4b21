"""In-process stand-in for the subset of Ray's API that dispo-ray's actors use, for the GPU kit only.

The lent GPU machine has no Ray (~240 MB installed: it does not fit the 64 MiB a call carries) and
no network. There the kit (``make gpu-kit``, ``tests/gpu/kit/run_kit.py``) puts this package first
on the path so that ``LearnerGroup`` / ``GeneratorPool`` run unchanged: an actor is one worker
thread of this process that constructs the instance and then runs its method calls one at a time,
in submission order (Ray's ``max_concurrency=1``); ``.remote()`` returns an :class:`ObjectRef`
wrapping a future. Arguments are deep-copied, as Ray's serialisation copies them.

What it does not do: processes, restarts (``max_restarts``), resource accounting, runtime envs,
named actors, tasks. ``get_gpu_ids()`` answers, in an actor thread, the GPU index it was given
(round robin over the visible GPUs for actors asking for ``num_gpus > 0``).

It refuses to import unless ``DISPO_GPU_KIT=1`` (set by the kit's runner), so it can never stand in
for Ray in the product or in the product's CPU tests.
"""
from __future__ import annotations

import copy
import itertools
import os
import queue
import threading
import time
from concurrent.futures import Future
from concurrent.futures import wait as _futures_wait
from typing import Any, Dict, List, Optional, Sequence, Tuple

if os.environ.get("DISPO_GPU_KIT") != "1":
    raise ImportError("this is the GPU kit's in-process Ray stand-in (tests/gpu/kit/standins/ray); it is "
                      "importable only under DISPO_GPU_KIT=1, inside a kit run, never in place of Ray")

from ray import exceptions, util  # noqa: E402
from ray.exceptions import ActorDiedError, GetTimeoutError  # noqa: E402

__version__ = "0.0.0+dispo-gpu-kit-standin"
IS_STANDIN = True

_state: Dict[str, Any] = {"initialized": False, "resources": {}, "actors": []}
_local = threading.local()  # gpu_ids of the actor thread running
_gpu_counter = itertools.count()


class ObjectRef:
    """The result of a ``.remote()`` call (a future)."""

    def __init__(self, future: Future, what: str = ""):
        self._future, self._what = future, what

    def __repr__(self) -> str:
        return f"ObjectRef({self._what}, done={self._future.done()})"

    def future(self) -> Future:
        return self._future


def _resolved(value: Any, what: str = "") -> ObjectRef:
    f: Future = Future()
    f.set_result(value)
    return ObjectRef(f, what)


def put(value: Any) -> ObjectRef:
    return _resolved(value, "put")


def init(num_cpus: Optional[float] = None, num_gpus: Optional[float] = None,
         resources: Optional[Dict[str, float]] = None, **_ignored: Any) -> None:
    _state["initialized"] = True
    _state["resources"] = dict(resources or {})
    if num_cpus is not None:
        _state["resources"]["CPU"] = float(num_cpus)
    if num_gpus is not None:
        _state["resources"]["GPU"] = float(num_gpus)


def is_initialized() -> bool:
    return bool(_state["initialized"])


def shutdown() -> None:
    for a in list(_state["actors"]):
        a._kill("ray.shutdown()")
    _state["actors"].clear()
    _state["initialized"] = False


def _visible_gpus() -> int:
    try:
        import torch
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001
        return 0


def cluster_resources() -> Dict[str, float]:
    out = {"CPU": float(os.cpu_count() or 1), "GPU": float(_visible_gpus())}
    out.update(_state["resources"])
    return out


available_resources = cluster_resources


def nodes() -> List[Dict[str, Any]]:
    """One live node: this machine."""
    return [{"NodeID": "gpu-kit", "Alive": True, "NodeManagerAddress": "127.0.0.1", "Resources": cluster_resources()}]


def get_gpu_ids() -> List[Any]:
    """The GPU of the actor thread calling (empty outside an actor, or for a 0-GPU actor), as Ray
    names it: an entry of the node's ``CUDA_VISIBLE_DEVICES`` when that is set, else the index."""
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    return [visible[i] if i < len(visible) else i for i in getattr(_local, "gpu_ids", [])]


def get(refs: Any, timeout: Optional[float] = None) -> Any:
    deadline = None if timeout is None else time.monotonic() + timeout

    def one(ref: Any) -> Any:
        if not isinstance(ref, ObjectRef):
            raise TypeError(f"ray.get: not an ObjectRef: {ref!r}")
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            return ref._future.result(timeout=left)
        except TimeoutError:
            if ref._future.done():
                raise  # the call itself raised TimeoutError
            raise GetTimeoutError(f"ray.get: {ref._what} not ready after {timeout}s") from None

    if isinstance(refs, (list, tuple)):
        return [one(r) for r in refs]
    return one(refs)


def wait(refs: Sequence[ObjectRef], num_returns: int = 1, timeout: Optional[float] = None,
         fetch_local: bool = True) -> Tuple[List[ObjectRef], List[ObjectRef]]:
    refs = list(refs)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        done = [r for r in refs if r._future.done()]
        left = None if deadline is None else deadline - time.monotonic()
        if len(done) >= num_returns or (left is not None and left <= 0):
            ready = done[:num_returns]
            return ready, [r for r in refs if r not in ready]
        _futures_wait([r._future for r in refs if not r._future.done()], timeout=left,
                      return_when="FIRST_COMPLETED")


def kill(actor: "ActorHandle", no_restart: bool = True) -> None:
    actor._kill("ray.kill()")


class _Call:
    def __init__(self, method: str, args: tuple, kwargs: dict, future: Future):
        self.method, self.args, self.kwargs, self.future = method, args, kwargs, future


class _RemoteMethod:
    def __init__(self, handle: "ActorHandle", name: str):
        self._handle, self._name = handle, name

    def remote(self, *args: Any, **kwargs: Any) -> ObjectRef:
        return self._handle._submit(self._name, args, kwargs)

    def options(self, **_ignored: Any) -> "_RemoteMethod":
        return self


class ActorHandle:
    """One actor: a daemon worker thread owning the instance, running calls in order."""

    def __init__(self, cls: type, options: Dict[str, Any], args: tuple, kwargs: dict):
        self._cls, self._options = cls, dict(options)
        self._queue: "queue.Queue[Optional[_Call]]" = queue.Queue()
        self._dead: Optional[BaseException] = None
        self._instance: Any = None
        gpus = float(options.get("num_gpus") or 0)
        n = _visible_gpus() if gpus > 0 else 0
        self._gpu_ids = [next(_gpu_counter) % n] if gpus > 0 and n else []
        if gpus > 0 and not n:
            raise RuntimeError(f"{cls.__name__}: asks for {gpus} GPU(s), none visible (GPU kit Ray stand-in)")
        self._ready: Future = Future()
        self._thread = threading.Thread(target=self._run, args=(copy.deepcopy(args), copy.deepcopy(kwargs)),
                                        daemon=True, name=f"actor {cls.__name__}")
        self._thread.start()
        _state["actors"].append(self)

    def __deepcopy__(self, memo: dict) -> "ActorHandle":
        return self

    def __repr__(self) -> str:
        return f"ActorHandle({self._cls.__name__}, gpus={self._gpu_ids})"

    def _run(self, args: tuple, kwargs: dict) -> None:
        _local.gpu_ids = self._gpu_ids
        try:
            self._instance = self._cls(*args, **kwargs)
            self._ready.set_result(True)
        except BaseException as e:  # noqa: BLE001 - every later call reports it
            self._dead = ActorDiedError(f"{self._cls.__name__}.__init__ failed: {type(e).__name__}: {e}")
            self._dead.__cause__ = e
            self._ready.set_result(False)
        while True:
            call = self._queue.get()
            if call is None:
                return
            if self._dead is not None:
                call.future.set_exception(self._dead)
                continue
            if not call.future.set_running_or_notify_cancel():
                continue
            try:
                if call.method == "__ray_call__":
                    fn, *rest = call.args
                    result = fn(self._instance, *rest, **call.kwargs)
                else:
                    result = getattr(self._instance, call.method)(*call.args, **call.kwargs)
                call.future.set_result(result)
            except BaseException as e:  # noqa: BLE001 - delivered to ray.get
                call.future.set_exception(e)

    def _submit(self, method: str, args: tuple, kwargs: dict) -> ObjectRef:
        f: Future = Future()
        what = f"{self._cls.__name__}.{method}"
        if self._dead is not None and self._ready.done():
            f.set_exception(self._dead)
            return ObjectRef(f, what)
        if method != "__ray_call__" and not callable(getattr(self._cls, method, None)):
            raise AttributeError(f"actor {self._cls.__name__} has no method {method!r}")
        self._queue.put(_Call(method, copy.deepcopy(args), copy.deepcopy(kwargs), f))
        return ObjectRef(f, what)

    def _kill(self, why: str) -> None:
        if self._dead is None:
            self._dead = ActorDiedError(f"actor {self._cls.__name__} was killed ({why})")
        while True:  # fail what is queued; a call already running finishes (a thread cannot be killed)
            try:
                call = self._queue.get_nowait()
            except queue.Empty:
                break
            if call is not None:
                call.future.set_exception(self._dead)
        self._queue.put(None)
        if self in _state["actors"]:
            _state["actors"].remove(self)

    def __getattr__(self, name: str) -> _RemoteMethod:
        if name.startswith("_") and name != "__ray_call__":
            raise AttributeError(name)
        return _RemoteMethod(self, name)


class ActorClass:
    def __init__(self, cls: type, options: Optional[Dict[str, Any]] = None):
        self._cls, self._options = cls, dict(options or {})
        self.__name__ = cls.__name__
        self.__doc__ = cls.__doc__

    def options(self, **options: Any) -> "ActorClass":
        return ActorClass(self._cls, {**self._options, **options})

    def remote(self, *args: Any, **kwargs: Any) -> ActorHandle:
        if not _state["initialized"]:
            init()  # Ray initialises itself on first use too
        return ActorHandle(self._cls, self._options, args, kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError(f"actor class {self._cls.__name__} cannot be instantiated directly; use .remote()")


def remote(*args: Any, **options: Any) -> Any:
    """``@ray.remote``, ``@ray.remote(max_restarts=0, ...)`` or ``ray.remote(cls)`` on classes."""
    if len(args) == 1 and not options and isinstance(args[0], type):
        return ActorClass(args[0])
    if args:
        raise TypeError("the GPU kit's Ray stand-in supports actor classes only (no remote functions)")
    return lambda cls: ActorClass(cls, options)


def __getattr__(name: str) -> Any:
    raise AttributeError(f"ray.{name} is not part of the GPU kit's Ray stand-in (tests/gpu/kit/standins/ray)")
