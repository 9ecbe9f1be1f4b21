"""The GPU path's logic, run on CPU through the same code (issue 24): start-up driver check,
receive planning and reassembly of large tensors (real gloo group), the DeepSpeed world's
timeout arithmetic, the refusal of a disabled PyNccl communicator (vLLM's real wrapper over a
stub libnccl), fp32 LM-head numerics against float64, the learner's load dtype, the
fractional-GPU refusal and the device an actor computes on."""
from __future__ import annotations

import io
import multiprocessing as mp
import os
import subprocess
import sys

import pytest
import torch

from dispo_ray.infra.config import ConfigError, compose
from dispo_ray.sync.protocol import (RECV_AHEAD, ParamSpec, ReceivePlan, WeightSyncError, WeightSyncGroup,
                                         find_free_port, large_tensor_bytes, make_manifest, max_bucket_bytes,
                                         plan_receive, receive_weights, send_weights)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CTX = mp.get_context("spawn")
MiB, GiB = 1 << 20, 1 << 30


# ------------------------------------------------------------------ item 1: driver check at start-up
def test_startup_error_names_the_driver_version():
    from dispo_ray.infra.devices import check_cuda_startup, cuda_startup_error

    old = cuda_startup_error(1, False, "575.57.08", "13.0", "learner rank 0")
    assert old.startswith("learner rank 0 asks for GPUs (num_gpus_per_actor=1) but torch sees none")
    assert "NVIDIA driver 575.57.08 is too old" in old and "needs >= 580 (CUDA 13 wheels" in old
    assert "\n" not in old
    assert cuda_startup_error(1, True, "575.57.08") is None  # torch sees the GPU: nothing to say
    assert cuda_startup_error(0, False, None) is None  # no GPU asked for
    assert "no NVIDIA driver found" in cuda_startup_error(2, False, None)
    ok_driver = cuda_startup_error(1, False, "580.65.06")
    assert "580.65.06" in ok_driver and "met" in ok_driver and "CUDA_VISIBLE_DEVICES" in ok_driver
    assert "CPU build" in cuda_startup_error(1, False, "580.65.06", None)
    # this machine: CPU torch, asked for a GPU -> the real check refuses in one line
    with pytest.raises(RuntimeError, match=r"generator 0 asks for GPUs .*needs >= 580 \(CUDA 13 wheels") as e:
        check_cuda_startup(1, "generator 0")
    assert "\n" not in str(e.value)
    check_cuda_startup(0, "generator 0")  # CPU pools: nothing runs


def _fake_nvidia_smi(tmp_path, version):
    exe = tmp_path / "bin" / "nvidia-smi"
    exe.parent.mkdir()
    exe.write_text(f"#!/bin/sh\necho {version}\necho {version}\n")
    exe.chmod(0o755)
    return str(exe.parent)


