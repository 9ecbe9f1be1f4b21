"""The synthetic arithmetic task of the embedded default, written as verl-style parquet.

A problem is ``a <op> b`` with ``op`` from ``data.tiny_task.ops`` and operands of 1 to
``max_digits`` digits (the digit count is drawn uniformly first, so short and long numbers are
equally common). The prompt is the bare expression, e.g. ``"12+7="``, and the correct response is
``"\\boxed{19}"`` -- prompts and answers stay a handful of characters, so generating and training
on them is cheap, yet 2-digit sums and differences with carries are hard enough that a short warm
start leaves the model imperfect and RL has something to improve.

With ``data.tiny_task.style: working`` (the regime lab's task, additions only) the correct response
writes out the column-by-column working before the answer, least significant column first, one
line per column ``x+y+carry=sum`` (the carry into the next column is the sum's tens digit)::

    "478+56=" -> "8+6+0=14\n7+5+1=13\n4+0+1=5\n\boxed{534}"

so responses run ~20-70 tokens and their length and repetition can move freely under RL, while the
reward still reads only the boxed answer.

With ``data.tiny_task.digits: longtail`` (``+preset=longtail``, the CPU long-tail workload of
streaming rollouts) the column count ``n`` -- the digits of the longer operand; the other has 1 to
``n`` digits, uniformly, on either side -- is a discrete Pareto of index 1 capped at ``max_digits``:
``P(n >= k) = 1 / (2k - 3)`` for ``2 <= k <= max_digits``, i.e. ``P(n = 2) = 2/3``, ``P(n = 3) =
2/15``, ``P(n = k) = 2 / ((2k - 3)(2k - 1))``, and the cap takes the tail, ``1 / (2 max_digits - 3)``
(:func:`longtail_columns`, :func:`longtail_probability`). With the preset's ``working`` style and
28 columns the correct responses run 27 tokens at the median and ~270 at p99 (290 at most), the
p99 / median >= 8 of reasoning traces; a repeated problem redraws its operands, not its column
count, so the split follows the law. The default ``digits: uniform`` draws each operand's digit
count uniformly from 1 to ``max_digits`` as described above.

Distinct problems are drawn under ``data.tiny_task.seed``; the first ``num_val`` form the
validation split and the next ``num_train`` the training split, so the two never share a problem.

Columns (as verl-style math datasets): ``data_source`` (``"tiny_arith"``), ``prompt`` (a list of
chat messages, one user turn), ``reward_model`` (``{ground_truth, style: "rule"}``) and
``extra_info`` (``{split, index, a, b, op}``; ``a`` and ``b`` as decimal strings in a file whose
operands exceed int64).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import asdict, is_dataclass
from typing import Any, Dict, List, Tuple

DATA_SOURCE = "tiny_arith"
FORMAT_VERSION = 1
OPS = ("+", "-", "*")  # data.tiny_task.ops's choices (solve)
STYLES = ("answer", "working")  # data.tiny_task.style's choices (response_text)
DIGITS = ("uniform", "longtail")  # data.tiny_task.digits's choices (make_problems)


def prompt_text(a: int, op: str, b: int) -> str:
    return f"{a}{op}{b}="


def solve(a: int, op: str, b: int) -> int:
    return {"+": a + b, "-": a - b, "*": a * b}[op]


def solution_text(answer: int) -> str:
    """The correct response: the answer in ``\\boxed{}`` and nothing else."""
    return "\\boxed{" + str(answer) + "}"


def working_text(a: int, b: int) -> str:
    """Column-by-column working of ``a + b`` (see the module docstring), ending in the boxed sum."""
    lines, carry = [], 0
    for i in range(max(len(str(a)), len(str(b)))):
        x, y = a // 10 ** i % 10, b // 10 ** i % 10
        total = x + y + carry
        lines.append(f"{x}+{y}+{carry}={total}")
        carry = total // 10
    return "\n".join(lines + [solution_text(a + b)])


def response_text(a: int, op: str, b: int, style: str = "answer") -> str:
    """The correct response in ``style``: ``answer`` (the boxed answer only) or ``working``."""
    if style == "working":
        if op != "+":
            raise ValueError(f"data.tiny_task.style=working writes out additions only, got {op!r}")
        return working_text(a, b)
    return solution_text(solve(a, op, b))


def _operand(rng: random.Random, max_digits: int) -> int:
    return _operand_of(rng, rng.randint(1, max_digits))


def longtail_columns(u: float, max_digits: int) -> int:
    """The column count of a ``longtail`` problem for ``u`` uniform in (0, 1]: a discrete Pareto
    of index 1, ``n = floor((3 + 1/u) / 2)`` capped at ``max_digits``, so that
    ``P(n >= k) = 1 / (2k - 3)`` for ``2 <= k <= max_digits`` (see :func:`longtail_probability`)."""
    return min(max_digits, int((3 + 1 / u) // 2))


def longtail_probability(k: int, max_digits: int) -> float:
    """``P(n = k)`` of the ``longtail`` column count: ``2 / ((2k - 3)(2k - 1))`` for
    ``2 <= k < max_digits`` (2/3, 2/15, 2/35, ...) and the whole tail ``1 / (2 max_digits - 3)``
    at the cap."""
    if k < 2 or k > max_digits:
        return 0.0
    return 1 / (2 * k - 3) if k == max_digits else 1 / (2 * k - 3) - 1 / (2 * k - 1)


def _longtail_operands(rng: random.Random, n: int) -> Tuple[int, int]:
    """One operand of exactly ``n`` digits, the other of 1..n digits (uniform), in random order."""
    a = rng.randint(10 ** (n - 1), 10 ** n - 1)
    b = _operand_of(rng, rng.randint(1, n))
    return (a, b) if rng.random() < 0.5 else (b, a)


def _operand_of(rng: random.Random, d: int) -> int:
    return rng.randint(0 if d == 1 else 10 ** (d - 1), 10 ** d - 1)


def num_distinct(task_cfg: Any) -> int:
    """How many different problems the config allows (operands 0 .. 10^max_digits - 1); for
    ``digits: longtail`` the binding pool is the two-column one (9,900 pairs a draw of 2/3 hits)."""
    if getattr(task_cfg, "digits", "uniform") == "longtail":
        return int((10 ** 4 - 10 ** 2) * len(set(task_cfg.ops)) / longtail_probability(2, task_cfg.max_digits))
    return (10 ** task_cfg.max_digits) ** 2 * len(set(task_cfg.ops))


def make_problems(task_cfg: Any) -> Dict[str, List[Dict[str, Any]]]:
    """Draw ``num_val + num_train`` distinct problems under ``seed``; return ``{"train", "val"}``."""
    need = task_cfg.num_val + task_cfg.num_train
    space = num_distinct(task_cfg)
    if need > space // 2:  # keep rejection sampling fast and the task far from exhaustive
        raise ValueError(f"data.tiny_task: num_train + num_val = {need} exceeds half of the {space} "
                         f"distinct problems that max_digits={task_cfg.max_digits} and ops={list(task_cfg.ops)} allow")
    rng = random.Random(task_cfg.seed)
    ops = sorted(set(task_cfg.ops))
    seen, rows = set(), []
    longtail = getattr(task_cfg, "digits", "uniform") == "longtail"
    while len(rows) < need:
        if longtail:  # a repeat redraws the operands, not the column count: counts follow the law
            n = longtail_columns(1.0 - rng.random(), task_cfg.max_digits)
            op = rng.choice(ops)
            a, b = _longtail_operands(rng, n)
            while (a, op, b) in seen:
                a, b = _longtail_operands(rng, n)
        else:
            a, op, b = _operand(rng, task_cfg.max_digits), rng.choice(ops), _operand(rng, task_cfg.max_digits)
            if (a, op, b) in seen:
                continue
        seen.add((a, op, b))
        rows.append((a, op, b))
    out: Dict[str, List[Dict[str, Any]]] = {"val": [], "train": []}
    for i, (a, op, b) in enumerate(rows):
        split = "val" if i < task_cfg.num_val else "train"
        idx = len(out[split])
        out[split].append({
            "data_source": DATA_SOURCE,
            "prompt": [{"role": "user", "content": prompt_text(a, op, b)}],
            "reward_model": {"ground_truth": str(solve(a, op, b)), "style": "rule"},
            "extra_info": {"split": split, "index": idx, "a": a, "b": b, "op": op},
        })
    return out


def write_parquet(rows: List[Dict[str, Any]], path: str) -> str:
    """Write verl-style rows with pyarrow (atomically: temp file, then rename)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    pq.write_table(pa.Table.from_pylist(rows), tmp)
    os.replace(tmp, path)
    return path


