"""Run every benchmark (``bench/bench_*.py``) and write ``bench/results.json`` + ``bench/results.md``.

    python -m bench.run_all [--quick] [--only NAME ...]      (``make bench ARGS="--quick"``)

Each module exposes ``main(quick: bool = False) -> list[dict]`` whose entries carry ``name, value,
baseline, ratio, goal, unit, notes`` (optionally ``met``: a bool that overrides the goal check).
Modules are discovered by file name, so a new ``bench_<name>.py`` is picked up without changes here.

Every module runs in a child process of its own (``python -m bench.run_all --child NAME``), which
imports it and calls ``main(quick)``. The reasons: benchmarks start local Ray clusters, vLLM
engines and torch.distributed worlds that cannot be cleanly re-created in one process; a crash or
hang stays inside its module; and each module gets a wall-clock budget (module-level lines
``BUDGET_S = 300`` and ``BUDGET_QUICK_S = 120``, read from the source; else the defaults below)
after which its process group is stopped and an error row recorded. A failing module never stops
the others. The whole run has a budget too (``--budget``, default 58 minutes, 26 with ``--quick``,
times ``--repeat``; the TRL peer benchmark alone takes ~9): a module gets at most what is left
of it, and modules that find it spent are recorded as error rows without running.

``--only sync generator`` (names with or without ``bench_``) reruns those modules and keeps the
other modules' rows from the previous ``results.json``.

``--repeat N`` runs each module N times and reports, per row, the median of the N values,
baselines and ratios, with the spread (min..max of the ratio) and every run's ratio in the notes;
the goal is judged on the median. This machine's speed drifts by 2x within an hour, so one run
(or a best-of) is not a verdict on a goal near its threshold.
"""
from __future__ import annotations

import argparse
import datetime as dt
import glob
import importlib
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
import statistics
from typing import Any, Dict, List, Optional

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH_DIR)
RESULTS_JSON = os.path.join(BENCH_DIR, "results.json")
RESULTS_MD = os.path.join(BENCH_DIR, "results.md")
DEFAULT_BUDGET_S, DEFAULT_BUDGET_QUICK_S = 300.0, 120.0  # per module, unless it declares its own
KNOWN_BUDGETS = {"bench_reward": (400.0, 150.0)}  # (full, quick) for modules that declare none: 131 s
                                                  # on a quiet 2-core machine, > 300 s under load
TOTAL_BUDGET_S, TOTAL_BUDGET_QUICK_S = 3480.0, 1560.0  # the whole run: 20 minutes + the TRL peer benchmark
                                                       # + the scale ladder (bench_scale's own budgets)
ORDER = ("reward", "learner", "packing", "sync", "generator", "async")  # run first, in this order; then the rest
_BUDGET_RE = re.compile(r"^(BUDGET_S|BUDGET_QUICK_S|BUDGET_OPT_IN_S)\s*(?::\s*\w+\s*)?=\s*([0-9.]+)", re.M)
# a module's opt-in part (e.g. bench_scale's 0.5B rung) is turned on by an environment variable it
# names as OPT_IN_ENV = "..."; while that is set, its BUDGET_OPT_IN_S replaces BUDGET_S
_OPT_IN_RE = re.compile(r"^OPT_IN_ENV\s*(?::\s*\w+\s*)?=\s*[\"']([A-Z0-9_]+)[\"']", re.M)

# The environment every benchmark needs, as the Makefile exports it (so `python -m bench.run_all`
# behaves like `make bench`).
ENV_DEFAULTS = {"DS_BUILD_OPS": "0", "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "VLLM_CPU_KVCACHE_SPACE": "1", "RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false"}


def discover() -> List[str]:
    """Module names (``bench_xxx``) in a stable order: the known ones first, then alphabetical."""
    names = sorted(os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(BENCH_DIR, "bench_*.py")))
    rank = {f"bench_{n}": i for i, n in enumerate(ORDER)}
    return sorted(names, key=lambda n: (rank.get(n, len(ORDER)), n))


def budget(module: str, quick: bool) -> float:
    """The module's declared ``BUDGET_S`` / ``BUDGET_QUICK_S`` (read from its source, so the parent
    never imports benchmark code), else the defaults."""
    with open(os.path.join(BENCH_DIR, module + ".py")) as f:
        src = f.read()
    found = dict(_BUDGET_RE.findall(src))
    key = "BUDGET_QUICK_S" if quick else "BUDGET_S"
    opt_in = _OPT_IN_RE.search(src)
    if not quick and opt_in and os.environ.get(opt_in.group(1), "") not in ("", "0") and "BUDGET_OPT_IN_S" in found:
        key = "BUDGET_OPT_IN_S"
    full, short = KNOWN_BUDGETS.get(module, (DEFAULT_BUDGET_S, DEFAULT_BUDGET_QUICK_S))
    return float(found.get(key, short if quick else full))