def test_run_start_refuses_a_gpu_node_torch_cannot_use(tmp_path, monkeypatch):
    """Where the run starts (dispo_ray.main -> preflight, before Ray or any pool): a node whose
    nvidia-smi reports driver 575 while the run asks for GPUs exits 2 with one line."""
    from dispo_ray.data.preflight import InputError, check_gpu_node

    cfg = compose(["learner.num_gpus_per_actor=1", "generator.num_gpus_per_actor=1"])
    path = os.environ["PATH"]
    monkeypatch.setenv("PATH", "/nonexistent")
    # no driver on this node, joining a cluster (a CPU head pod): the actors check their own nodes
    check_gpu_node(compose(["learner.num_gpus_per_actor=1", "generator.num_gpus_per_actor=1", "cluster.address=auto"]))
    fake = _fake_nvidia_smi(tmp_path, "575.57.08")
    monkeypatch.setenv("PATH", fake + os.pathsep + path)
    with pytest.raises(InputError, match="NVIDIA driver 575.57.08"):
        check_gpu_node(cfg)
    check_gpu_node(compose([]))  # CPU config: nvidia-smi is not even asked
    env = {**os.environ, "PATH": fake + os.pathsep + path}
    p = subprocess.run([sys.executable, "-m", "dispo_ray.main", "learner.num_gpus_per_actor=1",
                        "generator.num_gpus_per_actor=1", f"trainer.run_dir={tmp_path}/r"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2 and len(lines) == 1, p.stderr
    assert "NVIDIA driver 575.57.08" in lines[0] and "needs >= 580 (CUDA 13 wheels" in lines[0]
    assert not os.path.exists(f"{tmp_path}/r")  # nothing started


# ------------------------------------------------------------------ item 3: receive planning and reassembly
def _qwen7b_manifest():
    """Qwen2.5-7B's tensors (bf16): vocab 152064, hidden 3584, 28 layers, MLP 18944, 4 KV heads of 128."""
    V, H, I, KV = 152064, 3584, 18944, 512
    specs = [ParamSpec("model.embed_tokens.weight", (V, H), "bfloat16")]
    for i in range(28):
        p = f"model.layers.{i}."
        specs += [ParamSpec(p + "self_attn.q_proj.weight", (H, H), "bfloat16"),
                  ParamSpec(p + "self_attn.q_proj.bias", (H,), "bfloat16"),
                  ParamSpec(p + "self_attn.k_proj.weight", (KV, H), "bfloat16"),
                  ParamSpec(p + "self_attn.k_proj.bias", (KV,), "bfloat16"),
                  ParamSpec(p + "self_attn.v_proj.weight", (KV, H), "bfloat16"),
                  ParamSpec(p + "self_attn.v_proj.bias", (KV,), "bfloat16"),
                  ParamSpec(p + "self_attn.o_proj.weight", (H, H), "bfloat16"),
                  ParamSpec(p + "mlp.gate_proj.weight", (I, H), "bfloat16"),
                  ParamSpec(p + "mlp.up_proj.weight", (I, H), "bfloat16"),
                  ParamSpec(p + "mlp.down_proj.weight", (H, I), "bfloat16"),
                  ParamSpec(p + "input_layernorm.weight", (H,), "bfloat16"),
                  ParamSpec(p + "post_attention_layernorm.weight", (H,), "bfloat16")]
    return specs + [ParamSpec("model.norm.weight", (H,), "bfloat16"), ParamSpec("lm_head.weight", (V, H), "bfloat16")]


def test_gpu_bucket_planning_hand_numbers():
    man = _qwen7b_manifest()
    total = sum(p.nbytes for p in man)
    assert total == 15_231_233_024  # 7.6e9 bf16 parameters
    # 32 MiB buckets (the CPU default): every MLP matrix (18944 x 3584 x 2 = 135,790,592 B, 84 of
    # them) and embedding + head (152064 x 3584 x 2 = 1,089,994,752 B each) exceed a bucket
    old = large_tensor_bytes(man, 32 * MiB)
    assert len(old) == 86 and sum(old) == 84 * 135_790_592 + 2 * 1_089_994_752 == 13_586_399_232
    # 256 MiB (the gpu preset): only embedding and head arrive in pieces
    new = large_tensor_bytes(man, 256 * MiB)
    assert new == [1_089_994_752, 1_089_994_752]
    # receiver on a GPU: 3 buckets + 512 MiB reserve = 1280 MiB; two 1.09 GB tensors beside them
    need = (RECV_AHEAD + 1) * 256 * MiB + 512 * MiB
    assert need == 1280 * MiB
    assert plan_receive("cuda", 12 * GiB, 256 * MiB, new) == ReceivePlan(True, 0)  # H100 at 0.85: on device
    edge = need + 2 * 1_089_994_752  # 3,522,166,784 B
    assert plan_receive("cuda", edge, 256 * MiB, new) == ReceivePlan(True, 0)
    assert plan_receive("cuda", edge - 1, 256 * MiB, new) == ReceivePlan(False, 1_089_994_752)  # pinned staging
    assert plan_receive("cuda", 12 * GiB, 256 * MiB, []) == ReceivePlan(True, 0)
    assert plan_receive("cpu", None, 256 * MiB, new) == ReceivePlan(False, 1_089_994_752)
    # a bucket that does not fit beside the engine: one line naming the key and what fits
    assert max_bucket_bytes(1 * GiB) == (GiB - 512 * MiB) // 3 == 178_956_970  # 170 MiB
    with pytest.raises(WeightSyncError) as e:
        plan_receive("cuda", 1 * GiB, 256 * MiB, new)
    msg = str(e.value)
    assert "learner.sync_bucket_mb' = 256" in msg and "1024 MiB" in msg and "sync_bucket_mb <= 170" in msg
    assert "\n" not in msg


def _put(q, obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    q.put(buf.getvalue())


def _get(q, timeout):
    return torch.load(io.BytesIO(q.get(timeout=timeout)), weights_only=False)


def _payload(seed):
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(3000, generator=g),  # 12,000 B: 3 pieces of 4096
            "norm": torch.randn(16, generator=g).to(torch.bfloat16),
            "b": torch.randn(50, 100, generator=g),  # 20,000 B: 5 pieces
            "count": torch.arange(9, dtype=torch.int64),
            "d": torch.randn(2500, generator=g)}  # 10,000 B: 3 pieces


LARGE = ("a", "b", "d")


def _staging_receiver(port, q):
    try:
        group = WeightSyncGroup("gloo", "127.0.0.1", port, 1, 2, timeout_s=20)
        specs = make_manifest(_payload(0).items())
        for mode in ("staged", "staged", "owned", "device"):
            plan = ReceivePlan(True, 0) if mode == "device" else None  # None: planned from the group (host)
            version, it = receive_weights(group, specs, 4096, plan=plan, owned=mode == "owned")
            got, alive = {}, []
            for name, t in it:  # cloned before the next one arrives (staged: the same buffer again)
                alive.append(t)  # kept alive, so freed copies cannot lend their address to the next
                got[name] = (t.data_ptr(), t.clone())
            slots = group.staging_slots()
            host = group.host_staging(slots["host"]) if "host" in slots else None  # the one kept, not a new one
            _put(q, (mode, version, got, None if host is None else (host.data_ptr(), host.numel()),
                     sorted(slots)))
        group.close()
    except Exception as e:  # report to the test
        _put(q, ("error", repr(e)))


def test_large_tensors_reassemble_bit_exact_through_one_persistent_buffer_over_gloo():
    port, q = find_free_port(), CTX.Queue()
    proc = CTX.Process(target=_staging_receiver, args=(port, q))
    proc.start()
    group = WeightSyncGroup("gloo", "127.0.0.1", port, 0, 2, timeout_s=60, join_timeout_s=120)
    sent = {v: _payload(v) for v in (1, 2, 3, 4)}
    results = []
    for v, ts in sent.items():
        send_weights(group, make_manifest(ts.items()), ts, 4096, version=v)
        results.append(_get(q, timeout=60))
    proc.join(timeout=30)
    group.close()
    assert results[0][0] != "error", results[0]
    host_ptrs = set()
    for (mode, version, got, host, keys), v in zip(results, sent):
        assert version == v and list(got) == list(sent[v])
        for name, t in sent[v].items():
            assert torch.equal(got[name][1], t) and got[name][1].dtype == t.dtype, (mode, name)
        ptrs = {got[n][0] for n in LARGE}
        if mode == "staged":
            # every large tensor is a view of the one persistent buffer, sized to the largest (b)
            assert ptrs == {host[0]} and host[1] == 20_000
            host_ptrs.add(host[0])
            assert keys == ["host", "recv piece 0", "recv piece 1", "recv piece 2"]
        elif mode == "owned":  # a consumer that keeps tensors gets copies
            assert host[0] not in ptrs and len(ptrs) == 3
        else:  # on the device: a buffer per tensor, pieces received straight into it
            assert host[0] not in ptrs and len(ptrs) == 3
    assert len(host_ptrs) == 1  # the same buffer across syncs: no allocation per tensor or per sync


# ------------------------------------------------------------------ item 6: DeepSpeed world timeout
def test_world_timeout_covers_sync_and_rank0_io_and_is_never_below_torch_default(tmp_path):
    import torch.distributed.constants as c

    from dispo_ray.infra.devices import TORCH_DEFAULT_PG_TIMEOUT_S, learner_world_timeout_s, model_folder_params
    assert TORCH_DEFAULT_PG_TIMEOUT_S == c.default_pg_timeout.total_seconds() == 1800
    assert learner_world_timeout_s(120) == 1800  # the old 300 s was below torch's default
    assert learner_world_timeout_s(1200) == 2 * 1200 + 60
    # Qwen2.5-7B bf16: 7,615,616,512 params x (2 + 12) B = 106.6 GB at 50 MB/s = 2132.37 s; x2 + 300
    assert learner_world_timeout_s(120, 7_615_616_512, 2) == pytest.approx(2 * 7_615_616_512 * 14 / 50e6 + 300)
    assert learner_world_timeout_s(120, 7_615_616_512, 2) == pytest.approx(4564.745, abs=1e-3)
    assert learner_world_timeout_s(120, 1_543_714_304, 2) == 1800  # 1.5B: 2 x 432 + 300 = 1164 s < floor
    assert learner_world_timeout_s(120, 7_615_616_512, 2, write_bytes_per_s=500e6) == 1800  # a fast disk
    from transformers import Qwen2Config, Qwen2ForCausalLM
    lm = Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True))
    lm.save_pretrained(tmp_path / "m")
    assert model_folder_params(str(tmp_path / "m")) == lm.num_parameters()  # the tied head stored once


