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

Distinct problems are drawn under ``data.tiny_task.seed``; the first ``num_val`` form the
validation split and the next ``num_train`` the training split, so the two never share a problem.

Columns (as verl-style math datasets): ``data_source`` (``"tiny_arith"``), ``prompt`` (a list of
chat messages, one user turn), ``reward_model`` (``{ground_truth, style: "rule"}``) and
``extra_info`` (``{split, index, a, b, op}``).
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
    d = rng.randint(1, max_digits)
    lo = 0 if d == 1 else 10 ** (d - 1)
    return rng.randint(lo, 10 ** d - 1)


def num_distinct(task_cfg: Any) -> int:
    """How many different problems the config allows (operands 0 .. 10^max_digits - 1)."""
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
    while len(rows) < need:
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


def _task_hash(task_cfg: Any) -> str:
    d = asdict(task_cfg) if is_dataclass(task_cfg) else dict(task_cfg)
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
        write_parquet(splits["val"], val)
        write_parquet(splits["train"], train)
    return train, val
