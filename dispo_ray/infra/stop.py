"""Graceful SIGTERM and SIGINT for the driver.

What sends them: ``ray job stop`` (SIGTERM to the entrypoint's processes, SIGKILL after
``RAY_JOB_STOP_WAIT_TIME_S``, default 3 s), Kubernetes pod eviction (SIGTERM, SIGKILL after
``terminationGracePeriodSeconds``, default 30 s), ``timeout``, and Ctrl-C (SIGINT).

The first signal only sets :attr:`StopRequest.signum`: the loop finishes the step it is training
(or abandons the rollout it is waiting for), saves a checkpoint unless ``trainer.save_on_stop`` is
false, shuts the pools down and exits ``128 + signum`` (143 for SIGTERM, 130 for SIGINT) with one
line naming the checkpoint and the resume command. A second Ctrl-C raises :class:`StopNow` at
once: no save, exit 130. Repeated SIGTERMs change nothing (``timeout`` sends its signal to the
child and again to the process group, so one stop arrives twice), nor does a SIGINT within
``DEBOUNCE_S`` of the first (a terminal delivers one Ctrl-C to the group, which a wrapper may pass on).

The handlers must be (re)installed after ``ray.init``: Ray's core worker installs a C++ SIGTERM
handler in the driver that dumps a stack and aborts (exit 134).
"""
from __future__ import annotations

import shlex
import signal
import sys
import threading
import time
from typing import List, Optional

SIGNALS = (signal.SIGTERM, signal.SIGINT)
DEBOUNCE_S = 0.5


class StopNow(BaseException):
    """A second signal: leave now (a BaseException so no ``except Exception`` swallows it)."""

    def __init__(self, signum: int):
        super().__init__(f"{signal.Signals(signum).name} received twice: stopped without saving")
        self.signum = signum


class StopRequest:
    """The one record of "a signal asked us to stop" (process-wide, main thread only)."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self.at = 0.0  # monotonic time of the first signal
        self.event = threading.Event()

    def install(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame) -> None:  # noqa: ARG002 - signal API
        if self.signum is None:
            self.signum, self.at = signum, time.monotonic()
            self.event.set()
        elif signum == signal.SIGINT and time.monotonic() - self.at >= DEBOUNCE_S:
            raise StopNow(signum)

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or 0)


STOP = StopRequest()


def resume_command(run_dir: str, argv: Optional[List[str]] = None) -> str:
    """The command that continues this run: the same overrides, its run dir, ``trainer.resume=true``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    keep = [a for a in argv if not a.startswith(("trainer.run_dir=", "trainer.resume=", "++trainer.run_dir=",
                                                  "++trainer.resume="))]
    return " ".join(["python -m dispo_ray.main", *map(shlex.quote, keep), shlex.quote(f"trainer.run_dir={run_dir}"),
                     "trainer.resume=true"])