# ------------------------------------------------------------------ item 7: disabled PyNccl refusal
def test_refusal_message_names_nccl_version_and_vllms_reason():
    from dispo_ray.sync.nccl import nccl_version_string, pynccl_refusal_message
    assert nccl_version_string(22809) == "2.28.9" and nccl_version_string(22907) == "2.29.7"
    assert nccl_version_string(2803) == "2.8.3"
    reason = "vLLM's NCCLLibrary('libnccl.so.2') failed: AttributeError: libnccl.so.2: undefined symbol: ncclCommSuspend"
    msg = pynccl_refusal_message(3, "2.28.9", reason)
    assert "world of 3" in msg and "loaded NCCL 2.28.9" in msg and reason in msg
    assert "needs NCCL >= 2.29.7 (ncclCommSuspend/ncclCommResume)" in msg and "\n" not in msg
    assert "needs NCCL" not in pynccl_refusal_message(3, "2.29.7", "VLLM_DISABLE_PYNCCL is set")


def test_vllm_disables_pynccl_on_nccl_2_28_and_our_refusal_says_why(tmp_path, monkeypatch):
    """vLLM's own PyNcclCommunicator over a stub libnccl that reports 2.28.9 and, like the real
    2.28.9, lacks ncclCommSuspend/ncclCommResume: vLLM silently disables it, we refuse naming both."""
    import shutil

    if shutil.which("gcc") is None:
        pytest.skip("no C compiler to build the stub NCCL library")
    from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
    from vllm.distributed.device_communicators.pynccl_wrapper import NCCLLibrary
    from vllm.distributed.utils import StatelessProcessGroup

    from dispo_ray.sync.nccl import check_communicator
    names = [f.name for f in NCCLLibrary.exported_functions if f.name not in ("ncclCommSuspend", "ncclCommResume")]
    src = tmp_path / "stub.c"
    src.write_text("int ncclGetVersion(int *v) { *v = 22809; return 0; }\n" + "".join(
        f"int {n}(void) {{ return 0; }}\n" for n in names if n != "ncclGetVersion"))
    so = tmp_path / "libnccl.so.2"
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(so), str(src)], check=True, timeout=60)
    monkeypatch.setenv("VLLM_NCCL_SO_PATH", str(so))
    monkeypatch.delenv("VLLM_DISABLE_PYNCCL", raising=False)
    comm = PyNcclCommunicator(StatelessProcessGroup(rank=0, world_size=2, store=None), device="cpu")
    assert comm.disabled  # vLLM's verdict, without a word
    with pytest.raises(WeightSyncError) as e:
        check_communicator(comm, 2)
    msg = str(e.value)
    assert "loaded NCCL 2.28.9" in msg and "undefined symbol: ncclCommSuspend" in msg
    assert "needs NCCL >= 2.29.7" in msg and "\n" not in msg


