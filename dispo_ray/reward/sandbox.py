"""The verification sandbox: math-verify on untrusted text, in a child process that is killed at
a hard wall-clock deadline.

Why a persistent child: importing sympy/math-verify costs ~1 s, a verification ~2 ms, so one
child per :class:`Sandbox` serves every job over a pipe and is only replaced after a timeout or a
crash. A warm *spare* child is kept ready so that a bomb costs the deadline, not the deadline
plus an interpreter start.

Why ``subprocess`` + :class:`multiprocessing.connection.Connection` rather than
``multiprocessing.Process(spawn)``: inside a Ray worker, ``spawn`` re-runs the worker's
``__main__`` script in the child; a fresh ``python -m dispo_ray.reward.sandbox`` has a clean, known
start-up, its own session (so ``killpg`` reaches anything it started), a clean environment and
a private scratch cwd.

In the child: ``RLIMIT_AS`` (``memory_mb``), no core dumps, ``RLIMIT_FSIZE = 0``, the child dies
with its parent (``PR_SET_PDEATHSIG``), and an audit hook refuses process creation, sockets,
ctypes and file writes/removals. A soft ``setitimer`` at 80% of the deadline turns Python-level
slowness into a ``timeout`` reply without losing the child; C-level bigint work cannot be
interrupted by signals, which is what the parent's kill is for.
"""
from __future__ import annotations

import collections
import os
import shutil
import subprocess
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from typing import Any, Deque, Dict, List, Optional, Sequence, Tuple

from dispo_ray.reward.scoring import check_answer_format


# the directory holding dispo_ray/ (this file is dispo_ray/reward/sandbox.py): the child's PYTHONPATH
_PKG_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
START_TIMEOUT_S = 120.0  # a child must be ready within this (2 busy shared cores: be generous)
# Jobs queued in the child's stdin pipe (64 KiB on Linux) stay well below its size, so a send
# never blocks while the child is busy and the parent keeps watching the deadline.
_PIPE_SAFE_CHARS = 8_000  # <= 32 KiB even at 4 UTF-8 bytes per char


class SandboxError(RuntimeError):
    """The sandbox child could not be started."""


class _Child:
    """One verifier process and its pipes."""

    def __init__(self, memory_mb: int, soft_timeout_s: float, answer_format: str):
        self.workdir = tempfile.mkdtemp(prefix="dispo-verify-")
        env = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "LC_ALL", "HOME")}
        env.update(PYTHONPATH=_PKG_ROOT, PYTHONDONTWRITEBYTECODE="1", PYTHONHASHSEED="0",
                   OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dispo_ray.reward.sandbox", str(int(memory_mb)), repr(soft_timeout_s),
             answer_format],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            cwd=self.workdir, env=env, close_fds=True, start_new_session=True)
        self.send = Connection(os.dup(self.proc.stdin.fileno()), readable=False)
        self.recv = Connection(os.dup(self.proc.stdout.fileno()), writable=False)
        self.proc.stdin.close()
        self.proc.stdout.close()
        self.ready = False
        self.pid = self.proc.pid

    def wait_ready(self, timeout_s: float) -> None:
        if self.ready:
            return
        try:
            if not self.recv.poll(timeout_s):
                raise SandboxError(f"verifier child did not start within {timeout_s:.0f} s")
            msg = self.recv.recv()
        except (EOFError, OSError):
            raise SandboxError(f"verifier child exited at start (code {self.proc.poll()})") from None
        if msg != ("ready", self.pid):
            raise SandboxError(f"verifier child sent {msg!r} instead of ready")
        self.ready = True

    def kill(self) -> int:
        """Kill the child's whole session; return the number of files left in its scratch dir."""
        try:
            os.killpg(self.proc.pid, 9)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        for c in (self.send, self.recv):
            try:
                c.close()
            except OSError:
                pass
        stray = sum(len(files) for _, _, files in os.walk(self.workdir))
        shutil.rmtree(self.workdir, ignore_errors=True)
        return stray


MIN_MEMORY_MB = 64  # the child's address-space limit; below it Python and math-verify cannot start


