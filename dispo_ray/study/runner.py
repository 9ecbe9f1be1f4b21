"""The regime study: DISPO against CISPO, DAPO and GRPO, and DISPO with each of its four windows
made too tight, on the tiny task, same steps, several seeds.

    python -m dispo_ray.study [--steps 60] [--seeds 1 2 3] [--out docs/regime_study] [--only NAME ...]
                              [-- hydra overrides applied to every run]
    python -m dispo_ray.study --lab     (the regime lab: +preset=regime_lab, 7 variants x 3 seeds,
                                         120 steps, docs/regime_lab/, verdicts in verdicts.md)

"Too tight" closes one side of one window completely (the weight may not move past 1 on that
side), which is the limit of the paper's "clipped too tightly":

    tight_high_pos  eps_high_pos = 0   correct tokens with r > 1 get w = 1     (paper: entropy falls)
    tight_low_pos   eps_low_pos  = 0   correct tokens with r < 1 get w = 1     (paper: entropy rises)
    tight_high_neg  eps_high_neg = 0   incorrect tokens with r > 1 get w = 1   (paper: repetition collapse)
    tight_low_neg   eps_low_neg  = 0   incorrect tokens with r < 1 get w = 1   (paper: length collapse)

The windows only act where ``r != 1``, so every run takes ``learner.mini_batches = 4`` optimizer
steps per rollout batch (the later mini-batches are off-policy). Runs share one local Ray; each
writes its own run dir. Output: ``<out>/runs/<variant>_s<seed>/metrics.jsonl``, PNG plots of
accuracy, entropy, response length and repetition, and ``<out>/README.md`` with the table.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Dict, List, Optional, Sequence

from dispo_ray.algorithm import metric_keys as K
from dispo_ray.study.verdicts import LAB_PRESET, series

VARIANTS: Dict[str, List[str]] = {
    "dispo": ["algorithm=dispo"],
    "cispo": ["algorithm=cispo"],
    "dapo": ["algorithm=dapo"],
    "grpo": ["algorithm=grpo"],
    "dispo_tight_high_pos": ["algorithm=dispo", "algorithm.eps_high_pos=0"],
    "dispo_tight_low_pos": ["algorithm=dispo", "algorithm.eps_low_pos=0"],
    "dispo_tight_high_neg": ["algorithm=dispo", "algorithm.eps_high_neg=0"],
    "dispo_tight_low_neg": ["algorithm=dispo", "algorithm.eps_low_neg=0"],
    # the lab's steering experiments: the too-tight windows with the adaptive controller, or with
    # the collapse guard rolling back (checkpoints every step, so the restore point is close)
    "dispo_tight_high_neg_adaptive": ["algorithm=dispo", "algorithm.eps_high_neg=0",
                                      "algorithm.adaptive_windows.enabled=true"],
    "dispo_tight_low_neg_adaptive": ["algorithm=dispo", "algorithm.eps_low_neg=0",
                                     "algorithm.adaptive_windows.enabled=true"],
    "dispo_tight_low_neg_rollback": ["algorithm=dispo", "algorithm.eps_low_neg=0",
                                     "trainer.collapse_guard.action=rollback", "trainer.save_every=1"],
}
LAB_VARIANTS = ["dispo", "cispo", "dapo", "dispo_tight_high_pos", "dispo_tight_low_pos", "dispo_tight_high_neg",
                "dispo_tight_low_neg"]
COMMON = ["generator=hf", "learner.mini_batches=4", "trainer.progress_bar=false", "trainer.tensorboard=false",
          "trainer.eval_max_prompts=100", "trainer.collapse_guard.action=warn"]
CURVES = ((K.EVAL_ACCURACY, "held-out accuracy (avg@k)"), (K.ACTOR_ENTROPY, "mean token entropy"),
          (K.ROLLOUT_RESPONSE_LENGTH, "response length (tokens)"), (K.ROLLOUT_REPETITION, "repetitive responses"))


def run_one(name: str, seed: int, steps: int, out: str, extra: Sequence[str],
            common: Sequence[str] = tuple(COMMON)) -> str:
    from dispo_ray.infra.config import compose
    from dispo_ray.rollout.driver import Trainer

    run_dir = os.path.join(out, "runs", f"{name}_s{seed}")
    if os.path.exists(os.path.join(run_dir, "summary.json")):
        return run_dir  # finished earlier: the study resumes where it stopped
    if os.path.exists(run_dir):
        import shutil
        shutil.rmtree(run_dir)
    cfg = compose(list(common) + VARIANTS[name] + [f"trainer.seed={seed}", f"trainer.total_steps={steps}",
                                             f"trainer.eval_every={max(steps // 6, 1)}", f"trainer.run_dir={run_dir}",
                                             *extra])
    trainer = Trainer(cfg)
    try:
        trainer.fit()
    finally:
        trainer.shutdown()
    import shutil
    shutil.rmtree(os.path.join(run_dir, "checkpoints"), ignore_errors=True)  # metrics are the result
    return run_dir


def _mean_sd(xs: List[float]) -> str:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not xs:
        return "n/a"
    m = sum(xs) / len(xs)
    sd = (sum((x - m) ** 2 for x in xs) / max(len(xs) - 1, 1)) ** 0.5
    return f"{m:.3f} ± {sd:.3f}"


def summarize(out: str, names: Sequence[str], seeds: Sequence[int], target_gain: float = 0.10) -> str:
    """Plots and the Markdown table from the finished runs."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from dispo_ray.infra.metrics_log import read_metrics

    runs = {(n, s): read_metrics(os.path.join(out, "runs", f"{n}_s{s}")) for n in names for s in seeds
            if os.path.exists(os.path.join(out, "runs", f"{n}_s{s}", "metrics.jsonl"))}
    panels = (("the four losses", [n for n in names if n in ("dispo", "cispo", "dapo", "grpo")]),
              ("DISPO with one window too tight", [n for n in names if n == "dispo" or n.startswith("dispo_tight")]))
    for key, title in CURVES:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True)
        for ax, (panel, members) in zip(axes, panels):
            for i, n in enumerate(members):
                curves = [dict(series(runs[(n, s)], key)) for s in seeds if (n, s) in runs]
                xs = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
                if not xs:
                    continue
                vals = [[c[x] for c in curves] for x in xs]
                mean = [sum(v) / len(v) for v in vals]
                ax.plot(xs, mean, color=f"C{i}", label=f"{n} (mean of {len(curves)})")
                ax.fill_between(xs, [min(v) for v in vals], [max(v) for v in vals], color=f"C{i}", alpha=0.15)
            ax.set_title(f"{title}: {panel}", fontsize=10)
            ax.set_xlabel("optimizer updates (rollout batches)")
            ax.legend(fontsize=7)
        axes[0].set_ylabel(title)
        fig.tight_layout()
        fig.savefig(os.path.join(out, key.replace("/", "_") + ".png"), dpi=110)
        plt.close(fig)
    lines = ["| variant | initial acc | final acc | steps to +%d pts | final entropy | final length | final repetition | collapse events |" % round(100 * target_gain),
             "|---|---|---|---|---|---|---|---|"]
    for n in names:
        init, final, reach, ent, length, rep, events = [], [], [], [], [], [], []
        for s in seeds:
            rows = runs.get((n, s))
            if not rows:
                continue
            acc = series(rows, K.EVAL_ACCURACY)
            init.append(acc[0][1])
            final.append(acc[-1][1])
            hit = [st for st, a in acc if a >= acc[0][1] + target_gain]
            reach.append(hit[0] if hit else None)
            train = [r for r in rows if K.ROLLOUT_SAMPLES in r]
            tail = train[-5:]
            ent.append(sum(r.get(K.ACTOR_ENTROPY, float("nan")) for r in tail) / len(tail))
            length.append(sum(r[K.ROLLOUT_RESPONSE_LENGTH] for r in tail) / len(tail))
            rep.append(sum(r[K.ROLLOUT_REPETITION] for r in tail) / len(tail))
            events.append(train[-1].get(K.COLLAPSE_EVENTS, 0))
        never = sum(r is None for r in reach)
        reach_txt = _mean_sd([r for r in reach if r is not None]) + (f" ({never} never)" if never else "")
        lines.append(f"| {n} | {_mean_sd(init)} | {_mean_sd(final)} | {reach_txt} | {_mean_sd(ent)} | "
                     f"{_mean_sd(length)} | {_mean_sd(rep)} | {int(sum(events))} |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: List[str] = []
    if "--" in argv:
        extra = argv[argv.index("--") + 1:]
        argv = argv[:argv.index("--")]
    p = argparse.ArgumentParser(prog="python -m dispo_ray.study", description=__doc__.split("\n\n")[0])
    p.add_argument("--lab", action="store_true", help="the regime lab (conf/preset/regime_lab.yaml)")
    p.add_argument("--steps", type=int, default=None, help="default 60, 120 with --lab")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--out", default=None, help="default docs/regime_study, docs/regime_lab with --lab")
    p.add_argument("--only", nargs="+", choices=sorted(VARIANTS), default=None)
    p.add_argument("--summarize-only", action="store_true")
    args = p.parse_args(argv)
    args.steps = args.steps or (120 if args.lab else 60)
    args.out = args.out or ("docs/regime_lab" if args.lab else "docs/regime_study")
    args.only = args.only or (LAB_VARIANTS if args.lab else list(VARIANTS))
    common = COMMON
    if args.lab:  # longer responses: vLLM generates them faster than transformers on CPU
        common = [c for c in COMMON if not c.startswith("generator=")]
        extra = [LAB_PRESET, *extra]
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    if not args.summarize_only:
        from dispo_ray.infra.config import compose
        from dispo_ray.rollout.driver import init_ray
        init_ray(compose(common + extra))
        for s in args.seeds:
            for n in args.only:
                t = time.time()
                run_one(n, s, args.steps, args.out, extra, common)
                print(f"[study] {n} seed {s}: {time.time() - t:.0f}s (total {time.time() - t0:.0f}s)", flush=True)
    shown = args.only
    if args.lab:  # the lab's summary covers every variant run so far, so the verdicts see their baselines
        shown = [n for n in VARIANTS if any(os.path.exists(os.path.join(args.out, "runs", f"{n}_s{s}", "summary.json"))
                                            for s in args.seeds)]
    table = summarize(args.out, shown, args.seeds)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table + "\n")
    if args.lab:
        from dispo_ray.study.plots import lab_outputs
        table += "\n\n" + lab_outputs(args.out, shown, args.seeds)
    if args.summarize_only:
        print(table)
        return
    with open(os.path.join(args.out, "command.json"), "w") as f:
        json.dump({"argv": ["python", "-m", "dispo_ray.study", *(sys.argv[1:] if argv is None else argv)],
                   "common_overrides": common, "extra_overrides": extra, "variants": VARIANTS}, f, indent=1)
    print(table)


if __name__ == "__main__":
    main()
