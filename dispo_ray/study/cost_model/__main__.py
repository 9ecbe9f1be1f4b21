"""``python -m dispo_ray.study.cost_model``: one setup's step breakdown, ``--checks`` (the model against
published numbers) or ``--sizing`` (the GPU split table of docs/scaling.md)."""
from __future__ import annotations

import argparse
from typing import List, Optional

from dispo_ray.study.cost_model.checks import check_rows, sizing_rows
from dispo_ray.study.cost_model.model import GPUS, MODELS, Lengths, Setup, engine_batch_limit, step

def _fmt(x: float) -> str:
    return f"{x:.3g}" if x < 10 else f"{x:.0f}"


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="python -m dispo_ray.study.cost_model", description=__doc__.split("\n\n")[0].replace("``", ""))
    p.add_argument("--model", choices=sorted(MODELS), default="7b")
    p.add_argument("--gpu", choices=sorted(GPUS), default="h100")
    p.add_argument("--gen-gpus", type=int, default=8)
    p.add_argument("--learn-gpus", type=int, default=8)
    p.add_argument("--tp", type=int, default=1, help="generator tensor-parallel size")
    p.add_argument("--zero-stage", type=int, choices=(1, 2, 3), default=3)
    p.add_argument("--k", type=int, default=0, help="trainer.max_staleness")
    p.add_argument("--prompts", type=int, default=128, help="prompts per step")
    p.add_argument("--group", type=int, default=16, help="samples per prompt")
    p.add_argument("--prompt-tokens", type=float, default=256.0)
    p.add_argument("--median", type=float, default=300.0, help="response length median")
    p.add_argument("--p95", type=float, default=2000.0, help="response length p95")
    p.add_argument("--max-new-tokens", type=int, default=4096)
    p.add_argument("--reward-workers", type=int, default=64)
    p.add_argument("--mfu", type=float, default=Setup.mfu)
    p.add_argument("--checks", action="store_true", help="print the model against published numbers")
    p.add_argument("--sizing", action="store_true", help="print the GPU split table")
    a = p.parse_args(argv)
    if a.checks:
        print("| check | published | model | model / published |")
        print("|---|---:|---:|---:|")
        for r in check_rows():
            mark = " (calibrated)" if r["calibrated"] else ""
            print(f"| {r['name']}{mark} | {_fmt(r['published'])} s | {_fmt(r['model'])} s | {r['ratio']:.2f} |")
        return
    if a.sizing:
        print("| model | GPUs | k | generators : learners | step s | generate s | train s | sync s |")
        print("|---|---:|---:|---|---:|---:|---:|---:|")
        for r in sizing_rows():
            print(f"| {MODELS[r['model']].name} | {r['total']} | {r['k']} | {r['gen_gpus']} : {r['learn_gpus']} | "
                  f"{_fmt(r['step_s'])} | {_fmt(r['generate_s'])} | {_fmt(r['train_s'])} | {_fmt(r['sync_s'])} |")
        return
    s = Setup(model=MODELS[a.model], lengths=Lengths(a.median, a.p95, a.max_new_tokens), gen_gpus=a.gen_gpus,
              learn_gpus=a.learn_gpus, prompts=a.prompts, group=a.group, prompt_tokens=a.prompt_tokens, tp=a.tp,
              zero_stage=a.zero_stage, k=a.k, gpu=GPUS[a.gpu], reward_workers=a.reward_workers, mfu=a.mfu)
    b = step(s)
    m = s.model
    print(f"{m.name}: {m.params / 1e9:.2f} B parameters, {m.weight_bytes / 1e9:.1f} GB bf16, "
          f"KV {m.kv_bytes_per_token / 1024:.0f} KiB/token; {s.gpu.name}; {s.samples} samples/step, "
          f"mean response {s.lengths.mean:.0f} tokens, longest ~{s.lengths.expected_max(s.samples):.0f}")
    print(f"generators {s.gen_gpus} GPUs (tp {s.tp}, {engine_batch_limit(s):.0f} sequences/engine), "
          f"learners {s.learn_gpus} GPUs (ZeRO-{s.zero_stage}), k = {s.k}")
    for key, v in b.as_dict().items():
        print(f"  {key:<11} {v:10.2f}")
    formula = "generate + reward + train + sync" if s.k == 0 else "max(generate + reward, train) + sync"
    print(f"  step = {formula}")


if __name__ == "__main__":
    main()