class Sandbox:
    """Verifies (answer, ground truth) pairs in a persistent child with a hard deadline.

    ``verify`` returns ``(reason, elapsed_s)`` with reason in ``ok | wrong | timeout | crashed``
    (and ``no_answer`` with ``answer_format="any"``: math-verify extracted nothing); it never
    raises for bad input and never waits much past ``timeout_s``. The answer is an answer span
    (or a bare answer) with ``answer_format="boxed"``, a whole response with ``"any"``; the
    ground truth a gold text (:func:`dispo_ray.reward.scoring.normalize_ground_truth`).
    """

    def __init__(self, timeout_s: float, memory_mb: int, spare: bool = True,
                 soft_timeout: bool = True, window: int = 2, answer_format: str = "boxed"):
        if timeout_s <= 0:
            raise ValueError(f"sandbox timeout_s must be > 0, got {timeout_s}")
        if memory_mb < MIN_MEMORY_MB:  # this class owns the rule; reward.memory_mb takes its bound from here
            raise ValueError(f"sandbox memory_mb must be >= {MIN_MEMORY_MB}, got {memory_mb}")
        check_answer_format(answer_format)  # the owner's one check (scoring): fail here, not as a dead child
        self.answer_format = answer_format
        self.timeout_s = float(timeout_s)
        self.memory_mb = int(memory_mb)
        self.use_spare = spare
        if window < 1:
            raise ValueError(f"sandbox window must be >= 1, got {window}")
        self.window = int(window)  # jobs queued in the child at once (1 = strict round trips)
        self.soft_timeout_s = 0.8 * self.timeout_s if soft_timeout else 0.0  # 0 = parent kill only
        self._jid = 0
        self._stats = {"verified": 0, "timeouts": 0, "crashes": 0, "replacements": 0,
                       "stray_files": 0, "max_elapsed_s": 0.0}
        self._child: Optional[_Child] = self._new_child()
        self._child.wait_ready(START_TIMEOUT_S)
        self._spare: Optional[_Child] = self._new_child() if spare else None

    def _new_child(self) -> _Child:
        return _Child(self.memory_mb, self.soft_timeout_s, self.answer_format)

    def _replace(self) -> None:
        """Kill the current child and promote the spare (or start a fresh one)."""
        if self._child is not None:
            self._stats["stray_files"] += self._child.kill()
        self._stats["replacements"] += 1
        self._child, self._spare = self._spare, None
        if self._child is None:
            self._child = self._new_child()
        if self.use_spare:
            self._spare = self._new_child()

    def verify(self, answer: str, ground_truth: str) -> Tuple[str, float]:
        return self.verify_many([(answer, ground_truth)])[0]

    def verify_many(self, pairs: Sequence[Tuple[str, str]]) -> List[Tuple[str, float]]:
        """Verify ``(answer, ground_truth)`` pairs in order; one ``(reason, elapsed_s)`` each.

        Pipelined: the next job is already in the child's pipe when it finishes the current one
        (a window of ``window`` jobs, fewer for large ones, so that a blocked write can never
        delay the deadline), so the child never idles waiting for this process to be scheduled.
        Each job's deadline runs from when the child could start it: its send or the previous
        result, whichever is later. A timeout or crash kills the child; the jobs it had not
        answered go to the replacement.
        """
        if self._child is None:
            raise SandboxError("sandbox is closed")
        out: List[Optional[Tuple[str, float]]] = [None] * len(pairs)
        pending = collections.deque(range(len(pairs)))
        inflight: Deque[Tuple[int, int]] = collections.deque()  # (pair index, job id)
        head_t0 = 0.0

        def settle(reason: str, replace: bool) -> None:
            nonlocal head_t0
            i, _ = inflight.popleft()
            elapsed = time.monotonic() - head_t0
            out[i] = (reason, elapsed)
            self._count(reason, elapsed)
            if replace:  # the child is gone: its unanswered jobs go to the next one
                self._replace()
                pending.extendleft(j for j, _ in reversed(inflight))
                inflight.clear()
            head_t0 = time.monotonic()

        while pending or inflight:
            child = self._child
            if not inflight:
                self._ensure_ready()  # a spare's start-up is not charged to any job
                child = self._child
            try:
                while pending and self._window_open(inflight, pairs, pending[0]):
                    i = pending.popleft()
                    self._jid += 1
                    child.send.send((self._jid, *pairs[i]))
                    if not inflight:
                        head_t0 = time.monotonic()
                    inflight.append((i, self._jid))
                left = head_t0 + self.timeout_s - time.monotonic()
                if left <= 0:
                    settle("timeout", replace=True)
                elif child.recv.poll(left):
                    jid, reason, recycle = child.recv.recv()
                    if jid == inflight[0][1]:
                        settle(reason, replace=reason == "crashed" or bool(recycle))
            except (EOFError, OSError, BrokenPipeError):  # the child died (segfault, OOM kill)
                if inflight:
                    settle("crashed", replace=True)
                else:  # died between jobs: nothing to blame, just replace it
                    self._replace()
        return out  # type: ignore[return-value]

    def _window_open(self, inflight: Deque[Tuple[int, int]], pairs: Sequence[Tuple[str, str]],
                     nxt: int) -> bool:
        if not inflight:
            return True
        if len(inflight) >= self.window:
            return False
        queued = sum(len(pairs[i][0]) + len(pairs[i][1]) for i, _ in inflight)
        return queued + len(pairs[nxt][0]) + len(pairs[nxt][1]) <= _PIPE_SAFE_CHARS

    def _ensure_ready(self) -> None:
        try:
            self._child.wait_ready(START_TIMEOUT_S)
        except SandboxError:
            self._replace()
            self._child.wait_ready(START_TIMEOUT_S)

    def _count(self, reason: str, elapsed: float) -> None:
        self._stats["verified"] += 1
        self._stats["max_elapsed_s"] = max(self._stats["max_elapsed_s"], elapsed)
        if reason == "timeout":
            self._stats["timeouts"] += 1
        elif reason == "crashed":
            self._stats["crashes"] += 1

    @property
    def child_pid(self) -> Optional[int]:
        return None if self._child is None else self._child.pid

    @property
    def child_workdir(self) -> Optional[str]:
        return None if self._child is None else self._child.workdir

    def stats(self) -> Dict[str, Any]:
        out = dict(self._stats)
        out["child_pid"] = self.child_pid
        out["child_workdir"] = self.child_workdir
        out["child_stray_files"] = (sum(len(f) for _, _, f in os.walk(self._child.workdir))
                                    if self._child else 0)
        return out

    def close(self) -> None:
        for c in (self._child, self._spare):
            if c is not None:
                self._stats["stray_files"] += c.kill()
        self._child = self._spare = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


