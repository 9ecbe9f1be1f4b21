"""The step-cost model (dispo_ray/study/cost_model/): its equations on hand-derived numbers, its
monotonicity, its two calibrated constants, and docs/scaling.md's tables reproduced from it. No Ray."""
from __future__ import annotations

import math
import os
import re
from dataclasses import replace

import pytest

from dispo_ray.study import cost_model as cm
from dispo_ray.study.cost_model.__main__ import main as cost_main

DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "docs", "scaling.md")


def _setup(**kw) -> cm.Setup:
    base = dict(model=cm.MODELS["7b"], lengths=cm.Lengths(300, 2000, 4096), gen_gpus=8, learn_gpus=8,
                prompts=128, group=16, prompt_tokens=256.0)
    base.update(kw)
    return cm.Setup(**base)


def test_shapes_match_the_published_parameter_counts():
    assert cm.MODELS["1.5b"].params == pytest.approx(1.54e9, rel=0.01)
    assert cm.MODELS["7b"].params == pytest.approx(7.62e9, rel=0.01)
    assert cm.MODELS["14b"].params == pytest.approx(14.7e9, rel=0.01)
    assert cm.MODELS["7b"].kv_bytes_per_token == 2 * 28 * 4 * 128 * 2


def test_a_decode_iteration_is_the_weight_read_at_one_sequence():
    s = _setup(decode_floor_s=0.0)
    want = 2 * cm.MODELS["7b"].params / 3.35e12 / 0.77
    assert cm.decode_iteration_s(s, alive=1, kv_tokens=0) == pytest.approx(want, rel=1e-12)
    # KV reads add bytes / bandwidth; the floor adds itself; tp divides both reads
    kv = 1000 * cm.MODELS["7b"].kv_bytes_per_token / 3.35e12 / 0.77
    assert cm.decode_iteration_s(s, 1, 1000) == pytest.approx(want + kv, rel=1e-12)
    assert cm.decode_iteration_s(replace(s, decode_floor_s=0.01), 1, 0) == pytest.approx(want + 0.01, rel=1e-12)
    assert cm.decode_iteration_s(replace(s, tp=2), 1, 0) == pytest.approx(want / 2, rel=1e-12)


def test_sync_is_bytes_over_bandwidth_plus_latency_per_bucket():
    s = _setup(gen_gpus=8, learn_gpus=8, zero_stage=2)  # 16 GPUs: two nodes, one sender NIC; no gather
    nbytes = 2.0 * cm.MODELS["7b"].params
    buckets = math.ceil(nbytes / (256 * 2 ** 20))
    assert buckets == 57
    want = 0.0227 + buckets * 0.0017 + nbytes / 47e9
    assert cm.sync_s(s) == pytest.approx(want, rel=1e-12)
    one_node = _setup(gen_gpus=4, learn_gpus=4, zero_stage=2)
    assert cm.sync_s(one_node) == pytest.approx(0.0227 + buckets * 0.0017 + nbytes / 450e9, rel=1e-12)
    # ZeRO-3: rank 0 first gathers the shards of the other ranks
    z3 = replace(s, zero_stage=3)
    assert cm.sync_s(z3) - cm.sync_s(s) == pytest.approx(nbytes * 7 / 8 / 476e9, rel=1e-12)


def test_when_generation_dominates_k1_hides_training_completely():
    s = _setup(gen_gpus=1, learn_gpus=16, k=1)
    b1, b0 = cm.step(s), cm.step(replace(s, k=0))
    assert b1.train < b1.generate
    assert b1.step == pytest.approx(b1.generate + b1.reward + b1.sync, rel=1e-12)
    assert b0.step == pytest.approx(b0.generate + b0.reward + b0.train + b0.sync, rel=1e-12)
    assert b0.step - b1.step == pytest.approx(b0.train, rel=1e-12)


def test_when_training_dominates_k1_hides_generation():
    s = _setup(gen_gpus=16, learn_gpus=1, k=1, model=cm.MODELS["1.5b"])
    b = cm.step(s)
    assert b.train > b.generate + b.reward
    assert b.step == pytest.approx(b.train + b.sync, rel=1e-12)


def test_training_time_is_flops_over_delivered_flops_on_one_rank():
    s = _setup(learn_gpus=1)
    m, ln = cm.MODELS["7b"], s.lengths
    tokens = s.samples * (256 + ln.mean)
    flops = 6 * m.matmul_params * tokens + 12 * s.samples * ln.mean_square_total(256) * 128 * 28 * 28
    assert cm.train_s(s) == pytest.approx(flops / (989.4e12 * 0.223 * 0.96), rel=1e-12)
    assert cm.zero_comm_s(s) == 0.0


