"""Turning a failed run into the one line a user needs: the root cause, the knob, where the log is.

Two places feed it:

* :func:`engine_root_cause` runs *inside* a generator actor when its engine fails. vLLM's engine
  core and workers are child processes writing to the actor's stdout and stderr, and
  the exception the actor sees (``EngineDeadError``) names nothing; so the actor reads what its
  stdout/stderr files (Ray's ``worker-*.out`` / ``.err``) received since the call began and picks the first real exception line there
  (e.g. ``RuntimeError: CPU Generator does not use offset``). It raises :class:`EngineFailure`
  with that line and the file's path.
* :func:`describe` runs in the driver on whatever ended the run (Ray wraps actor errors in its
  own exception types, often with pages of traceback) and returns one line: an ``EngineFailure``
  line, Ray's memory-monitor verdict (which actor, how much memory, what to turn down), or the
  exception's own first line.
"""
from __future__ import annotations

import os
import re
from typing import Dict, List, Optional

ENGINE_FAILURE = "EngineFailure"
_EXC_LINE = re.compile(r"\b((?:[A-Za-z_][\w.]*\.)?[A-Z]\w*(?:Error|Exception)): (.+)$")
# Wrapper exceptions that only point elsewhere ("see stack trace above").
_WRAPPERS = ("EngineDeadError", "EngineGenerationError", "RayTaskError", "RayActorError", "ActorDiedError")
_OOM_MARKERS = ("running low on memory", "NODE_OUT_OF_MEMORY", "OutOfMemoryError")
OOM_ADVICE = ("lower generator.max_new_tokens, trainer.eval_max_prompts, trainer.prompts_per_step or "
              "learner.micro_batch_size, or give the node more memory (Ray kills at "
              "RAY_memory_usage_threshold, default 0.95 of the node)")


class RunError(RuntimeError):
    """The run cannot go on; the message is already the one line for the console."""


class EngineFailure(RuntimeError):
    """A generator engine failed; the message is the root-cause line and the log file."""


def log_files() -> List[str]:
    """The regular files this process's stdout and stderr go to (a Ray worker's ``.out`` / ``.err``
    logs; vLLM's processes log to stdout), in that order; none on a terminal."""
    out = []
    for fd in (1, 2):
        try:
            path = os.path.realpath(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if os.path.isfile(path) and path not in out:
            out.append(path)
    return out


def log_offset() -> Dict[str, int]:
    """Current size of each of :func:`log_files`: where what a call writes will begin."""
    sizes = {}
    for path in log_files():
        try:
            sizes[path] = os.path.getsize(path)
        except OSError:
            pass
    return sizes


def first_exception_line(text: str) -> Optional[str]:
    """The first ``SomeError: message`` line in ``text`` that is not a wrapper pointing elsewhere;
    a wrapper's quoted inner error (``Worker failed with error '...'``) counts as the cause."""
    for line in text.splitlines():
        m = _EXC_LINE.search(line)
        if not m:
            continue
        name, msg = m.group(1).rsplit(".", 1)[-1], m.group(2).strip()
        inner = re.search(r"failed with error '(.+?)'", msg)
        if inner:
            return f"{name}: {inner.group(1)}"
        if name in _WRAPPERS or "root cause" in msg.lower() or "see stack trace" in msg.lower():
            continue
        return f"{name}: {msg}"
    return None


def engine_root_cause(exc: BaseException, since: Dict[str, int], what: str) -> EngineFailure:
    """An :class:`EngineFailure` for ``exc`` raised by ``what`` (e.g. "generator 0: vllm generate"),
    with the root cause read from what this process's logs received after ``since``
    (:func:`log_offset` taken when the call began)."""
    cause, where = None, None
    for path, start in since.items():
        try:
            with open(path, errors="replace") as f:
                f.seek(start)
                cause = first_exception_line(f.read(4 << 20))
        except OSError:
            continue
        if cause:
            where = path
            break
    cause = cause or first_exception_line(f"{type(exc).__name__}: {exc}") or type(exc).__name__
    where = where or next(iter(since), None)
    return EngineFailure(f"{what} failed: {cause}" + (f"; full log: {where}" if where else ""))


def describe(exc: BaseException) -> str:
    """One line for the console naming why the run stopped."""
    if isinstance(exc, RunError):
        return str(exc)
    text = f"{type(exc).__name__}: {exc}"
    m = re.search(rf"{ENGINE_FAILURE}: (.+)", text)
    if m:
        return m.group(1).strip()
    if any(k in text for k in _OOM_MARKERS):
        actor = re.search(r"name=([\w.]+)", text)
        used = re.search(r"memory used=([\d.]+\s*GB)", text)
        node = re.search(r"was ([\d.]+GB) / ([\d.]+GB)", text)
        parts = ["Ray's memory monitor killed " + (actor.group(1).split(".")[0] if actor else "an actor")]
        if used:
            parts.append(f"using {used.group(1)}")
        if node:
            parts.append(f"(node at {node.group(1)} of {node.group(2)})")
        return " ".join(parts) + f": {OOM_ADVICE}"
    line = first_exception_line(text)
    return line or text.splitlines()[0][:500]