def machine() -> Dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    gpu = None
    try:
        import torch
        if torch.cuda.is_available():
            gpu = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception:  # noqa: BLE001 - no torch / no driver: no GPU
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": gpu, "python": platform.python_version(),
            "host": platform.node()}


def _child(module: str, quick: bool, out: str) -> int:
    """Child process: import the module, run ``main(quick)``, write its rows as JSON. SIGTERM
    (the parent's budget) becomes SystemExit so atexit handlers (ray.shutdown, vLLM) run."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sys.path.insert(0, ROOT)
    mod = importlib.import_module(f"bench.{module}")
    rows = mod.main(quick=quick)
    with open(out, "w") as f:
        json.dump(rows, f, default=str)
    return 0


def _stop_group(proc: subprocess.Popen) -> None:
    """Stop a child that overran its budget, with everything in its process group (it was started
    in a session of its own): SIGTERM first so Ray and vLLM shut down, SIGKILL after 20 s."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=20)
            return
        except subprocess.TimeoutExpired:
            continue


def run_module(module: str, quick: bool, info: Dict[str, Any], limit: float) -> Dict[str, Any]:
    env = dict(os.environ)
    for k, v in ENV_DEFAULTS.items():
        env.setdefault(k, v)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    fd, out = tempfile.mkstemp(prefix=f"{module}-", suffix=".json")
    os.close(fd)
    cmd = [sys.executable, "-u", "-m", "bench.run_all", "--child", module, "--out", out] + (["--quick"] if quick else [])
    started = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    t0 = time.perf_counter()
    error: Optional[str] = None
    if limit < 10:
        return _with_error(module, [], "not run: the total budget (--budget) was spent", started, 0.0, quick, info)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True)  # output streams through
    try:
        rc = proc.wait(timeout=limit)
        if rc != 0:
            error = f"exited with status {rc} (see its output above)"
    except subprocess.TimeoutExpired:
        error = f"exceeded its budget of {limit:.0f} s and was stopped"
        _stop_group(proc)
    except BaseException:  # Ctrl-C: do not leave the child running
        _stop_group(proc)
        raise
    seconds = time.perf_counter() - t0
    rows: List[Dict[str, Any]] = []
    if error is None:
        try:
            with open(out) as f:
                rows = json.load(f)
        except (OSError, ValueError) as e:
            error = f"wrote no readable results: {e}"
    os.unlink(out)
    return _with_error(module, rows, error, started, seconds, quick, info)


def _with_error(module: str, rows: List[Dict[str, Any]], error: Optional[str], started: str, seconds: float,
                quick: bool, info: Dict[str, Any]) -> Dict[str, Any]:
    if error is not None:
        rows = [{"name": f"{module}: ERROR", "value": "-", "baseline": "-", "ratio": "-", "goal": "-",
                 "unit": "-", "notes": error, "error": True}]
    for r in rows:
        r.update(module=module, when=started, seconds=round(seconds, 1), quick=quick, machine=info)
    return {"module": module, "rows": rows, "seconds": seconds, "error": error}


def merge_repeats(runs: List[List[Dict[str, Any]]]) -> List[Dict[str, Any]]:
    """One row per name over repeated runs of a module: medians of value, baseline and ratio,
    the ratio's spread and each run's ratio in the notes. Rows of failed runs are kept as they are."""
    by_name: Dict[str, List[Dict[str, Any]]] = {}
    for rows in runs:
        for r in rows:
            by_name.setdefault(r["name"], []).append(r)
    merged = []
    for name, rows in by_name.items():
        nums = [r for r in rows if not r.get("error") and isinstance(r.get("ratio"), (int, float))]
        if len(rows) == 1 or not nums:
            merged.extend(rows if len(rows) == 1 or not nums else rows[:1])
            continue
        out = dict(nums[0])
        for key in ("value", "baseline", "ratio"):
            vals = [r[key] for r in nums if isinstance(r.get(key), (int, float))]
            if len(vals) == len(nums):
                out[key] = round(statistics.median(vals), 4)
        ratios = [r["ratio"] for r in nums]
        out["ratios"] = ratios
        if "met" in out:  # a module's own verdict: taken from the median run
            out["met"] = sorted(nums, key=lambda r: r["ratio"])[len(nums) // 2]["met"]
        out["notes"] = (f"median of {len(nums)} runs (ratio {min(ratios):.3g}..{max(ratios):.3g}: "
                        f"{', '.join(f'{x:.3g}' for x in ratios)})" + (f"; {out['notes']}" if out.get("notes") else ""))
        out["name"] = name + f" [median of {len(nums)}]"
        merged.append(out)
    return merged


def goal_met(row: Dict[str, Any]) -> str:
    """``yes`` / ``NO`` for goals written ``>= x``, ``<= x``, ``> x``, ``< x`` (``x%`` = x/100),
    compared with the ratio; ``-`` when there is no goal or it is not of that form."""
    if row.get("error"):
        return "error"
    if "met" in row:
        return "yes" if row["met"] else "NO"
    m = re.fullmatch(r"\s*(>=|<=|>|<)\s*([0-9.]+)\s*(%?)\s*", str(row.get("goal", "")))
    try:
        ratio = float(row.get("ratio"))
    except (TypeError, ValueError):
        return "-"
    if not m:
        return "-"
    x = float(m.group(2)) / (100.0 if m.group(3) else 1.0)
    ok = {">=": ratio >= x, "<=": ratio <= x, ">": ratio > x, "<": ratio < x}[m.group(1)]
    return "yes" if ok else "NO"


def _cell(v: Any, unit: str = "") -> str:
    s = str(v)
    return s if s in ("-", "") or not unit or unit == "-" else f"{s} {unit}"


def write_markdown(doc: Dict[str, Any], path: str = RESULTS_MD) -> str:
    m = doc["machine"]
    gpu = ", ".join(m["gpu"]) if m.get("gpu") else "none"
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores, GPU: {gpu}. Run {doc['when']}"
             f"{' (--quick)' if doc.get('quick') else ''}; `make bench` writes this table "
             "(`bench/results.json` has the notes). Ratio = measured / baseline, both from the same run.", "",
             "| benchmark | measured | baseline | ratio | goal | met? |", "|---|---|---|---|---|---|"]
    for r in doc["results"]:
        esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
        unit = r.get("unit", "")
        name = esc(r["name"]) + (f" — {esc(r['notes'])}" if r.get("error") else "")
        lines.append(f"| {name} | {esc(_cell(r['value'], unit))} | {esc(_cell(r['baseline'], unit))} | "
                     f"{esc(r['ratio'])} | {esc(r['goal'])} | {goal_met(r)} |")
    text = "\n".join(lines) + "\n"
    _write_atomic(path, text)
    return text


