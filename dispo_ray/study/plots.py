"""The regime lab's own outputs, beside the study's common plots and table: the four regimes'
token and clip fractions over training, the entropy of correct vs incorrect responses, the spread
of the importance ratio, and ``verdicts.md`` (:mod:`dispo_ray.study.verdicts`)."""
from __future__ import annotations

import os
from typing import Dict, List, Sequence, Tuple

from dispo_ray.algorithm import metric_keys as K
from dispo_ray.algorithm.regimes import REGIMES
from dispo_ray.study.verdicts import LAB_PRESET, adaptive_table, findings, guard_table, markdown, series


def _load(out: str, names: Sequence[str], seeds: Sequence[int]) -> Dict[Tuple[str, int], List[dict]]:
    from dispo_ray.infra.metrics_log import read_metrics

    return {(n, s): read_metrics(os.path.join(out, "runs", f"{n}_s{s}")) for n in names for s in seeds
            if os.path.exists(os.path.join(out, "runs", f"{n}_s{s}", "metrics.jsonl"))}


def _mean_curve(runs, name: str, seeds: Sequence[int], key: str):

    curves = [dict(series(runs[(name, s)], key)) for s in seeds if (name, s) in runs]
    xs = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
    return xs, [sum(c[x] for c in curves) / len(curves) for x in xs]


def _grid(runs, names: Sequence[str], seeds: Sequence[int], keys: Sequence[Tuple[str, str]], path: str,
          title: str) -> None:
    """One panel per variant, one line per key (mean over seeds)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(4, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), sharey=True, squeeze=False)
    for ax, n in zip(axes.flat, names):
        for i, (key, label) in enumerate(keys):
            xs, ys = _mean_curve(runs, n, seeds, key)
            if xs:
                ax.plot(xs, ys, color=f"C{i}", label=label)
        ax.set_title(n, fontsize=9)
        ax.set_xlabel("optimizer updates (rollout batches)", fontsize=8)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def lab_outputs(out: str, names: Sequence[str], seeds: Sequence[int]) -> str:
    """Write the lab's plots and ``verdicts.md``; return the verdicts' Markdown."""
    runs = _load(out, names, seeds)
    _grid(runs, names, seeds, [(r.token_frac_key, f"{r.name} tokens") for r in REGIMES],
          os.path.join(out, "regime_token_frac.png"), "share of response tokens in each regime (mean of seeds)")
    _grid(runs, names, seeds, [(r.clip_frac_key, f"{r.name} clipped") for r in REGIMES],
          os.path.join(out, "regime_clip_frac.png"), "share of each regime's tokens whose weight was clipped")
    _grid(runs, names, seeds, [(K.ACTOR_ENTROPY_CORRECT, "correct"), (K.ACTOR_ENTROPY_INCORRECT, "incorrect")],
          os.path.join(out, "entropy_correct_incorrect.png"), "mean token entropy of correct vs incorrect responses")
    _grid(runs, names, seeds, [(K.ACTOR_RATIO_MAX, "max ratio"), (K.ACTOR_RATIO_MEAN, "mean ratio")],
          os.path.join(out, "ratio_spread.png"), "importance ratio pi_theta / pi_behaviour in the loss")
    from dispo_ray.infra.config import compose

    guard_cfg = compose([LAB_PRESET]).trainer.collapse_guard  # today's guard, replayed on every run
    text = markdown(findings(runs), guard_table(runs, guard_cfg), adaptive_table(runs))
    with open(os.path.join(out, "verdicts.md"), "w") as f:
        f.write(text + "\n")
    return text
