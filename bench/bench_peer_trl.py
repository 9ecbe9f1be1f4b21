"""Peer benchmark: dispo-ray against Hugging Face TRL's ``GRPOTrainer`` on the same machine, model,
problems and settings, all in this run. Every row is a ratio dispo-ray / TRL (lower is better for
times, higher for accuracy).

Workload (matched): the warm-started tiny model folder of the embedded default, its train and
validation parquet, RL steps of 16 prompts x 8 samples, 2 optimizer steps per batch in
micro-batches of 16, max 32 new tokens, temperature 1, lr 2e-4 constant AdamW (betas 0.9/0.999,
no weight decay, grad clip 1), DAPO loss (clip 0.2 / 0.28, token-mean), no KL, group-normalised
advantages; held-out avg@4 on the same 200 validation problems every 10 steps. TRL 1.16.0 runs on
CPU with transformers generation (``use_cpu=True``, ``bf16=False``, no gradient checkpointing),
installed on first use into its own venv under ``model.cache_dir`` (never into the project's:
that venv sees the project's packages through a ``.pth`` file and holds only what TRL adds).

TRL runs twice, with torch on 1 thread and on 2, and the faster is the baseline.

Not matched, by design: dispo-ray's dynamic sampling (TRL has none), so dispo-ray's DAPO runs
once with it (its default) and once without; TRL scores rewards in its own process, dispo-ray in
its sandboxed pool; dispo-ray's learner and generator each run one torch thread, in their own
Ray actors. Runs: TRL dapo, dispo-ray dapo, dispo-ray dapo without dynamic
sampling, dispo-ray's default (dispo loss), the default with generation overlapping training
(``trainer.max_staleness=1``: samples at most one version old, which TRL's second optimizer step
per generation batch also trains on), and the generation-heavy runs (below).

Measured per run: median seconds per RL step (steps 5..N, evaluation left out), start-up
(launch to the first step, the step-0 evaluation left out), whole-command wall, machine
CPU-seconds (``/proc/stat`` busy time over the run; the machine is otherwise idle), held-out
accuracy at each evaluation, and the training wall time to reach ``THRESHOLD`` held-out accuracy
(start-up + step times up to the first evaluation at or above it; evaluation left out).

Generation-heavy variant: a larger random-init model (hidden 256, 4 layers) with its
end-of-sequence logit suppressed, so every response runs the full 128 new tokens; rewards are
all zero (the rows compare speed only), dynamic sampling off, 6 steps (median of steps 5-6), no evaluation.
Run batch-synchronous, with ``max_staleness=1``, and with ``max_staleness=1`` and streaming rollouts
(``trainer.rollout_mode=stream``). Every response has the same length here, so streaming has no tail
to hide: what it can gain is the weight sync no longer waiting for the rollout in flight.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional

BUDGET_S = 2400
BUDGET_QUICK_S = 900
TRL_VERSION = "1.16.0"
THRESHOLD = 0.30
STARTUP_GOAL_S = 30.0
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
WORKLOAD = {"prompts_per_step": 16, "group_size": 8, "mini_batches": 2, "micro_batch_size": 16,
            "max_new_tokens": 32, "lr": 2e-4, "clip_low": 0.2, "clip_high": 0.28, "eval_k": 4,
            "eval_prompts": 200, "seed": 1}


def _busy_cpu_s() -> float:
    """Machine-wide busy CPU seconds (all but idle and iowait) from ``/proc/stat``."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def trl_python(cache_dir: str) -> str:
    """The interpreter of TRL's venv, created and filled on first use."""
    import sysconfig

    import torch
    import transformers

    venv = os.path.join(os.path.expanduser(cache_dir), f"bench-trl-{TRL_VERSION}")
    py = os.path.join(venv, "bin", "python")
    stamp = os.path.join(venv, ".installed")
    if os.path.exists(stamp):
        return py
    subprocess.run([sys.executable, "-m", "venv", "--clear", venv], check=True)
    site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], check=True,
                          capture_output=True, text=True).stdout.strip()
    with open(os.path.join(site, "_dispo_project.pth"), "w") as f:  # the project's packages, after TRL's own
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    pins = os.path.join(venv, "constraints.txt")
    with open(pins, "w") as f:  # never replace the project's torch (an unpinned one is a CUDA build)
        f.write(f"torch=={torch.__version__.split('+')[0]}\ntransformers=={transformers.__version__}\n")
    done = subprocess.run([py, "-m", "pip", "install", "-q", "-c", pins, f"trl=={TRL_VERSION}"],
                          capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"installing trl=={TRL_VERSION} into {venv} failed: {done.stderr.strip()[-500:]}")
    open(stamp, "w").close()
    return py