def _int64_safe(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Rows as parquet can hold them: when an operand exceeds int64 (``max_digits`` > 18), every
    row's ``extra_info.a`` / ``b`` becomes a decimal string (one type a column)."""
    if all(abs(r["extra_info"][k]) < 2 ** 63 for r in rows for k in ("a", "b")):
        return rows
    return [{**r, "extra_info": {**r["extra_info"], "a": str(r["extra_info"]["a"]), "b": str(r["extra_info"]["b"])}}
            for r in rows]


def _task_hash(task_cfg: Any) -> str:
    d = asdict(task_cfg) if is_dataclass(task_cfg) else dict(task_cfg)
    if d.get("digits", "uniform") == "uniform":
        d.pop("digits", None)  # the key's default leaves the hashes (and caches) it predates as they were
    blob = json.dumps({"task": d, "format": FORMAT_VERSION}, sort_keys=True, default=list)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def tiny_task_files(cfg: Any) -> Tuple[str, str]:
    """``(train.parquet, val.parquet)`` of the task in ``cfg.data.tiny_task``, cached under
    ``model.cache_dir`` keyed by a hash of the task config (written on first use)."""
    task = cfg.data.tiny_task
    folder = os.path.join(os.path.expanduser(cfg.model.cache_dir), f"tiny_task-{_task_hash(task)}")
    train, val = os.path.join(folder, "train.parquet"), os.path.join(folder, "val.parquet")
    if not (os.path.isfile(train) and os.path.isfile(val)):
        splits = make_problems(task)
        write_parquet(_int64_safe(splits["val"]), val)
        write_parquet(_int64_safe(splits["train"]), train)
    return train, val
