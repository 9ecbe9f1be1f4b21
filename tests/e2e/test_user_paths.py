"""The paths a new user takes first, run the way they run them (``python -m dispo_ray.main``).

* Their own model folder: a random-init Qwen2 with Qwen's real 151,669-token tokenizer and chat
  template and a Qwen ``generation_config.json`` (``tests/user_inputs.py``); their own data: verl
  chat-message parquet for training, GSM8K and MATH raw files converted with ``dispo_ray.prepare``
  for evaluation. Two steps with each generator backend (vLLM: tied float32; hf: untied bfloat16),
  checked for all three eval sets, the per-line ``time``, plain log lines (stdout is a pipe, not a
  TTY) and ``timing/step`` without evaluation.
* The hf backend on that folder: each sampled token's log-prob equals a plain forward pass (so the
  folder's repetition_penalty / top_k do not leak into sampling), at a 151,936-row vocabulary.
* Their own data and folders, wrong: each is one ``error:`` line naming the file, row or key, exit
  code 2, no traceback, before Ray starts.
* An engine that dies: the actor's error names the engine's own root cause and its log file.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from user_inputs import gsm8k_jsonl, math_jsonl, qwen_model_dir, verl_chat_parquet

REPO = Path(__file__).resolve().parents[2]
SMALL_RUN = ["trainer.total_steps=2", "trainer.prompts_per_step=4", "generator.max_new_tokens=12",
             "trainer.eval_max_prompts=6", "trainer.eval_k=2", "trainer.eval_every=0",
             "algorithm.dynamic_sampling=false", "trainer.tensorboard=false"]


def run_main(args, timeout=900, cwd=REPO):
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "dispo_ray.main", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def user_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("user_data")
    train = verl_chat_parquet(str(d / "train.parquet"))
    out = {"train": train}
    for name, make, source in (("gsm8k", gsm8k_jsonl, "gsm8k"), ("math", math_jsonl, "math")):
        raw = make(str(d / f"{name}.jsonl"))
        out[name] = str(d / f"{name}.parquet")
        p = subprocess.run([sys.executable, "-m", "dispo_ray.prepare", "--source", source, "--input", raw,
                            "--output", out[name]], capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
    return out


def data_args(user_data):
    return [f"data.train_files=[{user_data['train']}]", f"data.val_files=[{user_data['gsm8k']}]",
            f"data.extra_eval_files=[{user_data['math']}]"]


@pytest.mark.slow
@pytest.mark.parametrize("backend,tied,dtype", [("vllm", True, "float32"), ("hf", False, "bfloat16")])
def test_two_steps_on_a_users_qwen_folder_and_data(user_data, tmp_path, backend, tied, dtype):
    model = qwen_model_dir(tied=tied, dtype=dtype)
    run_dir = tmp_path / "run"
    out = run_main([f"model.path={model}", f"model.dtype={dtype}", f"generator={backend}",
                    *data_args(user_data), *SMALL_RUN, f"trainer.run_dir={run_dir}"])
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "\r" not in out.stdout  # no carriage-return progress bar in a pipe
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("step ")]
    assert lines and lines[-1].startswith("step 2/2"), out.stdout[-2000:]
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert all(isinstance(r["time"], float) and r["time"] > 1.7e9 for r in rows)
    assert rows[1]["time"] <= rows[2]["time"]
    last = rows[-1]
    for prefix in ("eval", "eval_math"):  # GSM8K is the val set, MATH the extra eval set
        assert last[f"{prefix}/num_problems"] == 6.0
    assert last["perf/train_tokens"] > 0 and "actor/skipped" not in last  # the learner trained on the 152k vocab
    assert last["timing/eval"] > 0 and last["timing/step"] < last["timing/wait_rollout"] + last["timing/train"] + \
        last["timing/sync"] + 1.0  # the step's time leaves the evaluation out
    # behaviour log-probs from the engine agree with the learner's on the same weights (first
    # mini-batch, before any update): the tokenizer, chat template and dtype all line up
    assert abs(rows[1]["actor/ratio_mean"] - 1.0) < (0.02 if dtype == "float32" else 0.1), rows[1]


def test_hf_backend_logprobs_match_a_forward_pass_on_the_qwen_folder():
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM

    from actors.backends.base import SamplingSpec
    from actors.backends.hf_backend import HFBackend

    path = qwen_model_dir(tied=False, dtype="float32")
    be = HFBackend(path, SimpleNamespace(num_gpus_per_actor=0, seed=0), "float32", 512)
    tok = be.tokenizer
    assert 151645 in be.end_ids and 151643 in be.end_ids  # <|im_end|> and the generation config's <|endoftext|>
    prompts = [tok(tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                           add_generation_prompt=True), add_special_tokens=False)["input_ids"]
               for q in ("What is 2 + 3?", "Compute 17 - 9, then double it.")]
    groups = be.generate(prompts, 2, SamplingSpec(1.0, 1.0, 10, [], seed=3))
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    for p, group in zip(prompts, groups):
        for c in group:
            ids = torch.tensor([p + c.token_ids])
            with torch.no_grad():
                lp = ref(ids).logits[0, :-1].log_softmax(-1)[len(p) - 1:]
            want = lp.gather(-1, torch.tensor(c.token_ids)[:, None]).squeeze(-1)
            assert torch.allclose(torch.tensor(c.logprobs), want, atol=1e-3), (c.logprobs, want)
    again = be.generate(prompts, 2, SamplingSpec(1.0, 1.0, 10, [], seed=3))
    assert [[c.token_ids for c in g] for g in again] == [[c.token_ids for c in g] for g in groups]


# ------------------------------------------------------------------ bad inputs: one line each
def _bad_parquet(tmp_path, rows, name):
    from dispo_ray.tiny.task import write_parquet
    path = tmp_path / name
    write_parquet(rows, str(path))
    return str(path)


def _row(i, gt="5", prompt=None):
    return {"data_source": "x", "prompt": prompt if prompt is not None else [{"role": "user", "content": f"q{i}"}],
            "reward_model": {"ground_truth": gt, "style": "rule"}}


def bad_inputs(tmp_path):
    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(b"PAR1 this is not really parquet" * 10)
    no_gt = _bad_parquet(tmp_path, [{"data_source": "x", "prompt": "What is 1+1?", "solution": "2"}] * 3, "no_gt.parquet")
    null_prompt = tmp_path / "null_prompt.jsonl"
    null_prompt.write_text("".join(json.dumps(r) + "\n" for r in [_row(0), _row(1), {**_row(2), "prompt": None}]))
    empty_dir = tmp_path / "not_a_model"
    empty_dir.mkdir()
    (empty_dir / "tokenizer.json").write_text("{}")
    hd16 = qwen_model_dir(head_dim=16, layers=1)
    return [
        ("corrupt parquet", [f"data.train_files=[{corrupt}]"], [str(corrupt), "data.train_files", "cannot read"]),
        ("missing ground-truth column", [f"data.train_files=[{no_gt}]"], [no_gt, "ground-truth column", "solution"]),
        ("null prompt", [f"data.val_files=[{null_prompt}]"], [str(null_prompt), "row 2", "prompt"]),
        ("missing model folder", [f"model.path={tmp_path / 'nope'}"], ["model.path", str(tmp_path / "nope"), "no such folder"]),
        ("folder without config.json", [f"model.path={empty_dir}"], ["model.path", str(empty_dir), "config.json"]),
        ("head_dim the CPU engine lacks", [f"model.path={hd16}"], ["model.path", "head_dim=16", "generator.backend=hf"]),
    ]


def test_bad_user_inputs_are_one_line_before_anything_starts(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cases = bad_inputs(tmp_path)
    procs = [subprocess.Popen([sys.executable, "-m", "dispo_ray.main", *args, f"trainer.run_dir={tmp_path / f'run{i}'}"],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i, (_, args, _) in enumerate(cases)]  # independent checks: run them side by side
    for i, ((what, _, must_name), p) in enumerate(zip(cases, procs)):
        stdout, stderr = p.communicate(timeout=300)
        err = stderr.strip()
        assert p.returncode == 2, (what, p.returncode, err[-2000:])
        assert "Traceback" not in stderr + stdout, (what, err[-2000:])
        assert len(err.splitlines()) == 1 and err.startswith("error: "), (what, err)
        for s in must_name:
            assert s in err, (what, s, err)
        assert not (tmp_path / f"run{i}").exists(), what  # nothing started: no run dir was made


# ------------------------------------------------------------------ a dying engine
def test_root_cause_is_read_from_the_engine_log(tmp_path):
    from dispo_ray.infra import failures

    log = tmp_path / "worker.err"
    log.write_text("old noise\nValueError: from an earlier call\n")
    since = log.stat().st_size
    with open(log, "a") as f:
        f.write("(Worker pid=1) ERROR [multiproc_executor.py:1063]     gen.set_offset(gen.get_offset() - 4)\n"
                "(Worker pid=1) ERROR [multiproc_executor.py:1063] RuntimeError: CPU Generator does not use offset\n"
                "(EngineCore pid=2) ERROR RuntimeError: Worker failed with error 'CPU Generator does not use offset', "
                "please check the stack trace above for the root cause\n"
                "vllm.v1.engine.exceptions.EngineDeadError: EngineCore encountered an issue. See stack trace (above) "
                "for the root cause.\n")
    err = failures.engine_root_cause(RuntimeError("EngineDeadError"), {str(log): since}, "generator 0: vllm generate")
    assert str(err) == f"generator 0: vllm generate failed: RuntimeError: CPU Generator does not use offset; full log: {log}"
    # the driver sees it wrapped by Ray, pages long; describe() keeps the one line
    wrapped = RuntimeError("ray::GeneratorActor.generate() (pid=9)\n  File x\n" + "  frame\n" * 40 +
                           f"dispo_ray.infra.failures.EngineFailure: {err}\n")
    assert failures.describe(wrapped) == str(err)


def test_memory_monitor_verdict_names_actor_memory_and_knobs():
    from dispo_ray.infra.failures import describe

    text = ("The actor is dead because its worker process has died. Worker exit type: NODE_OUT_OF_MEMORY "
            "Worker exit detail: Task was killed due to the node running low on memory.\nMemory on the node "
            "(IP: 10.0.0.1, ID: abc) where the lease (actor ID: 123, name=GeneratorActor.__init__, pid=77, "
            "memory used=18.95GB) was running was 22.41GB / 23.47GB (0.955), which exceeds the memory usage "
            "threshold of 0.95.\n" + "more lines\n" * 60)
    line = describe(RuntimeError(text))
    assert "\n" not in line
    assert line.startswith("Ray's memory monitor killed GeneratorActor using 18.95GB (node at 22.41GB of 23.47GB)")
    assert "generator.max_new_tokens" in line and "RAY_memory_usage_threshold" in line


@pytest.mark.slow
def test_engine_that_cannot_start_names_its_root_cause(ray_cluster, tmp_path):
    """A real vLLM CPU engine on a head_dim it has no kernel for (preflight bypassed): the actor's
    error carries vLLM's own line (written by its engine-core process, not in the exception) and
    the log path, and describe() turns it into one line."""
    import ray

    from actors.generator import GeneratorActor
    from dispo_ray.infra.config import compose
    from dispo_ray.infra.failures import describe

    cfg = compose([f"model.path={qwen_model_dir(head_dim=16, layers=1)}", "data.max_prompt_length=32",
                   "generator.max_new_tokens=4"])
    from dispo_ray.data.records import PromptRecord

    actor = ray.remote(GeneratorActor).options(num_cpus=0.5, max_restarts=0).remote(cfg, cfg.model.path, 0)
    record = PromptRecord(uid="t/0", prompt="hi", prompt_token_ids=[9707, 11, 1879], ground_truth="1", data_source="t")
    with pytest.raises(Exception) as info:  # vLLM 0.32 starts the engine and refuses in the first attention call
        ray.get(actor.ready.remote(), timeout=600)
        ray.get(actor.generate.remote([record], 1), timeout=600)
    line = describe(info.value)
    assert line.startswith("generator 0: "), line
    assert "Unsupported CPU attention configuration: head_dim=16" in line, line
    assert "full log: " in line and line.rsplit("full log: ", 1)[1].endswith((".out", ".err")), line
    assert "\n" not in line