# ------------------------------------------------------------------ the child side
_BLOCKED_EVENTS = {
    "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "os.kill",
    "os.killpg", "os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.symlink", "os.link",
    "os.chmod", "os.chown", "os.truncate", "os.utime", "os.startfile", "subprocess.Popen",
    "pty.spawn", "socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo",
    "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "shutil.rmtree", "shutil.copyfile",
    "shutil.move", "webbrowser.open", "urllib.Request", "http.client.connect",
}


def _audit(event: str, args: Tuple[Any, ...]) -> None:
    if event in _BLOCKED_EVENTS:
        raise PermissionError(f"sandbox: {event} is not allowed")
    if event == "open" and len(args) >= 3:
        mode, flags = args[1], args[2]
        if (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT
                                                    | os.O_APPEND | os.O_TRUNC)):
            raise PermissionError("sandbox: writing files is not allowed")


class _SoftTimeout(BaseException):
    """Raised by the child's interval timer; BaseException so that math-verify's and sympy's
    ``except Exception`` do not swallow it."""


def _child_main(memory_mb: int, soft_timeout_s: float, answer_format: str) -> None:
    import ctypes
    import logging
    import resource
    import signal

    recv = Connection(0, writable=False)
    send = Connection(os.dup(1), readable=False)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # stray prints must not corrupt the framed pipe
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the parent
    except Exception:
        pass
    from dispo_ray.reward.scoring import verify_answer

    # warm: pull in every lazy import (both extraction paths) before locking down
    verify_answer("\\frac{1}{2}", "$0.5$", answer_format)
    verify_answer("so $x = \\boxed{1/2}$, i.e. 0.5", "$\\frac{1}{2}$", answer_format)
    logging.disable(logging.CRITICAL)
    limit = memory_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
    sys.addaudithook(_audit)

    def on_alarm(signum, frame):
        raise _SoftTimeout()

    signal.signal(signal.SIGALRM, on_alarm)
    send.send(("ready", os.getpid()))
    while True:
        try:
            jid, answer, gt = recv.recv()
        except (EOFError, OSError):
            return
        recycle = False
        try:
            try:
                signal.setitimer(signal.ITIMER_REAL, soft_timeout_s)
                reason = verify_answer(answer, gt, answer_format)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        except _SoftTimeout:
            reason = "timeout"
        except MemoryError:
            reason, recycle = "crashed", True
        except BaseException:  # noqa: BLE001 - any failure of the verifier is a crash
            reason = "crashed"
        send.send((jid, reason, recycle))


if __name__ == "__main__":
    _child_main(int(sys.argv[1]), float(sys.argv[2]), sys.argv[3])
