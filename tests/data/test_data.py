"""The tiny arithmetic task (answers checked by evaluating the expression independently) and the
data loader: prompt rendering, dotted / flat ground-truth keys, bad rows, and the resumable,
seeded cursor."""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dispo_ray.infra.config import compose
from dispo_ray.data.records import DataError, PromptDataset, PromptRecord, data_files, load_records
from dispo_ray.tiny.model import build_tiny_model
from dispo_ray.tiny.task import make_problems, tiny_task_files


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    return compose([f"model.cache_dir={tmp_path_factory.mktemp('data_cache')}", "data.tiny_task.num_train=300",
                    "data.tiny_task.num_val=50", "data.tiny_task.ops=[+,-,*]"])


@pytest.fixture(scope="module")
def tok(cfg):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(build_tiny_model(cfg.model))


def test_tiny_task_answers_splits_and_determinism(cfg):
    t = cfg.data.tiny_task
    a, b = make_problems(t), make_problems(t)
    assert a == b and len(a["train"]) == 300 and len(a["val"]) == 50
    key = lambda r: r["prompt"][0]["content"]  # noqa: E731
    assert not {key(r) for r in a["train"]} & {key(r) for r in a["val"]}  # disjoint splits
    assert len({key(r) for r in a["train"]}) == 300  # distinct problems
    for r in a["train"] + a["val"]:
        expr = key(r)
        assert expr.endswith("=") and r["data_source"] == "tiny_arith" and r["reward_model"]["style"] == "rule"
        assert r["reward_model"]["ground_truth"] == str(eval(expr[:-1]))  # independent check
        e = r["extra_info"]
        assert e["op"] in t.ops and 0 <= e["a"] < 10 ** t.max_digits and 0 <= e["b"] < 10 ** t.max_digits
    assert {r["extra_info"]["op"] for r in a["train"]} == {"+", "-", "*"}
    other = make_problems(compose([f"model.cache_dir={cfg.model.cache_dir}", "data.tiny_task.seed=1"]).data.tiny_task)
    assert key(other["val"][0]) != key(a["val"][0]) or key(other["val"][1]) != key(a["val"][1])
    with pytest.raises(ValueError, match="exceeds half"):
        make_problems(compose(["data.tiny_task.max_digits=1"]).data.tiny_task)


def test_tiny_task_parquet_loads_as_plain_text_prompts(cfg, tok):
    train, val = tiny_task_files(cfg)
    assert tiny_task_files(cfg) == (train, val) and data_files(cfg) == ([train], [val])
    cols = pq.read_table(train).column_names
    assert set(cols) == {"data_source", "prompt", "reward_model", "extra_info"}
    recs, stats = load_records([val], tok, cfg.data)
    assert stats == {"rows": 50, "kept": 50, "bad": 0, "too_long": 0}
    r = recs[0]
    first = make_problems(cfg.data.tiny_task)["val"][0]
    assert r.prompt == first["prompt"][0]["content"] and r.uid == "val/0"
    assert r.prompt_token_ids == [tok.bos_token_id] + tok(r.prompt, add_special_tokens=False)["input_ids"]
    assert len(r.prompt_token_ids) == len(r.prompt) + 1  # character-level
    assert r.ground_truth == first["reward_model"]["ground_truth"] and r.data_source == "tiny_arith"


def _parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def test_chat_template_answer_keys_and_bad_rows(cfg, tok, tmp_path):
    rows = [{"prompt": "1+1=", "ground_truth": "2", "src": "a"},
            {"prompt": "2+2=", "ground_truth": None, "src": "b"},  # no ground truth
            {"prompt": "", "ground_truth": "1", "src": "c"},  # empty prompt
            {"prompt": "9" * 40 + "=", "ground_truth": "1", "src": "d"}]  # over max_prompt_length
    path = _parquet(tmp_path / "flat.parquet", rows)
    d = compose(["data.max_prompt_length=20", "data.data_source_key=src"]).data
    with pytest.raises(DataError, match=r"flat\.parquet: row 1: missing ground truth"):
        load_records([path], tok, d)
    d.skip_bad_rows = True
    recs, stats = load_records([path], tok, d)
    assert [r.prompt for r in recs] == ["1+1="] and recs[0].data_source == "a"
    assert stats == {"rows": 4, "kept": 1, "bad": 2, "too_long": 1}
    # flat `answer` column; dotted key preferred when present; jsonl input
    jl = tmp_path / "x.jsonl"
    jl.write_text(json.dumps({"prompt": [{"role": "user", "content": "3*3="}], "answer": 9}) + "\n")
    recs, _ = load_records([str(jl)], tok, compose().data)
    assert recs[0].ground_truth == "9" and recs[0].data_source == "x" and recs[0].prompt == "3*3="
    # a tokenizer with a chat template: rendered, generation prompt added, no extra <s>
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                         "{% if add_generation_prompt %}<a>{% endif %}")
    try:
        recs, _ = load_records([str(jl)], tok, compose().data)
    finally:
        tok.chat_template = None
    assert recs[0].prompt == "<user>3*3=<a>"
    assert recs[0].prompt_token_ids == tok("<user>3*3=<a>", add_special_tokens=False)["input_ids"]


def _records(n):
    return [PromptRecord(uid=f"f/{i}", prompt=str(i), prompt_token_ids=[1, i], ground_truth=str(i), data_source="t")
            for i in range(n)]


def test_cursor_is_seeded_epoch_wise_and_resumable():
    ds = PromptDataset(_records(10), seed=3)
    e0 = [r.uid for r in ds.next_batch(10)]
    e1 = [r.uid for r in ds.next_batch(10)]
    assert sorted(e0) == sorted(e1) == sorted(f"f/{i}" for i in range(10))  # each epoch a permutation
    assert e0 != e1 and e0 != [f"f/{i}" for i in range(10)]
    assert [r.uid for r in PromptDataset(_records(10), seed=3).next_batch(10)] == e0  # seeded
    assert [r.uid for r in PromptDataset(_records(10), shuffle=False).next_batch(4)] == ["f/0", "f/1", "f/2", "f/3"]

    a = PromptDataset(_records(10), seed=5)
    a.next_batch(7)
    state = a.state_dict()
    assert state["epoch"] == 0 and state["position"] == 7
    expected = [r.uid for r in a.next_batch(15)]  # crosses into epochs 1 and 2
    assert a.state_dict()["epoch"] == 2 and a.state_dict()["position"] == 2
    b = PromptDataset(_records(10), seed=0)
    b.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON checkpoint
    assert [r.uid for r in b.next_batch(15)] == expected
    with pytest.raises(DataError, match="saved for 10 records, dataset has 9"):
        PromptDataset(_records(9)).load_state_dict(state)
