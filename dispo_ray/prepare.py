"""Convert user-supplied math datasets into dispo-ray's (verl-style) parquet.

    python -m dispo_ray.prepare --source gsm8k --input train.jsonl --output gsm8k_train.parquet

Sources and the fields read (json, jsonl or parquet in; nothing is downloaded):

* ``gsm8k``: ``question``, ``answer`` -- the ground truth is the number after ``####``
  (thousands separators removed);
* ``math``:  ``problem``, ``solution`` -- the ground truth is the content of the *last*
  ``\\boxed{...}`` in the solution (braces matched, so ``\\boxed{\\frac{1}{2}}`` works);
* ``aime``:  ``problem``, ``answer`` (either capitalisation);
* ``dapo``:  DAPO-Math-17k is already verl-style: ``prompt`` (chat messages) and
  ``reward_model.ground_truth`` are kept as they are.

Every output row has ``data_source``, ``prompt`` (one user message; for gsm8k/math/aime the
problem plus an instruction to put the final answer in ``\\boxed{}``), ``reward_model``
``{ground_truth, style: "rule"}`` and ``extra_info`` ``{index, source file}``. A row the converter
cannot read stops it with the file, the row and the missing field, unless ``--skip-bad`` is given
(then the rows are counted and reported).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Callable, Dict, List, Optional, Tuple

from dispo_ray.data.records import DataError, read_rows
from dispo_ray.reward.scoring import extract_boxed as last_boxed  # one brace-matching extractor for data and rewards
from dispo_ray.reward.scoring import extract_gsm8k as gsm8k_answer
from dispo_ray.tiny.task import write_parquet

INSTRUCTION = "Let's think step by step and output the final answer within \\boxed{}."


def _field(row: Dict[str, Any], *names: str) -> Any:
    for n in names:
        if n in row and row[n] is not None:
            return row[n]
    return None


# Each converter returns (problem text or chat messages, ground truth, data source); None = missing.
Converted = Tuple[Any, Optional[str], str]


def _gsm8k(row: Dict[str, Any]) -> Converted:
    q, a = _field(row, "question"), _field(row, "answer")
    return q, gsm8k_answer(a) if isinstance(a, str) else None, "openai/gsm8k"


def _math(row: Dict[str, Any]) -> Converted:
    p, s = _field(row, "problem"), _field(row, "solution")
    return p, last_boxed(s) if isinstance(s, str) else None, "math"


def _aime(row: Dict[str, Any]) -> Converted:
    p, a = _field(row, "problem", "Problem", "question"), _field(row, "answer", "Answer")
    return p, None if a is None else str(a).strip(), "aime"


def _dapo(row: Dict[str, Any]) -> Converted:
    rm = row.get("reward_model")
    gt = rm.get("ground_truth") if isinstance(rm, dict) else None
    return row.get("prompt"), None if gt is None else str(gt), str(row.get("data_source") or "math_dapo")


CONVERTERS: Dict[str, Tuple[Callable[[Dict[str, Any]], Converted], str, str]] = {
    "gsm8k": (_gsm8k, "question", "answer (with '#### <number>')"),
    "math": (_math, "problem", "solution (with \\boxed{...})"),
    "aime": (_aime, "problem", "answer"),
    "dapo": (_dapo, "prompt", "reward_model.ground_truth"),
}


def _messages(problem: Any, source: str) -> Optional[List[Dict[str, str]]]:
    if source == "dapo":  # already chat messages (or, rarely, text)
        if isinstance(problem, str) and problem.strip():
            return [{"role": "user", "content": problem}]
        if isinstance(problem, list) and problem and all(isinstance(m, dict) and "content" in m for m in problem):
            return [{"role": str(m.get("role") or "user"), "content": str(m["content"])} for m in problem]
        return None
    if not isinstance(problem, str) or not problem.strip():
        return None
    return [{"role": "user", "content": f"{problem.strip()}\n{INSTRUCTION}"}]


def convert(source: str, input_path: str, skip_bad: bool = False) -> Tuple[List[Dict[str, Any]], int]:
    """Rows in our format from ``input_path`` read as ``source``; returns (rows, skipped)."""
    if source not in CONVERTERS:
        raise DataError(f"--source {source!r}: must be one of {', '.join(CONVERTERS)}")
    fn, prompt_field, answer_field = CONVERTERS[source]
    out, skipped = [], 0
    for i, row in enumerate(read_rows(input_path)):
        problem, gt, data_source = fn(row) if isinstance(row, dict) else (None, None, "")
        msgs = _messages(problem, source)
        missing = prompt_field if msgs is None else (answer_field if not gt else None)
        if missing:
            if not skip_bad:
                raise DataError(f"{input_path}: row {i}: missing or unreadable '{missing}' for --source {source} "
                                "(use --skip-bad to skip such rows)")
            skipped += 1
            continue
        out.append({"data_source": data_source, "prompt": msgs,
                    "reward_model": {"ground_truth": gt, "style": "rule"},
                    "extra_info": {"index": i, "source_file": os.path.basename(input_path)}})
    if not out:
        raise DataError(f"{input_path}: no convertible rows for --source {source} ({skipped} skipped)")
    return out, skipped


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dispo_ray.prepare", description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", required=True, choices=sorted(CONVERTERS))
    ap.add_argument("--input", required=True, help="json, jsonl or parquet file in the source's layout")
    ap.add_argument("--output", required=True, help="parquet file to write")
    ap.add_argument("--skip-bad", action="store_true", help="skip (and count) unreadable rows instead of stopping")
    args = ap.parse_args(argv)
    try:
        rows, skipped = convert(args.source, args.input, args.skip_bad)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_parquet(rows, args.output)
    print(f"wrote {len(rows)} rows to {args.output}" + (f" ({skipped} bad rows skipped)" if skipped else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