def _write_atomic(path: str, text: str) -> None:
    """Write next to ``path`` and rename, so a reader never sees half a file."""
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="much shorter runs (fewer rounds, smaller batches)")
    ap.add_argument("--only", nargs="+", metavar="NAME", help="run only these modules (e.g. sync or bench_sync)")
    ap.add_argument("--budget", type=float, metavar="SECONDS",
                    help=f"wall-clock budget of the whole run (default {TOTAL_BUDGET_S:.0f}, quick {TOTAL_BUDGET_QUICK_S:.0f})")
    ap.add_argument("--repeat", type=int, default=1, metavar="N",
                    help="run each module N times; rows report the median and the spread")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return _child(args.child, args.quick, args.out)

    modules = discover()
    if args.only:
        wanted = {n if n.startswith("bench_") else f"bench_{n}" for n in args.only}
        unknown = wanted - set(modules)
        if unknown:
            ap.error(f"unknown benchmark(s) {sorted(unknown)}; available: {', '.join(modules)}")
        modules = [m for m in modules if m in wanted]
    info = machine()
    print(f"benchmarks: {', '.join(modules)}{' (quick)' if args.quick else ''}\n"
          f"machine: {info['cpu']}, {info['cores']} cores, GPU: {info['gpu'] or 'none'}", flush=True)
    t_all = time.perf_counter()
    repeat = max(1, args.repeat)
    total = args.budget or repeat * (TOTAL_BUDGET_QUICK_S if args.quick else TOTAL_BUDGET_S)
    results: List[Dict[str, Any]] = []
    for i, module in enumerate(modules, 1):
        runs = []
        for k in range(repeat):
            limit = min(budget(module, args.quick), total - (time.perf_counter() - t_all))
            tag = f" run {k + 1}/{repeat}" if repeat > 1 else ""
            print(f"\n=== [{i}/{len(modules)}] {module}{tag} (budget {max(limit, 0):.0f} s) ===", flush=True)
            res = run_module(module, args.quick, info, limit)
            status = f"ERROR: {res['error']}" if res["error"] else f"{len(res['rows'])} rows"
            print(f"=== {module}{tag}: {status} in {res['seconds']:.0f} s ===", flush=True)
            runs.append(res["rows"])
        results.extend(merge_repeats(runs) if repeat > 1 else runs[0])
    if args.only and os.path.exists(RESULTS_JSON):  # keep the other modules' previous rows
        with open(RESULTS_JSON) as f:
            previous = json.load(f).get("results", [])
        rerun = set(modules)
        kept = [r for r in previous if r.get("module") not in rerun]
        order = {m: i for i, m in enumerate(discover())}
        results = sorted(kept + results, key=lambda r: order.get(r.get("module"), len(order)))
    doc = {"when": dt.datetime.now().astimezone().isoformat(timespec="seconds"), "quick": args.quick,
           "machine": info, "total_seconds": round(time.perf_counter() - t_all, 1), "results": results}
    _write_atomic(RESULTS_JSON, json.dumps(doc, indent=1, default=str) + "\n")
    print("\n" + write_markdown(doc))
    print(f"wrote {os.path.relpath(RESULTS_JSON)} and {os.path.relpath(RESULTS_MD)} "
          f"in {doc['total_seconds']:.0f} s")
    return 1 if any(r.get("error") for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
