"""Checkpoints a cluster can trust: complete or ignored, verified on resume, bounded in number,
and a full volume named in one line.

A checkpoint ``<run_dir>/checkpoints/step_<N>/`` is **complete** when its ``manifest.json`` exists
and every file it lists has the listed size and SHA-256. The manifest is written last (after the
learner's DeepSpeed files and the driver state), and ``latest`` is moved only after the manifest:
a crash, a kill or a full disk mid-save leaves a folder without a manifest, which resume skips.

Resume (:func:`newest_valid`) tries ``latest`` first, then every older step folder, newest first,
and reports each one it skipped with the reason (missing file, size, checksum). Retention
(:func:`prune`) keeps the newest ``trainer.keep_checkpoints`` complete ones plus any the caller
protects (the collapse guard's rollback targets). The hash costs one read of the checkpoint
(hashlib's SHA-256, ~0.5-2 GB/s per core): seconds per GB, next to the write itself.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from typing import Dict, Iterable, List, Optional, Tuple

from dispo_ray.infra.failures import RunError
from dispo_ray.infra.run_state import checkpoint_dir

MANIFEST = "manifest.json"
_STEP = re.compile(r"^step_(\d+)$")
# What a full volume looks like once it has crossed a Ray actor, torch's writer or DeepSpeed.
_NO_SPACE = ("No space left on device", "ENOSPC", "iostream error", "file write failed",
             "PytorchStreamWriter failed", "Disk quota exceeded")


class CheckpointWriteError(RunError):
    """Saving a checkpoint failed; the message is the one line for the console."""


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _files(root: str) -> List[str]:
    out = []
    for d, _, names in os.walk(root):
        for n in names:
            rel = os.path.relpath(os.path.join(d, n), root)
            if rel != MANIFEST and not rel.endswith(".tmp"):
                out.append(rel)
    return sorted(out)


def write_manifest(path: str, step: int) -> Dict:
    """List every file under ``path`` with its size and SHA-256; written atomically, last."""
    files = {rel: {"bytes": os.path.getsize(os.path.join(path, rel)), "sha256": _sha256(os.path.join(path, rel))}
             for rel in _files(path)}
    manifest = {"step": step, "files": files, "bytes": sum(f["bytes"] for f in files.values())}
    tmp = os.path.join(path, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=0)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(path, MANIFEST))
    return manifest


def problem(path: str) -> Optional[str]:
    """Why the checkpoint at ``path`` cannot be restored (naming the file), or None if it is complete."""
    try:
        with open(os.path.join(path, MANIFEST)) as f:
            manifest = json.load(f)
    except FileNotFoundError:
        return "no manifest.json (the save did not complete)"
    except (OSError, ValueError) as e:
        return f"unreadable manifest.json ({e})"
    for rel, want in manifest["files"].items():
        full = os.path.join(path, rel)
        if not os.path.isfile(full):
            return f"{full} is missing"
        size = os.path.getsize(full)
        if size != want["bytes"]:
            return f"{full} has {size} bytes, the manifest says {want['bytes']} (truncated or damaged)"
        if _sha256(full) != want["sha256"]:
            return f"{full} does not match its checksum (damaged)"
    return None


def steps(run_dir: str) -> List[int]:
    """Step numbers of the checkpoint folders under ``run_dir``, ascending (complete or not)."""
    root = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    return sorted(int(m.group(1)) for m in map(_STEP.match, os.listdir(root)) if m)


def _latest_step(run_dir: str) -> Optional[int]:
    try:
        with open(os.path.join(run_dir, "checkpoints", "latest")) as f:
            m = _STEP.match(f.read().strip())
        return int(m.group(1)) if m else None
    except OSError:
        return None


def newest_valid(run_dir: str) -> Tuple[Optional[str], List[Tuple[str, str]]]:
    """(the newest complete checkpoint on the current branch or None, [(skipped folder, why)]).

    ``latest`` bounds the search: after a collapse-guard rollback, folders newer than it belong to
    the abandoned branch."""
    latest = _latest_step(run_dir)
    skipped: List[Tuple[str, str]] = []
    for step in reversed(steps(run_dir)):
        if latest is not None and step > latest:
            continue
        path = checkpoint_dir(run_dir, step)
        why = problem(path)
        if why is None:
            return path, skipped
        skipped.append((path, why))
    return None, skipped


def prune(run_dir: str, keep: int, protected: Iterable[int] = ()) -> List[int]:
    """Delete all but the newest ``keep`` complete checkpoints (0 = keep all) and the ``protected``
    steps; incomplete folders older than the newest complete one go too. Returns deleted steps."""
    if keep <= 0:
        return []
    latest = _latest_step(run_dir)
    candidates = [s for s in steps(run_dir) if latest is None or s <= latest]
    complete = [s for s in candidates if os.path.isfile(os.path.join(checkpoint_dir(run_dir, s), MANIFEST))]
    keep_set = set(complete[-keep:]) | set(protected)
    newest = complete[-1] if complete else None
    deleted = []
    for s in candidates:
        if s in keep_set or newest is None or s > newest:
            continue
        shutil.rmtree(checkpoint_dir(run_dir, s), ignore_errors=True)
        deleted.append(s)
    return deleted


def size_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, n)) for d, _, ns in os.walk(path) for n in ns)


def estimate_bytes(run_dir: str, num_params: int, bytes_per_param: int = 16) -> int:
    """What the next checkpoint will need: the last complete one's size, else ``num_params`` x
    ``bytes_per_param`` (fp32 weights 4 + Adam's two moments 8 + a fp32 master copy 4 under bf16)."""
    path, _ = newest_valid(run_dir)
    if path is not None:
        with open(os.path.join(path, MANIFEST)) as f:
            return int(json.load(f)["bytes"])
    return num_params * bytes_per_param


def free_bytes(path: str) -> int:
    while not os.path.exists(path):
        path = os.path.dirname(path) or "."
    return shutil.disk_usage(path).free


def space_warning(run_dir: str, needed: int) -> Optional[str]:
    """A warning line when the volume under ``run_dir`` cannot hold one more checkpoint."""
    free = free_bytes(run_dir)
    if free >= needed:
        return None
    return (f"WARNING: {free / 2**20:.1f} MB free under {run_dir}, one checkpoint needs ~{needed / 2**20:.1f} MB: "
            f"saving will fail (free space, move trainer.run_dir, or lower trainer.keep_checkpoints)")


def looks_like_no_space(exc: BaseException, path: str) -> bool:
    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, OSError) and getattr(exc, "errno", None) == 28:
        return True
    return any(k in text for k in _NO_SPACE) or free_bytes(path) < (1 << 20)


def write_failed(step: int, path: str, needed: int, exc: BaseException) -> CheckpointWriteError:
    """The one line for a failed save; the partial folder is removed (``latest`` still names the
    last complete checkpoint, which was never touched)."""
    full = looks_like_no_space(exc, path)
    shutil.rmtree(path, ignore_errors=True)
    if full:
        return CheckpointWriteError(
            f"no space left writing checkpoint step {step} under {path} (needs ~{needed / 2**20:.1f} MB, "
            f"{free_bytes(path) / 2**20:.1f} MB free once the partial folder was removed); 'latest' still names "
            f"the last complete checkpoint")
    first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
    return CheckpointWriteError(f"writing checkpoint step {step} under {path} failed: {type(exc).__name__}: {first}")