def _env() -> Dict[str, str]:
    from bench.run_all import ENV_DEFAULTS

    env = {**os.environ, **ENV_DEFAULTS}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _timed(cmd: List[str], log_path: str) -> Dict[str, float]:
    t0, c0 = time.time(), _busy_cpu_s()
    with open(log_path, "w") as log:
        rc = subprocess.run(cmd, cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT).returncode
    wall, cpu = time.time() - t0, _busy_cpu_s() - c0
    if rc:
        with open(log_path) as f:
            tail = f.read()[-1500:]
        raise RuntimeError(f"{' '.join(cmd[:4])} ... exited {rc}; log {log_path}:\n{tail}")
    return {"launch_time": t0, "wall_s": wall, "cpu_s": cpu}


def run_trl(py: str, spec: Dict[str, Any], tmp: str, name: str) -> Dict[str, Any]:
    spec = {**spec, "output_dir": os.path.join(tmp, name), "launch_time": time.time()}
    spec_path, out_path = os.path.join(tmp, f"{name}.spec.json"), os.path.join(tmp, f"{name}.out.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    timing = _timed([py, os.path.join(HERE, "peer_trl_child.py"), spec_path, out_path], os.path.join(tmp, f"{name}.log"))
    with open(out_path) as f:
        out = json.load(f)
    return {**timing, "step_s": out["step_s"], "startup_s": out["startup_s"],
            "accuracy": {int(k): v for k, v in out["accuracy"].items()}}


def run_dispo(overrides: List[str], steps: int, eval_every: int, tmp: str, name: str) -> Dict[str, Any]:
    from dispo_ray.infra.metrics_log import read_metrics

    run_dir = os.path.join(tmp, name)
    w = WORKLOAD
    args = [f"trainer.total_steps={steps}", f"trainer.eval_every={eval_every}", f"trainer.run_dir={run_dir}",
            f"trainer.prompts_per_step={w['prompts_per_step']}", f"algorithm.group_size={w['group_size']}",
            f"learner.mini_batches={w['mini_batches']}", f"learner.micro_batch_size={w['micro_batch_size']}",
            f"learner.lr={w['lr']}", f"trainer.eval_k={w['eval_k']}", f"trainer.eval_max_prompts={w['eval_prompts']}",
            "trainer.progress_bar=false", "trainer.tensorboard=false", f"trainer.seed={w['seed']}", *overrides]
    timing = _timed([sys.executable, "-m", "dispo_ray.main", *args], os.path.join(tmp, f"{name}.log"))
    rows = read_metrics(run_dir)
    steps_rows = [r for r in rows if r["step"] >= 1]
    first = steps_rows[0]
    # the first step began at (its end) - (its own time) - (an evaluation logged with it)
    began = first["time"] - first["timing/step"] - first.get("timing/eval", 0.0)
    step0_eval = next((r.get("timing/eval", 0.0) for r in rows if r["step"] == 0), 0.0)
    return {**timing, "step_s": [r["timing/step"] for r in steps_rows],
            "startup_s": began - timing["launch_time"] - step0_eval,
            "accuracy": {int(r["step"]): r["eval/accuracy"] for r in rows if "eval/accuracy" in r}}


def best_trl(py: str, spec: Dict[str, Any], tmp: str, name: str) -> Dict[str, Any]:
    """TRL at its fastest: torch on 1 thread and on both cores (1 was its fastest on some 2-core
    machines, 2 on others); the run with the lower median step is the baseline."""
    runs = {t: summarize(run_trl(py, {**spec, "torch_threads": t}, tmp, f"{name}_t{t}")) for t in (1, 2)}
    best = min(runs, key=lambda t: runs[t]["step_median_s"])
    return {**runs[best], "threads": best, "by_threads": {t: round(r["step_median_s"], 4) for t, r in runs.items()}}


def summarize(run: Dict[str, Any]) -> Dict[str, Any]:
    """Median step (steps 5..N), and the training wall time to the first evaluation >= THRESHOLD."""
    steps = run["step_s"]
    reach: Optional[float] = None
    for step in sorted(run["accuracy"]):
        if run["accuracy"][step] >= THRESHOLD:
            reach = run["startup_s"] + sum(steps[:step])
            break
    last = max(run["accuracy"]) if run["accuracy"] else None
    return {"step_median_s": statistics.median(steps[4:] or steps), "startup_s": run["startup_s"],
            "wall_s": run["wall_s"], "cpu_s": run["cpu_s"], "to_threshold_s": reach,
            "final_accuracy": run["accuracy"].get(last) if last is not None else None, "final_step": last,
            "accuracy": run["accuracy"]}


def heavy_model_dir(cache_dir: str) -> str:
    """A random-init 4-layer model whose responses always run to the token limit (its EOS row of
    the untied output layer is set so the EOS logit sits far below every other)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dispo_ray.infra.config import compose
    from dispo_ray.tiny.model import build_tiny_model

    out = os.path.join(os.path.expanduser(cache_dir), "bench-heavy-model-v1")
    if os.path.exists(os.path.join(out, "config.json")):
        return out
    cfg = compose(["model.tiny.hidden_size=256", "model.tiny.num_layers=4", "model.tiny.num_heads=4",
                   "model.tiny.num_kv_heads=2", "model.tiny.intermediate_size=768"])
    base = build_tiny_model(cfg.model, tied=False)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(base)
    with torch.no_grad():
        model.model.norm.weight.mul_(20.0)  # spread the logits: EOS at 0 is then never sampled
        model.lm_head.weight[tok.eos_token_id].zero_()
    tmp = tempfile.mkdtemp(prefix=".heavy-", dir=os.path.dirname(out))
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, out)
    return out


def _ratio_rows(label: str, ours: Dict[str, Any], peer: Dict[str, Any], speed_only: bool = False,
                step_goal: str = "<= 1.0") -> List[Dict]:
    rows = []

    def add(metric: str, key: str, unit: str, goal: str, notes: str = "", met: Optional[bool] = None) -> None:
        v, b = ours[key], peer[key]
        ratio = round(v / b, 3) if v is not None and b else "-"
        rows.append({"name": f"peer TRL, {label}: {metric} dispo-ray / TRL", "value": v if v is not None else "-",
                     "baseline": b if b is not None else "-", "ratio": ratio, "goal": goal, "unit": unit,
                     "notes": notes, **({} if met is None else {"met": met})})

    add("seconds per RL step (median, steps 5..N)", "step_median_s", "s", step_goal,
        f"TRL at its faster torch thread count ({peer.get('threads')}; median step by threads {peer.get('by_threads')})")
    # the start-up goal is absolute (vLLM engine up and step 1 begun within 30 s)
    add("start-up to step 1", "startup_s", "s", f"dispo-ray <= {STARTUP_GOAL_S:.0f} s",
        met=ours["startup_s"] <= STARTUP_GOAL_S)
    add("whole-command wall", "wall_s", "s", "<= 1.0")
    add("machine CPU-seconds", "cpu_s", "CPU-s", "-")
    if not speed_only:
        add(f"training wall to {THRESHOLD:.0%} held-out avg@4", "to_threshold_s", "s", "<= 1.0",
            "'-' = not reached within the run")
        add(f"held-out avg@4 at step {ours['final_step']}", "final_accuracy", "accuracy", "-",
            f"dispo-ray {ours['accuracy']}, TRL {peer['accuracy']}")
    return rows


def main(quick: bool = False) -> List[Dict]:
    from dispo_ray.infra.config import compose
    from dispo_ray.tiny.task import tiny_task_files
    from dispo_ray.tiny.warmstart import warm_started_model_dir

    cfg = compose([])
    model_dir = warm_started_model_dir(cfg)  # built (or reused) before anything is timed
    train, val = tiny_task_files(cfg)
    py = trl_python(cfg.model.cache_dir)
    steps, every = (20, 10) if quick else (60, 10)
    spec = {**WORKLOAD, "model_dir": model_dir, "train_files": [train], "val_files": [val], "steps": steps,
            "eval_every": every}
    runs: Dict[str, Dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-peer-") as tmp:
        runs["trl"] = best_trl(py, spec, tmp, "trl")
        runs["dapo"] = summarize(run_dispo(["algorithm=dapo"], steps, every, tmp, "dapo"))
        runs["dapo_nodyn"] = summarize(run_dispo(["algorithm=dapo", "algorithm.dynamic_sampling=false"],
                                                 steps, every, tmp, "dapo_nodyn"))
        runs["dispo"] = summarize(run_dispo([], steps, every, tmp, "dispo"))
        runs["dispo_k1"] = summarize(run_dispo(["trainer.max_staleness=1"], steps, every, tmp, "dispo_k1"))
        heavy = heavy_model_dir(cfg.model.cache_dir)
        hsteps, hnew = (3, 128) if quick else (6, 128)
        hspec = {**spec, "model_dir": heavy, "steps": hsteps, "eval_every": 0, "eval_prompts": 8, "eval_k": 1,
                 "max_new_tokens": hnew}
        runs["trl_heavy"] = best_trl(py, hspec, tmp, "trl_heavy")
        heavy_args = [f"model.path={heavy}", f"generator.max_new_tokens={hnew}", "algorithm.dynamic_sampling=false",
                      "trainer.eval_max_prompts=8", "trainer.eval_k=1"]
        runs["dispo_heavy"] = summarize(run_dispo(heavy_args, hsteps, 0, tmp, "dispo_heavy"))
        runs["dispo_heavy_k1"] = summarize(run_dispo(heavy_args + ["trainer.max_staleness=1"], hsteps, 0, tmp,
                                                     "dispo_heavy_k1"))
        runs["dispo_heavy_stream"] = summarize(run_dispo(
            heavy_args + ["trainer.max_staleness=1", "trainer.rollout_mode=stream"], hsteps, 0, tmp, "dispo_heavy_stream"))
    print(json.dumps(runs, indent=1, default=str), flush=True)
    rows = []
    rows += _ratio_rows("dapo (dynamic sampling on, dispo-ray's default)", runs["dapo"], runs["trl"])
    rows += _ratio_rows("dapo, dynamic sampling off", runs["dapo_nodyn"], runs["trl"])
    rows += _ratio_rows("dispo-ray's default dispo loss vs TRL dapo", runs["dispo"], runs["trl"])
    rows += _ratio_rows("dispo loss, generation overlapping training (trainer.max_staleness=1)", runs["dispo_k1"],
                        runs["trl"])
    heavy_label = f"generation-heavy ({hnew}-token responses, 4-layer model)"
    # the heavy goal is wall to the threshold <= 0.5x; a random-init model has no accuracy to
    # reach, so seconds per step stand in for it (docs/benchmarks.md, "Against TRL")
    rows += _ratio_rows(heavy_label, runs["dispo_heavy"], runs["trl_heavy"], speed_only=True, step_goal="<= 0.5")
    rows += _ratio_rows(heavy_label + ", max_staleness=1", runs["dispo_heavy_k1"], runs["trl_heavy"],
                        speed_only=True, step_goal="<= 0.5")
    rows += _ratio_rows(heavy_label + ", max_staleness=1, streaming rollouts", runs["dispo_heavy_stream"],
                        runs["trl_heavy"], speed_only=True, step_goal="<= 0.5")
    return rows


if __name__ == "__main__":
    for row in main(quick="--quick" in sys.argv):
        print(row)
