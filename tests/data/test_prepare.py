"""``python -m dispo_ray.prepare`` on hand-written fixtures in each source layout; the output
loads through ``dispo_ray.data.records`` with the default keys and yields the hand-derived answers."""
from __future__ import annotations

import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dispo_ray.infra.config import compose
from dispo_ray.data.records import DataError, load_records
from dispo_ray.prepare import convert, last_boxed, main

GSM8K = [
    {"question": "Tom has 3 apples and buys 4. How many?", "answer": "3 + 4 = <<3+4=7>>7\n#### 7"},
    {"question": "A farm sells 1,200 eggs a day for 2 days.", "answer": "1200*2=2400\n#### 2,400"},
]
MATH = [
    {"problem": "Simplify $\\frac{2}{4}$.", "solution": "We get $\\boxed{\\frac{1}{2}}$.", "level": "Level 1"},
    {"problem": "What is $1+1$?", "solution": "First $\\boxed{3}$ is wrong; it is $\\boxed{2}$."},
]
AIME = [{"Problem": "Find the remainder ...", "Answer": 204}, {"problem": "How many ...", "answer": "033"}]
DAPO = [{"data_source": "math_dapo", "prompt": [{"role": "user", "content": "Solve x+1=3."}],
         "reward_model": {"ground_truth": "2", "style": "rule-lighteval/MATH_v2"}, "ability": "MATH"}]


class CharTok:
    """A tokenizer stand-in for loading: one id per character, no chat template."""
    chat_template = None

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": ([1] if add_special_tokens else []) + [ord(c) for c in text]}


def _write(tmp_path, name, rows):
    p = tmp_path / name
    if name.endswith(".jsonl"):
        p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    elif name.endswith(".json"):
        p.write_text(json.dumps(rows))
    else:
        pq.write_table(pa.Table.from_pylist(rows), p)
    return str(p)


@pytest.mark.parametrize("source,fname,rows,truths", [
    ("gsm8k", "gsm8k.jsonl", GSM8K, ["7", "2400"]),
    ("math", "math.json", MATH, ["\\frac{1}{2}", "2"]),
    ("aime", "aime.jsonl", AIME, ["204", "033"]),
    ("dapo", "dapo_in.parquet", DAPO, ["2"]),
])
def test_each_source_converts_and_loads(tmp_path, source, fname, rows, truths):
    src = _write(tmp_path, fname, rows)
    out = str(tmp_path / f"{source}.parquet")
    assert main(["--source", source, "--input", src, "--output", out]) == 0
    table = pq.read_table(out).to_pylist()
    assert [r["reward_model"]["ground_truth"] for r in table] == truths
    assert all(r["prompt"][0]["role"] == "user" and r["reward_model"]["style"] == "rule" for r in table)
    data_cfg = compose(["data.max_prompt_length=4096"]).data
    recs, stats = load_records([out], CharTok(), data_cfg)
    assert [r.ground_truth for r in recs] == truths and stats["kept"] == len(rows)
    if source == "dapo":
        assert recs[0].prompt == "Solve x+1=3." and recs[0].data_source == "math_dapo"
    else:
        assert "\\boxed{}" in recs[0].prompt  # the answer-format instruction was appended


def test_last_boxed_matches_nested_braces():
    assert last_boxed("x \\boxed{\\frac{a}{b^{2}}} y") == "\\frac{a}{b^{2}}"
    assert last_boxed("\\boxed{1} then \\fbox{22}") == "22"
    assert last_boxed("no box") is None and last_boxed("\\boxed{open") is None


def test_bad_rows_name_file_and_row_or_are_counted(tmp_path):
    src = _write(tmp_path, "bad.jsonl", GSM8K + [{"question": "No answer line", "answer": "just 5"}])
    with pytest.raises(DataError, match=r"bad\.jsonl: row 2: missing or unreadable 'answer"):
        convert("gsm8k", src)
    rows, skipped = convert("gsm8k", src, skip_bad=True)
    assert len(rows) == 2 and skipped == 1
    # the command line reports the same error in one line, exit code 2
    r = subprocess.run([sys.executable, "-m", "dispo_ray.prepare", "--source", "gsm8k", "--input", src,
                        "--output", str(tmp_path / "o.parquet")], capture_output=True, text=True)
    assert r.returncode == 2 and "row 2" in r.stderr and len(r.stderr.strip().splitlines()) == 1