# ------------------------------------------------------------------ items 8 and 9: numerics, dtype, devices
@pytest.fixture(scope="module")
def bf16_folder(tmp_path_factory):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    lm = Qwen2ForCausalLM(Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False))
    with torch.no_grad():  # logits of size 16-32, as a trained model's: std(z) = 1.25 * sqrt(64) = 10
        lm.lm_head.weight.normal_(0.0, 1.25)
    path = tmp_path_factory.mktemp("bf16") / "m"
    lm.to(torch.bfloat16).save_pretrained(path)
    return str(path)


def test_learner_loads_in_model_dtype(bf16_folder):
    from actors.learner import load_policy_model
    lm = load_policy_model(bf16_folder, "bfloat16")
    assert {p.dtype for p in lm.parameters()} == {torch.bfloat16}  # not fp32 first (2x the host memory)
    lm32 = load_policy_model(bf16_folder, "float32")
    assert {p.dtype for p in lm32.parameters()} == {torch.float32}
    assert "forward" not in vars(lm32.lm_head)  # an fp32 head is left as it is


def test_fp32_head_logprobs_beat_bf16_logits_against_float64(bf16_folder):
    from actors.learner import _PolicyLogProbs, load_policy_model
    from dispo_ray.algorithm.logprobs import naive_token_logprobs
    lm = load_policy_model(bf16_folder, "bfloat16")
    policy = _PolicyLogProbs(lm, chunk_size=7)  # 2 x 23 response positions: several chunks
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (2, 24), generator=g)
    att = torch.ones_like(ids)
    mask = torch.zeros_like(ids)
    mask[:, 1:] = 1
    lp, ent = policy(ids, att, mask)
    assert lp.dtype == torch.float32 and ent.dtype == torch.float32
    with torch.no_grad():
        hidden = lm.model(input_ids=ids, attention_mask=att, use_cache=False).last_hidden_state  # bf16
        W = lm.lm_head.weight
        z64 = hidden.double() @ W.double().T
        ref = torch.log_softmax(z64[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        old, _ = naive_token_logprobs(torch.nn.functional.linear(hidden, W), ids)  # bf16 logits, cast after
    assert z64.abs().max() > 16  # logits as large as the issue's
    err32 = (lp[:, 1:].double() - ref).abs().max().item()
    err16 = (old[:, 1:].double() - ref).abs().max().item()
    # fp32: bf16 x bf16 products are exact, 64-term fp32 sums round at ~2^-24 relative of
    # sum|h w| (< 100 here): a bound of 64 * 6e-8 * 100 = 4e-4, typically ~1e-5.
    # bf16 logits in [16, 32) are rounded to steps of 0.125: errors up to 0.0625 per logit.
    assert err32 < 4e-4, err32
    assert err16 > 1e-2 and err16 > 20 * err32, (err16, err32)
    lp.sum().backward()  # the gradient flows through the fp32 head into the bf16 weights
    for p in (lm.lm_head.weight, lm.model.embed_tokens.weight):
        assert p.grad is not None and p.grad.dtype == torch.bfloat16
        assert torch.isfinite(p.grad.float()).all() and p.grad.float().abs().sum() > 0


def test_fractional_gpus_refused_with_nccl():
    for ov, key in ((["learner.num_gpus_per_actor=0.5"], "learner.num_gpus_per_actor"),
                    (["learner.num_gpus_per_actor=1", "generator.num_gpus_per_actor=0.5"],
                     "generator.num_gpus_per_actor")):
        with pytest.raises(ConfigError) as e:
            compose(ov)
        assert f"config key '{key}' = 0.5" in str(e.value) and "NCCL" in str(e.value) and "\n" not in str(e.value)
    assert compose(["generator.num_gpus_per_actor=0.5"]).generator.num_gpus_per_actor == 0.5  # gloo sync: allowed
    assert compose(["learner.num_gpus_per_actor=2", "generator.num_gpus_per_actor=1"]).learner.num_gpus_per_actor == 2


def test_actor_device_is_the_gpu_ray_assigned():
    from actors.backends.hf_backend import hf_device
    from dispo_ray.infra.devices import actor_device
    assert actor_device(0, ["3"], "3") == torch.device("cpu")  # no GPU asked: the CPU, whatever is visible
    assert actor_device(1, ["3"], "3", current=0) == torch.device("cuda", 0)  # Ray narrowed the variable
    assert actor_device(1, [5], "4,5,6", current=0) == torch.device("cuda", 1)  # NOSET: its position
    assert actor_device(1, ["2"], None, current=0) == torch.device("cuda", 2)  # nothing narrowed
    assert actor_device(1, [], None, current=3) == torch.device("cuda", 3)  # outside Ray
    with pytest.raises(RuntimeError, match="not in CUDA_VISIBLE_DEVICES"):
        actor_device(1, ["7"], "0,1")
    assert hf_device(0) == torch.device("cpu")
    with pytest.raises(RuntimeError, match="the hf generator asks for GPUs .*needs >= 580"):
        hf_device(1)  # this machine has no GPU: refused, no longer a silent fall-back to the CPU


def test_gpu_preset_is_one_place_for_gpu_defaults():
    c = compose(["+preset=gpu"])
    assert c.model.dtype == "bfloat16" and c.generator.enforce_eager is False
    assert c.generator.gpu_memory_utilization == 0.85 and c.generator.max_new_tokens >= 2048
    assert c.learner.gradient_checkpointing and c.learner.sync_bucket_mb >= 128
    assert c.learner.micro_batch_size * (c.data.max_prompt_length + c.generator.max_new_tokens) <= 16384
    assert float(c.learner.num_gpus_per_actor).is_integer() and float(c.generator.num_gpus_per_actor).is_integer()
    # what vLLM leaves on an 80 GB GPU at 0.85, less ~1 GiB of CUDA context, holds the sync buffers and
    # Qwen2.5-7B's embedding and head on the device
    free = int(0.15 * 80 * GiB) - GiB
    bucket = c.learner.sync_bucket_mb * MiB
    assert plan_receive("cuda", free, bucket, large_tensor_bytes(_qwen7b_manifest(), bucket)).large_on_device


_ZERO3_BF16 = r"""
import os, sys, torch
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                  DS_ACCELERATOR="cpu")
import deepspeed
from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder
deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False  # no JIT build of an op training never uses
torch.distributed.init_process_group("gloo", rank=0, world_size=1)
from transformers.integrations import HfDeepSpeedConfig
from actors.learner import _PolicyLogProbs, load_policy_model
ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
att = torch.ones_like(ids)
plain = load_policy_model(sys.argv[1], "bfloat16")
ref, _ = _PolicyLogProbs(plain, 7)(ids, att, att)
cfg = {"train_micro_batch_size_per_gpu": 2, "train_batch_size": 2, "zero_optimization": {"stage": 3},
       "zero_allow_untested_optimizer": True, "bf16": {"enabled": True}}
keep = HfDeepSpeedConfig(cfg)  # as the learner does: the model is built inside zero.Init
lm = load_policy_model(sys.argv[1], "bfloat16")
policy = _PolicyLogProbs(lm, 7)
engine, *_ = deepspeed.initialize(model=policy, optimizer=torch.optim.AdamW(policy.parameters()), config=cfg)
lp, _ = engine(ids, att, att)
rope = lm.model.rotary_emb
print("RESULT", tuple(lm.lm_head.weight.shape), rope.inv_freq.dtype, rope.original_inv_freq.dtype,
      torch.equal(rope.inv_freq, plain.model.rotary_emb.inv_freq), (lp - ref).abs().max().item(), sep="|")
"""


def test_zero3_bf16_learner_keeps_fp32_rope_and_fp32_head(bf16_folder):
    """ZeRO-3 builds the model inside zero.Init, which made RoPE's inv_freq bf16 (angles off by
    up to p * 0.002 rad at position p). The learner's loader rebuilds it in fp32, and the fp32 head
    runs on the weight ZeRO-3 gathers: the log-probs equal the plain bf16 model's exactly."""
    p = subprocess.run([sys.executable, "-c", _ZERO3_BF16, bf16_folder, str(find_free_port())], cwd=REPO,
                       capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    line = next(ln for ln in p.stdout.splitlines() if ln.startswith("RESULT|"))
    shape, inv, orig, same, diff = line.split("|")[1:]
    assert shape == "(0,)"  # really partitioned: the head's weight is gathered on each call
    assert (inv, orig, same) == ("torch.float32", "torch.float32", "True")
    assert float(diff) == 0.0

