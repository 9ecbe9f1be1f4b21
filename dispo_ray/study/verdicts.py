"""Verdicts of the regime lab (``python -m dispo_ray.study --lab``): each of DISPO's four findings,
DISPO against DAPO and CISPO, and the collapse guard, judged on the study's runs.

A statistic is computed per run; a variant's value is its mean over seeds, its spread the sample
standard deviation over seeds. An effect is the difference of two variants' means; it is
**reproduced** when it has the predicted sign and exceeds twice the seed spread (the larger of the
two variants' spreads), else **not reproduced**.

    finding (../shared/PAPER.md)               variant vs dispo        statistic per run                        predicted
    correct, w > 1 raise entropy               eps_high_pos = 0        entropy of correct responses, last 1/4    lower
    correct, w < 1 lower entropy               eps_low_pos = 0         entropy of correct responses, last 1/4    higher
    incorrect, w > 1 clipped: repetition       eps_high_neg = 0        repetition, highest 5-step mean           higher
    incorrect, w < 1 clipped: length collapse  eps_low_neg = 0         response length, lowest 5-step mean       lower
    DISPO learns faster than DAPO              dapo                    mean held-out accuracy over evaluations   lower
    DISPO is steadier than CISPO               cispo                   largest fall of accuracy below its peak   higher

The guard check: a run *collapses* when its held-out accuracy falls more than ``FALL`` below its
first evaluation (the warm start's level: the run has destroyed what it started with; a fall
below a running peak is too often evaluation noise on 100 problems); the guard passes on it when
its first event came before the step of the first evaluation showing that fall. Runs of the
default windows must show no event at all.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from dispo_ray.algorithm import metric_keys as K

Rows = List[dict]
FALL = 0.10
LAB_PRESET = "+preset=regime_lab"  # the lab's config (conf/preset/regime_lab.yaml)


def series(rows: Rows, key: str) -> List[tuple]:
    """(updates done, value): the initial evaluation is at 0, the i-th training step at i."""
    out, updates = [], 0
    for r in rows:
        updates += K.ROLLOUT_SAMPLES in r
        if isinstance(r.get(key), (int, float)):
            out.append((updates, r[key]))
    return out


def _train_rows(rows: Rows) -> Rows:
    return [r for r in rows if K.ROLLOUT_SAMPLES in r]


def _num(rows: Rows, key: str) -> List[float]:
    return [float(r[key]) for r in rows if isinstance(r.get(key), (int, float)) and not math.isnan(float(r[key]))]


def late_mean(key: str) -> Callable[[Rows], Optional[float]]:
    """Mean of ``key`` over the last quarter of the training steps."""
    def stat(rows: Rows) -> Optional[float]:
        vals = _num(_train_rows(rows), key)
        tail = vals[-max(len(vals) // 4, 1):]
        return sum(tail) / len(tail) if tail else None
    return stat


def window_extreme(key: str, pick: Callable = max, width: int = 5) -> Callable[[Rows], Optional[float]]:
    """The highest (``pick=max``) or lowest 5-step running mean of ``key`` over the run."""
    def stat(rows: Rows) -> Optional[float]:
        vals = _num(_train_rows(rows), key)
        if not vals:
            return None
        w = min(width, len(vals))
        return pick(sum(vals[i:i + w]) / w for i in range(len(vals) - w + 1))
    return stat


def mean_accuracy(rows: Rows) -> Optional[float]:
    acc = _num(rows, K.EVAL_ACCURACY)
    return sum(acc) / len(acc) if acc else None


def largest_fall(rows: Rows) -> Optional[float]:
    """Largest drop of held-out accuracy below its running peak (0 when it never falls)."""
    acc = _num(rows, K.EVAL_ACCURACY)
    peak, fall = -1.0, 0.0
    for a in acc:
        peak = max(peak, a)
        fall = max(fall, peak - a)
    return fall if acc else None


# (finding, variant, baseline, statistic name, statistic, predicted sign of variant - baseline)
FINDINGS: Tuple[tuple, ...] = (
    ("correct, weight > 1 raises entropy", "dispo_tight_high_pos", "dispo", "entropy of correct responses (last 1/4)",
     late_mean(K.ACTOR_ENTROPY_CORRECT), -1),
    ("correct, weight < 1 lowers entropy", "dispo_tight_low_pos", "dispo", "entropy of correct responses (last 1/4)",
     late_mean(K.ACTOR_ENTROPY_CORRECT), +1),
    ("incorrect, weight > 1 clipped: repetition collapse", "dispo_tight_high_neg", "dispo",
     "repetition (highest 5-step mean)", window_extreme(K.ROLLOUT_REPETITION, max), +1),
    ("incorrect, weight < 1 clipped: length collapse", "dispo_tight_low_neg", "dispo",
     "response length (lowest 5-step mean)", window_extreme(K.ROLLOUT_RESPONSE_LENGTH, min), -1),
    ("DISPO learns faster than DAPO", "dapo", "dispo", "mean held-out accuracy over evaluations", mean_accuracy, -1),
    ("DISPO is steadier than CISPO", "cispo", "dispo", "largest fall of held-out accuracy below its peak",
     largest_fall, +1),
)


def _mean_sd(xs: Sequence[float]) -> Tuple[float, float]:
    m = sum(xs) / len(xs)
    return m, (sum((x - m) ** 2 for x in xs) / max(len(xs) - 1, 1)) ** 0.5


def verdict(variant_vals: Sequence[float], base_vals: Sequence[float], sign: int) -> Dict[str, object]:
    """Effect (variant mean - baseline mean), spread, and whether it is reproduced."""
    (mv, sv), (mb, sb) = _mean_sd(variant_vals), _mean_sd(base_vals)
    effect, spread = mv - mb, max(sv, sb)
    ok = effect * sign > 0 and abs(effect) > 2 * spread
    return {"variant_mean": mv, "variant_sd": sv, "base_mean": mb, "base_sd": sb, "effect": effect,
            "spread": spread, "reproduced": ok}


def findings(runs: Dict[Tuple[str, int], Rows]) -> List[Dict[str, object]]:
    out = []
    for name, variant, base, stat_name, stat, sign in FINDINGS:
        v = [x for (n, _), rows in runs.items() if n == variant for x in [stat(rows)] if x is not None]
        b = [x for (n, _), rows in runs.items() if n == base for x in [stat(rows)] if x is not None]
        row = {"finding": name, "variant": variant, "baseline": base, "statistic": stat_name,
               "predicted": "lower" if sign < 0 else "higher", "seeds": (len(v), len(b))}
        row.update(verdict(v, b, sign) if v and b else {"reproduced": None})
        out.append(row)
    return out


def replay_guard(rows: Rows, guard_cfg) -> Optional[int]:
    """Step at which :class:`CollapseGuard` with ``guard_cfg`` first fires on the run's logged
    metric stream. The study runs the guard in ``warn`` mode, which changes nothing in training,
    so replaying the logged stream gives exactly the events the guard would have raised -- also
    for a guard newer than the runs."""
    from dispo_ray.algorithm.collapse_guard import CollapseGuard

    guard = CollapseGuard(guard_cfg)
    for r in _train_rows(rows):
        if guard.update(int(r["step"]), r):
            return int(r["step"])
    return None


def guard_check(rows: Rows, fall: float = FALL, guard_cfg=None) -> Dict[str, Optional[int]]:
    """Step of the first guard event (replayed with ``guard_cfg`` when given, else as logged),
    step of the first evaluation ``fall`` below the first one (None when it never happens)."""
    if guard_cfg is not None:
        first_event = replay_guard(rows, guard_cfg)
    else:
        first_event = next((int(r["step"]) for r in _train_rows(rows) if r.get(K.COLLAPSE_EVENTS, 0) > 0), None)
    start, fell_at = None, None
    for r in rows:
        a = r.get(K.EVAL_ACCURACY)
        if not isinstance(a, (int, float)):
            continue
        start = a if start is None else start
        if start - a > fall:
            fell_at = int(r["step"])
            break
    return {"first_event": first_event, "fell_at": fell_at}


def guard_table(runs: Dict[Tuple[str, int], Rows], guard_cfg=None) -> List[Dict[str, object]]:
    """Per run: collapsed?, guard first event, and pass/fail (collapsed: an event before the
    fall; default windows: no event at all)."""
    out = []
    for (n, s), rows in sorted(runs.items()):
        if n.endswith("_rollback"):  # its guard acted and rewound the run: a replay would not be exact
            continue
        g = guard_check(rows, guard_cfg=guard_cfg)
        if n == "dispo":
            ok = g["first_event"] is None
        elif g["fell_at"] is not None:
            ok = g["first_event"] is not None and g["first_event"] < g["fell_at"]
        else:
            ok = None  # no collapse, nothing to catch
        out.append({"variant": n, "seed": s, **g, "pass": ok})
    return out


def final_accuracy(rows: Rows) -> Optional[float]:
    acc = _num(rows, K.EVAL_ACCURACY)
    return acc[-1] if acc else None


def adaptive_table(runs: Dict[Tuple[str, int], Rows], margin: float = 0.02) -> List[Dict[str, object]]:
    """For each ``<tight variant>_adaptive`` run: did it avoid the collapse (held-out accuracy
    never more than ``FALL`` below its first evaluation), and its final accuracy against fixed-window
    DISPO's mean final accuracy minus ``margin``. Passes when >= 2 of its seeds avoid the collapse
    and its mean final accuracy clears that bar."""
    base = [x for (n, _), rows in runs.items() if n == "dispo" for x in [final_accuracy(rows)] if x is not None]
    bar = sum(base) / len(base) - margin if base else None
    out = []
    for name in sorted({n for n, _ in runs if n.endswith("_adaptive")}):
        seeds = sorted(s for n, s in runs if n == name)
        avoided = [guard_check(runs[(name, s)])["fell_at"] is None for s in seeds]
        finals = [final_accuracy(runs[(name, s)]) for s in seeds]
        mean_final = sum(f for f in finals if f is not None) / max(sum(f is not None for f in finals), 1)
        fixed = [final_accuracy(runs[(name[:-len("_adaptive")], s)]) for s in seeds
                 if (name[:-len("_adaptive")], s) in runs]
        out.append({"variant": name, "seeds": seeds, "avoided": avoided, "finals": finals, "mean_final": mean_final,
                    "fixed_finals": fixed, "bar": bar,
                    "pass": bar is not None and sum(avoided) >= 2 and mean_final >= bar})
    return out


def markdown(finds: List[Dict[str, object]], guards: List[Dict[str, object]],
             adaptive: Sequence[Dict[str, object]] = ()) -> str:
    lines = ["| finding | variant vs baseline | statistic | variant (mean ± sd) | baseline (mean ± sd) | "
             "effect | 2 x spread | predicted | verdict |", "|---|---|---|---|---|---|---|---|---|"]
    for f in finds:
        if f["reproduced"] is None:
            lines.append(f"| {f['finding']} | {f['variant']} vs {f['baseline']} | {f['statistic']} | - | - | - | - | "
                         f"{f['predicted']} | not measured |")
            continue
        lines.append(f"| {f['finding']} | {f['variant']} vs {f['baseline']} | {f['statistic']} | "
                     f"{f['variant_mean']:.3f} ± {f['variant_sd']:.3f} | {f['base_mean']:.3f} ± {f['base_sd']:.3f} | "
                     f"{f['effect']:+.3f} | {2 * f['spread']:.3f} | {f['predicted']} | "
                     f"{'**reproduced**' if f['reproduced'] else 'not reproduced'} |")
    lines += ["", f"Collapse guard, replayed with today's settings on each run's logged metrics (a collapse = "
              f"held-out accuracy more than {FALL:.0%} below its first evaluation):", "",
              "| run | first guard event (step) | accuracy fell (step) | guard |", "|---|---|---|---|"]
    for g in guards:
        verdict_txt = {True: "pass", False: "**FAIL**", None: "no collapse"}[g["pass"]]
        lines.append(f"| {g['variant']} s{g['seed']} | {g['first_event'] if g['first_event'] is not None else '-'} | "
                     f"{g['fell_at'] if g['fell_at'] is not None else '-'} | {verdict_txt} |")
    if adaptive:
        lines += ["", "Adaptive windows started from a too-tight window (pass: the collapse avoided in >= 2 of 3 "
                  "seeds and mean final accuracy >= fixed-window DISPO's minus 2 points):", "",
                  "| variant | collapse avoided per seed | final accuracy per seed | same window fixed | bar | verdict |",
                  "|---|---|---|---|---|---|"]
        for a in adaptive:
            fmt = lambda xs: ", ".join("-" if x is None else f"{x:.3f}" for x in xs)  # noqa: E731
            lines.append(f"| {a['variant']} | {', '.join('yes' if v else 'no' for v in a['avoided'])} | "
                         f"{fmt(a['finals'])} | {fmt(a['fixed_finals'])} | "
                         f"{'-' if a['bar'] is None else format(a['bar'], '.3f')} | "
                         f"{'**pass**' if a['pass'] else 'fail'} |")
    return "\n".join(lines)
