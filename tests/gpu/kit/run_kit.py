"""Run every GPU-kit check in order, each in its own process under a time budget, and print one
line per check. For the lent GPU machine (no Ray, vLLM, DeepSpeed or network there; see
build_kit.py), in one device call with the kit carried:

    make gpu-kit                                     # here: assemble build/gpu-kit (~17 MiB)
    device tool run: carry=["build/gpu-kit"], timeout_s=600,
        command="python3 tests/gpu/kit/run_kit.py --out $OUT"

Output: a header line (Python, torch, CUDA, GPU, driver, NCCL), then per check
``PASSED|FAILED|SKIPPED  name  seconds  key numbers``; a failed check's last log lines follow its
line; --out gets results.json and kit.log (every check's whole log). Exit status 1 if any check failed or
none passed (all skipped tested nothing). The total budget (--total, default 540 s) keeps the run
inside one 10-minute call: a check that would start with too little time left is SKIPPED.
``--device cpu --only a_sync_bit_exact,...`` runs the checks that can over gloo (the CPU test).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
GPU_TESTS = os.path.dirname(HERE)

# (check, budget in seconds on the GPU machine), in the order of issue 24's list, except that the
# correctness check (g) runs before the measurement (f), which gets whatever time is left
PLAN: List[Tuple[str, int]] = [
    ("a_sync_bit_exact", 90),
    ("d_receiver_killed_mid_sync", 100),
    ("hf_generator", 90),
    ("deepspeed_zero2_bf16", 90),
    ("deepspeed_zero3_bf16", 100),
    ("chunked_logprob_memory", 60),
    ("g_zero3_0p5b_bit_exact", 180),
    ("f_host_staging_7b_shapes", 200),
]
MIN_START_S = 20  # a check is not started with less time left than this, nor with under half its budget


def kit_env(kit: str) -> Dict[str, str]:
    """The environment of every check: the kit first on the path (its Ray stand-in, vLLM cut and
    DeepSpeed shadow nothing real on the GPU machine; on CPU they shadow the venv's on purpose),
    then the working tree (the project and tests/gpu), and the kit's switches."""
    tag = f"py{sys.version_info[0]}{sys.version_info[1]}"
    paths = [os.path.join(kit, "py")]
    if os.path.isdir(os.path.join(kit, tag)):
        paths.insert(0, os.path.join(kit, tag))  # compiled parts for this Python (pydantic-core)
    paths += [ROOT, GPU_TESTS, HERE]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(paths + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.update({"DISPO_GPU_KIT": "1", "DISPO_KIT_ALLOW_NCCL_WITHOUT_SUSPEND": "1", "PYTHONUNBUFFERED": "1",
                "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                "DS_BUILD_OPS": "0", "RAY_USAGE_STATS_ENABLED": "0"})
    env.pop("DS_ACCELERATOR", None)  # each learner picks its accelerator from what it was granted
    if not env.get("VLLM_NCCL_SO_PATH"):  # vLLM's NCCL = torch's own (nvidia-nccl wheel), found by path
        lib = nccl_library()
        if lib:
            env["VLLM_NCCL_SO_PATH"] = lib
    return env


def nccl_library() -> str:
    """The libnccl.so.2 of the nvidia-nccl wheel torch was installed with ('' if none)."""
    for entry in sys.path:
        for sub in ("nvidia/nccl/lib/libnccl.so.2", "nvidia/nccl/lib/libnccl.so"):
            path = os.path.join(entry, sub)
            if entry and os.path.isfile(path):
                return path
    return ""


HEADER = r'''
import ctypes, os, subprocess, sys
import torch
parts = [f"Python {sys.version.split()[0]}", f"torch {torch.__version__} (CUDA {torch.version.cuda})"]
if torch.cuda.is_available():
    parts.append(", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())))
    try:
        drv = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.split()
        parts.append(f"driver {drv[0] if drv else '?'}")
    except Exception as e:
        parts.append(f"driver ? ({type(e).__name__})")
    try:
        parts.append("NCCL " + ".".join(map(str, torch.cuda.nccl.version())))
        from vllm.utils.nccl import find_nccl_library
        lib = ctypes.CDLL(find_nccl_library())
        parts.append("ncclCommSuspend " + ("present" if hasattr(lib, "ncclCommSuspend") else "absent (kit allowance)"))
    except Exception as e:
        parts.append(f"NCCL ? ({type(e).__name__}: {e})")
else:
    parts.append("no CUDA GPU")
import deepspeed, ray, vllm, transformers
parts.append(f"transformers {transformers.__version__}, kit: DeepSpeed {deepspeed.__version__}, vLLM cut {vllm.__version__}, "
             f"Ray stand-in={getattr(ray, 'IS_STANDIN', False)}")
print("  ".join(parts))
'''


def _tail(path: str, n: int = 25) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return ""


def run_check(name: str, budget_s: float, device: str, small: bool, env: Dict[str, str], logs: str) -> dict:
    log = os.path.join(logs, f"{name}.log")
    result = os.path.join(logs, f"{name}.json")
    cmd = [sys.executable, "-u", os.path.join(HERE, "checks.py"), name, "--device", device, "--result", result]
    if small:
        cmd.append("--small")
    t0 = time.monotonic()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
        try:
            rc: Optional[int] = proc.wait(timeout=budget_s)
        except subprocess.TimeoutExpired:
            rc = None
            os.killpg(proc.pid, signal.SIGKILL)  # the check and every process it spawned
            proc.wait()
    secs = time.monotonic() - t0
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # leftovers (a receiver process) of a finished check
    except ProcessLookupError:
        pass
    if rc is None:
        return {"name": name, "status": "FAILED", "seconds": secs, "key": f"over its {budget_s:.0f}s budget",
                "log": log}
    if rc == 0 and os.path.isfile(result):
        with open(result) as f:
            out = json.load(f)
        return {"name": name, "seconds": secs, "log": log, **out}
    last = [line for line in _tail(log, 40).splitlines() if line.strip()]
    return {"name": name, "status": "FAILED", "seconds": secs, "key": (last[-1] if last else f"exit {rc}")[:200],
            "log": log}


def decide(results: List[dict]) -> Tuple[int, str]:
    """Exit status and its line: 1 if any check failed or none passed."""
    passed = sum(r["status"] == "PASSED" for r in results)
    failed = [r["name"] for r in results if r["status"] == "FAILED"]
    if failed:
        return 1, f"{len(failed)} failed: {', '.join(failed)}; {passed} passed"
    if passed == 0:
        return 1, f"no check passed ({len(results)} skipped): nothing was tested"
    return 0, f"{passed} passed, {len(results) - passed} skipped"


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description="Run the GPU kit's checks")
    ap.add_argument("--kit", default=os.path.join(ROOT, "build", "gpu-kit"))
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--only", default="", help="comma-separated check names (default: all, in order)")
    ap.add_argument("--small", action="store_true", help="small payloads (the CPU test)")
    ap.add_argument("--total", type=float, default=540.0, help="seconds for the whole run")
    ap.add_argument("--budget", type=float, default=0.0, help="seconds per check (default: the plan's)")
    ap.add_argument("--out", default="", help="folder for results.json and kit.log (e.g. $OUT)")
    args = ap.parse_args(argv)
    t_start = time.monotonic()
    if not os.path.isfile(os.path.join(args.kit, "MANIFEST.json")):
        print(f"run_kit: no kit at {args.kit}: run `make gpu-kit` and carry build/gpu-kit")
        return 1
    plan = PLAN
    if args.only:
        wanted = args.only.split(",")
        unknown = sorted(set(wanted) - {n for n, _ in PLAN})
        if unknown:
            print(f"run_kit: unknown checks {unknown}; known: {[n for n, _ in PLAN]}")
            return 1
        plan = [(n, b) for n, b in PLAN if n in wanted]
    logs = tempfile.mkdtemp(prefix="dispo-gpu-kit-logs-")  # one log and one result file per check
    env = kit_env(os.path.abspath(args.kit))
    header = subprocess.run([sys.executable, "-c", HEADER], env=env, capture_output=True, text=True, timeout=120)
    header_line = (header.stdout.strip().splitlines() or [f"header failed: {header.stderr.strip().splitlines()[-1:]}"])[-1]
    print(header_line, flush=True)
    results = []
    for name, budget in plan:
        left = args.total - (time.monotonic() - t_start)
        planned = args.budget or budget
        budget = min(planned, left)
        if budget < max(MIN_START_S, planned / 2):
            r = {"name": name, "status": "SKIPPED", "seconds": 0.0, "key": f"not enough time left ({left:.0f}s, budget {planned:.0f}s)"}
        else:
            r = run_check(name, budget, args.device, args.small, env, logs)
        results.append(r)
        print(f"{r['status']:8} {name:30} {r['seconds']:6.1f}s  {r['key']}", flush=True)
        if r["status"] == "FAILED" and r.get("log"):
            print("    | " + _tail(r["log"], 12).rstrip().replace("\n", "\n    | "), flush=True)
    status, line = decide(results)
    print(("OK: " if status == 0 else "FAILED: ") + line + f" ({time.monotonic() - t_start:.0f}s)")
    if args.out:  # two files (the device tool brings back at most 8): every result, every log
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump({"header": header_line, "results": results, "exit": status}, f, indent=1, default=str)
        with open(os.path.join(args.out, "kit.log"), "w") as f:
            for r in results:
                f.write(f"===== {r['name']}: {r['status']} ({r['seconds']:.1f}s) {r['key']}\n")
                f.write(_tail(r["log"], 100000) if r.get("log") else "")
    return status


if __name__ == "__main__":
    sys.exit(main())