def test_more_generator_gpus_never_slow_generation():
    for model in ("1.5b", "7b", "14b"):
        for k in (0, 1):
            prev = math.inf
            for g in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64, 128):
                t = cm.generate_s(_setup(model=cm.MODELS[model], gen_gpus=g, k=k))
                assert t <= prev * (1 + 1e-9), (model, g, t, prev)
                prev = t


def test_more_learner_gpus_never_slow_training_compute():
    prev = math.inf
    for w in (1, 2, 4, 8):  # within a node
        t = cm.train_s(_setup(learn_gpus=w))
        assert t <= prev
        prev = t


def test_the_longest_sample_sets_synchronous_generation_not_streaming():
    s = _setup(gen_gpus=64)
    assert cm.generate_s(s) > cm.generate_s(replace(s, streaming=True))
    ln = cm.Lengths(300, 2000, 4096)
    assert ln.survival(300) == pytest.approx(0.5)
    assert ln.survival(2000) == pytest.approx(0.05)
    assert ln.expected_max(10 ** 6) == 4096  # capped at max_new_tokens
    wide = cm.Lengths(300, 2000, 10 ** 7)  # cap far away: the log-normal mean exp(mu + sigma^2/2)
    assert wide.mean == pytest.approx(300 * math.exp(wide.sigma ** 2 / 2), rel=0.02)


def test_the_calibrated_constants_are_what_their_fits_give():
    assert round(cm.calibrate_verl_median()) == cm.VERL_MEDIAN
    assert cm.calibrate_decode_floor() == pytest.approx(cm.DECODE_FLOOR_TP_S, abs=5e-5)
    assert cm.calibrate_decode_floor_tp1() == pytest.approx(cm.DECODE_FLOOR_TP1_S, abs=5e-5)


def test_the_decode_floor_follows_the_tensor_parallel_size():
    s = _setup(decode_floor_s=None)
    roof = cm.decode_iteration_s(replace(s, decode_floor_s=0.0), 1, 0)
    assert cm.decode_iteration_s(s, 1, 0) == pytest.approx(roof + cm.DECODE_FLOOR_TP1_S, rel=1e-12)
    s4 = replace(s, tp=4)
    roof4 = cm.decode_iteration_s(replace(s4, decode_floor_s=0.0), 1, 0)
    assert cm.decode_iteration_s(s4, 1, 0) == pytest.approx(roof4 + cm.DECODE_FLOOR_TP_S, rel=1e-12)


def test_a_model_that_does_not_fit_is_a_one_line_error():
    with pytest.raises(ValueError, match="does not fit"):
        cm.engine_batch_limit(_setup(model=cm.MODELS["14b"], gpu=replace(cm.GPUS["h100"], mem_bytes=20e9)))


def _doc_table(header_start: str):
    with open(DOC, encoding="utf-8") as f:
        lines = f.read().splitlines()
    i = next(n for n, l in enumerate(lines) if l.startswith(header_start))
    rows = []
    for line in lines[i + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def _num(cell: str) -> float:
    return float(re.match(r"[-\d.e]+", cell.replace(",", "")).group(0))


def test_the_check_table_in_docs_is_the_model_s():
    rows = _doc_table("| check |")
    got = {r["name"]: r for r in cm.check_rows()}
    assert len(rows) == len(got)
    for cells in rows:
        name = cells[0].replace(" (calibrated)", "")
        r = got[name]
        assert _num(cells[2]) == pytest.approx(r["model"], rel=0.05, abs=0.01), name
        assert _num(cells[3]) == pytest.approx(r["ratio"], abs=0.011), name


def test_the_sizing_table_in_docs_is_the_model_s():
    rows = _doc_table("| model | GPUs | k |")
    got = {(cm.MODELS[r["model"]].name, r["total"], r["k"]): r for r in cm.sizing_rows()}
    assert len(rows) == len(got)
    for cells in rows:
        r = got[(cells[0], int(cells[1]), int(cells[2]))]
        assert cells[3] == f"{r['gen_gpus']} : {r['learn_gpus']}"
        assert _num(cells[4]) == pytest.approx(r["step_s"], rel=0.05)


def test_the_cli_prints_the_breakdown(capsys):
    cost_main(["--model", "7b", "--gen-gpus", "64", "--learn-gpus", "64", "--k", "1"])
    out = capsys.readouterr().out
    for key in ("generate_s", "reward_s", "train_s", "sync_s", "step_s", "max(generate + reward, train) + sync"):
        assert key in out
