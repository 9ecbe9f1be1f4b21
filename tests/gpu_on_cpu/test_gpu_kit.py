"""The GPU checks' plumbing, on CPU, so it cannot rot between the rare sessions lent a GPU:

* ``tests/gpu/run.sh`` fails loudly (item 2 of issue 24): without Python 3.11/3.12, when
  ``nvidia-smi`` lists GPUs that torch cannot see (a driver too old for CUDA 13), and when no check
  passed. The hardware cannot exist here: stub ``nvidia-smi`` / python executables on PATH stand in.
* The GPU-machine kit (``make gpu-kit``, tests/gpu/kit): it builds from this CPU install under the
  64 MiB a device call carries; its vLLM cut imports with nothing of the installed vLLM; its NCCL
  allowance admits a libnccl without ``ncclCommSuspend``/``Resume`` (a stub library standing in for
  NCCL 2.28.9) only when switched on; its Ray stand-in behaves as the actors need and refuses to
  import outside a kit run; and ``run_kit.py`` runs checks (a), (d), the hf generator, (f) and (g)
  over gloo through the stand-ins and the project's own code, bit-exact where it syncs.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KIT_SRC = os.path.join(ROOT, "tests", "gpu", "kit")
RUN_SH = os.path.join(ROOT, "tests", "gpu", "run.sh")


def _load(name: str, path: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ---------------------------------------------------------------------------------- run.sh (item 2)
def _stub(folder, name: str, body: str) -> str:
    path = os.path.join(folder, name)
    with open(path, "w") as f:
        f.write("#!/bin/bash\n" + textwrap.dedent(body))
    os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR)
    return path


def _python_stub(folder, name: str, version: str) -> str:
    """A 'python' that reports ``version`` (empty: one that does not run)."""
    if not version:
        return _stub(folder, name, "exit 127\n")
    major, minor = version.split(".")
    return _stub(folder, name, f'echo "{major}.{minor}"\n')


def _run_sh(tmp_path, env_extra: dict, args=()) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "VENV")}
    env.update(env_extra)
    env["PATH"] = f"{tmp_path / 'bin'}:{env['PATH']}"
    return subprocess.run(["bash", RUN_SH, *args], capture_output=True, text=True, env=env, timeout=60)


@pytest.fixture()
def stub_bin(tmp_path):
    (tmp_path / "bin").mkdir()
    return tmp_path / "bin"


def test_run_sh_refuses_python_310_in_one_line_before_installing(tmp_path, stub_bin):
    for name, version in (("python3", "3.10"), ("python3.11", ""), ("python3.12", "")):
        _python_stub(stub_bin, name, version)
    r = _run_sh(tmp_path, {"VENV": str(tmp_path / "venv")})
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Python 3.11 or 3.12" in lines[0] and "python3 is 3.10" in lines[0], r.stderr
    assert not (tmp_path / "venv").exists()  # nothing was installed
    r = _run_sh(tmp_path, {"VENV": str(tmp_path / "venv"), "PYTHON": "python3"})  # an explicit 3.10 too
    assert r.returncode == 1 and "python3 is 3.10" in r.stderr


def test_pick_python_prefers_312_then_311(stub_bin):
    _python_stub(stub_bin, "python3", "3.10")
    _python_stub(stub_bin, "python3.11", "3.11")
    _python_stub(stub_bin, "python3.12", "")
    cmd = f"source {ROOT}/tests/gpu/lib.sh; PATH={stub_bin}:$PATH; unset PYTHON; pick_python"
    assert subprocess.run(["bash", "-c", cmd], capture_output=True, text=True).stdout.strip() == "python3.11"
    _python_stub(stub_bin, "python3.12", "3.12")
    assert subprocess.run(["bash", "-c", cmd], capture_output=True, text=True).stdout.strip() == "python3.12"
    _python_stub(stub_bin, "python3.12", "3.13")  # newer than the wheels / pyproject allow
    assert subprocess.run(["bash", "-c", cmd], capture_output=True, text=True).stdout.strip() == "python3.11"


def _fake_venv(tmp_path, junit: str = "") -> str:
    """An installed-looking .venv-gpu whose python says torch sees FAKE_TORCH_GPUS GPUs, whose
    pytest writes ``junit`` as its report, and which runs anything else with this Python."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / ".installed").touch()
    report = tmp_path / "fake.xml"
    report.write_text(junit)
    _stub(venv / "bin", "python", f"""
        if [[ "$1" == "-c" ]]; then
          [[ "$2" == *device_count* ]] && echo "${{FAKE_TORCH_GPUS:-0}}"
          exit 0
        fi
        if [[ "$1" == "-m" && "$2" == "pytest" ]]; then
          for a in "$@"; do [[ "$a" == --junitxml=* ]] && cp {report} "${{a#--junitxml=}}"; done
          exit "${{FAKE_PYTEST_RC:-0}}"
        fi
        exec {sys.executable} "$@"
        """)
    return str(venv)


def _junit(*cases: str) -> str:
    return "<testsuites><testsuite>" + "".join(cases) + "</testsuite></testsuites>"


SKIPPED = '<testcase classname="tests.gpu.test_gpu_x" name="test_{}" time="0.1"><skipped message="needs a CUDA GPU"/></testcase>'
PASSED = '<testcase classname="tests.gpu.test_gpu_x" name="test_{}" time="2.0"/>'


def test_run_sh_fails_when_nvidia_smi_lists_gpus_that_torch_cannot_see(tmp_path, stub_bin):
    _python_stub(stub_bin, "python3.12", "3.12")
    _stub(stub_bin, "nvidia-smi", """
        case "$*" in
          *-L*) echo "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)"; echo "GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-1)";;
          *driver_version*) echo "570.86.15"; echo "570.86.15";;
        esac
        """)
    venv = _fake_venv(tmp_path, _junit(PASSED.format("a")))
    r = _run_sh(tmp_path, {"VENV": venv, "FAKE_TORCH_GPUS": "0"})
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "lists 2 GPU(s) but torch sees none" in lines[0] and "570.86.15" in lines[0]
    assert "torch 2.13.0/vLLM 0.32.0 are CUDA 13 builds: driver >= 580" in lines[0]
    assert "GPU checks" not in r.stdout  # stopped before running anything
    r = _run_sh(tmp_path, {"VENV": venv, "FAKE_TORCH_GPUS": "2"})  # a driver torch can use: runs, green
    assert r.returncode == 0, r.stdout + r.stderr
    assert "test_gpu_x::test_a  PASSED" in r.stdout and "OK: 1 passed" in r.stdout


def test_run_sh_fails_when_no_check_passed(tmp_path, stub_bin):
    _python_stub(stub_bin, "python3.12", "3.12")
    venv = _fake_venv(tmp_path, _junit(SKIPPED.format("a"), SKIPPED.format("b")))
    r = _run_sh(tmp_path, {"VENV": venv})  # no nvidia-smi GPU: every check skips
    assert r.returncode == 1
    assert "SKIPPED" in r.stdout and "FAILED: no check passed (2 skipped): nothing was tested" in r.stdout


def test_gpu_summary_exit_status():
    summary = _load("gpu_summary", os.path.join(ROOT, "tests", "gpu", "summary.py"))
    ok, fail, skip = ("a", "PASSED", 1.0, ""), ("b", "FAILED", 1.0, "boom"), ("c", "SKIPPED", 0.0, "no GPU")
    assert summary.exit_status([ok, skip], 0)[0] == 0
    assert summary.exit_status([ok, fail], 1)[0] == 1
    assert summary.exit_status([skip, skip], 0) == (1, "no check passed (2 skipped): nothing was tested")
    assert summary.exit_status([], 5)[0] == 1  # nothing collected
    assert summary.exit_status([ok], 2)[0] == 1  # pytest itself failed (interrupted, usage error)


# ---------------------------------------------------------------------------------- the GPU kit
@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    """The kit, built from this CPU install (the wheel cache is the repo's, so a rebuild downloads nothing)."""
    out = str(tmp_path_factory.mktemp("kit") / "gpu-kit")
    r = subprocess.run([sys.executable, os.path.join(KIT_SRC, "build_kit.py"), "--out", out,
                        "--wheel-cache", os.path.join(ROOT, "build", "gpu-kit-wheels")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return out


def _kit_env(kit: str, on: bool = True) -> dict:
    run_kit = _load("gpu_run_kit", os.path.join(KIT_SRC, "run_kit.py"))
    env = run_kit.kit_env(kit)
    if not on:
        env.pop("DISPO_GPU_KIT")
        env.pop("DISPO_KIT_ALLOW_NCCL_WITHOUT_SUSPEND")
    return env


def _py(kit: str, code: str, on: bool = True, extra: dict | None = None) -> subprocess.CompletedProcess:
    env = _kit_env(kit, on)
    env.update(extra or {})
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=120)


def test_kit_builds_under_the_carry_limit_with_what_the_gpu_machine_lacks(kit):
    m = json.load(open(os.path.join(kit, "MANIFEST.json")))
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(kit) for f in fs)
    assert total - os.path.getsize(os.path.join(kit, "MANIFEST.json")) == m["total_bytes"]
    assert total < 64 << 20
    assert total < 30 << 20  # room left for the working tree
    assert set(m["copied"]) >= {"deepspeed", "pydantic", "hjson", "hydra-core", "omegaconf"}
    assert m["copied"]["deepspeed"]["version"] == "0.19.8"
    assert os.path.isdir(os.path.join(kit, "py312", "pydantic_core"))  # the compiled part, for CPython 3.12
    assert any(f.startswith("_pydantic_core.cpython-312-x86_64") for f in os.listdir(os.path.join(kit, "py312", "pydantic_core")))
    assert m["vllm_cut"]["bytes"] < 400 << 10
    for rel in ("envs.py", "distributed/device_communicators/pynccl.py", "distributed/utils.py"):
        assert os.path.isfile(os.path.join(kit, "py", "vllm", rel))
    # no compiled file for this venv's Python travels (it would not load on 3.12)
    assert not [f for d, _, fs in os.walk(os.path.join(kit, "py")) for f in fs if f.endswith(".so")]


def test_ray_standin_refuses_to_import_outside_a_kit_run(kit):
    r = _py(kit, "import ray", on=False)
    assert r.returncode != 0 and "importable only under DISPO_GPU_KIT=1" in r.stderr
    import ray  # this process (the product's tests) has the real Ray
    assert not hasattr(ray, "IS_STANDIN") and "gpu-kit" not in ray.__file__


def test_vllm_cut_imports_without_the_installed_vllm(kit):
    r = _py(kit, """
        import sys
        from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
        from vllm.distributed.utils import StatelessProcessGroup
        import dispo_ray.sync.transport, dispo_ray.sync.protocol
        import vllm
        outside = [m for m, mod in sys.modules.items() if m.startswith("vllm")
                   and getattr(mod, "__file__", None) and "gpu-kit" not in mod.__file__]
        assert not outside, outside
        assert vllm.KIT_CUT and vllm.__version__ == "0.32.0"
        print("ok", len([m for m in sys.modules if m.startswith("vllm")]))
        """)
    assert r.returncode == 0 and r.stdout.startswith("ok"), r.stderr[-3000:]


def _stub_nccl(tmp_path) -> str:
    """A libnccl exporting what vLLM 0.32 binds except ncclCommSuspend/Resume, as NCCL 2.28.9 does."""
    if shutil.which("gcc") is None:
        pytest.skip("needs gcc to build the stub library")
    names = ["ncclGetErrorString", "ncclGetUniqueId", "ncclCommInitRank", "ncclAllReduce", "ncclReduce",
             "ncclAllGather", "ncclReduceScatter", "ncclSend", "ncclRecv", "ncclBroadcast", "ncclCommDestroy",
             "ncclCommAbort", "ncclGroupStart", "ncclGroupEnd", "ncclCommWindowRegister", "ncclCommWindowDeregister"]
    src = tmp_path / "nccl_stub.c"
    src.write_text("".join(f"int {n}(void) {{ return 0; }}\n" for n in names)
                   + "int ncclGetVersion(int *v) { *v = 22809; return 0; }\n")
    lib = tmp_path / "libnccl_2_28_9_stub.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(lib), str(src)], check=True, capture_output=True)
    return str(lib)


def test_nccl_allowance_admits_a_library_without_suspend_only_when_switched_on(kit, tmp_path):
    lib = _stub_nccl(tmp_path)
    code = f"""
        from vllm.distributed.device_communicators.pynccl_wrapper import NCCLLibrary
        try:
            nccl = NCCLLibrary({lib!r})
        except AttributeError as e:
            print("refused", e)
        else:
            print("loaded", nccl.ncclGetVersion(), nccl.has_symbol("ncclCommSuspend"))
        """
    off = _py(kit, code, extra={"DISPO_KIT_ALLOW_NCCL_WITHOUT_SUSPEND": "0"})
    assert off.stdout.startswith("refused") and "ncclCommSuspend" in off.stdout, off.stdout + off.stderr[-2000:]
    on = _py(kit, code)
    assert on.stdout.strip() == "loaded 2.28.9 False", on.stdout + on.stderr[-2000:]
    assert "GPU kit: NCCL library" in on.stderr and "lacks ncclCommSuspend" in on.stderr


def test_ray_standin_semantics(kit):
    r = _py(kit, """
        import threading, time
        import ray
        from ray.exceptions import ActorDiedError, GetTimeoutError
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        class Counter:
            def __init__(self, start):
                self.n, self.thread = start, threading.get_ident()
            def add(self, k, box=None):
                if box is not None:
                    box.append(k)  # a copy: the caller's list must not change
                self.n += k
                return self.n
            def slow(self, s):
                time.sleep(s)
                return s
            def fail(self):
                raise ValueError("boom")
            def where(self):
                return threading.get_ident() == self.thread, ray.get_gpu_ids()

        ray.init(num_cpus=4)
        pg = placement_group([{"CPU": 1}], strategy="PACK")
        assert ray.get(pg.ready(), timeout=1) is pg
        A = ray.remote(Counter)
        a = A.options(num_cpus=1, scheduling_strategy=PlacementGroupSchedulingStrategy(pg, 0)).remote(10)
        box = []
        refs = [a.add.remote(k, box) for k in range(1, 5)]
        assert ray.get(refs) == [11, 13, 16, 20] and box == []  # in order, arguments copied
        assert ray.get(a.where.remote()) == (True, [])  # one thread per actor; no GPU asked, none given
        try:
            ray.get(a.fail.remote())
        except ValueError as e:
            assert str(e) == "boom"
        else:
            raise AssertionError("no error")
        slow = a.slow.remote(0.5)
        try:
            ray.get(slow, timeout=0.05)
        except GetTimeoutError:
            pass
        else:
            raise AssertionError("no timeout")
        ready, rest = ray.wait([slow, a.add.remote(0)], num_returns=1, timeout=5)
        assert ready == [slow] and len(rest) == 1  # calls run in order: the slow one finishes first
        assert ray.get(rest[0]) == 20
        ray.kill(a)
        try:
            ray.get(a.add.remote(1))
        except ActorDiedError:
            pass
        else:
            raise AssertionError("a killed actor answered")

        @ray.remote(max_restarts=0)
        class Broken:
            def __init__(self):
                raise RuntimeError("no engine")
            def ping(self):
                return 1
        b = Broken.remote()
        try:
            ray.get(b.ping.remote())
        except ActorDiedError as e:
            assert "no engine" in str(e)
        else:
            raise AssertionError("a failed constructor answered")
        try:
            A.options(num_gpus=1).remote(0)
        except RuntimeError as e:
            assert "none visible" in str(e)
        assert ray.nodes()[0]["Alive"] and ray.util.get_node_ip_address() == "127.0.0.1"
        ray.shutdown()
        assert not ray.is_initialized()
        print("ok")
        """)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr[-3000:]


def test_run_kit_decides_failed_or_nothing_passed():
    run_kit = _load("gpu_run_kit", os.path.join(KIT_SRC, "run_kit.py"))
    p, f, s = {"name": "a", "status": "PASSED"}, {"name": "d", "status": "FAILED"}, {"name": "g", "status": "SKIPPED"}
    assert run_kit.decide([p, s])[0] == 0
    assert run_kit.decide([p, f]) == (1, "1 failed: d; 1 passed")
    assert run_kit.decide([s, s]) == (1, "no check passed (2 skipped): nothing was tested")
    assert [n for n, _ in run_kit.PLAN][:2] == ["a_sync_bit_exact", "d_receiver_killed_mid_sync"]
    assert sum(b for _, b in run_kit.PLAN) < 1000  # with --total 540 the run fits one 10-minute call


def test_run_kit_runs_checks_over_gloo_through_the_standins(kit, tmp_path):
    """The kit's own path on CPU: checks (a), (d), the hf generator (GeneratorPool), (f) and (g)
    (a ZeRO-3 LearnerGroup) run as on the GPU machine (kit first on the path, Ray stand-in, vLLM
    cut, copied DeepSpeed), with gloo in place of NCCL, the CPU in place of CUDA, small payloads."""
    only = ("a_sync_bit_exact,d_receiver_killed_mid_sync,hf_generator,g_zero3_0p5b_bit_exact,"
            "f_host_staging_7b_shapes")  # the plan's order
    r = subprocess.run([sys.executable, os.path.join(KIT_SRC, "run_kit.py"), "--kit", kit, "--device", "cpu",
                        "--small", "--only", only, "--out", str(tmp_path), "--budget", "150"],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    assert "Ray stand-in=True" in lines[0] and "vLLM cut 0.32.0" in lines[0]
    assert [ln.split()[:2] for ln in lines[1:6]] == [["PASSED", n] for n in only.split(",")]
    assert "bit-exact" in lines[1] and "sync landed" in lines[3] and "bit-exact" in lines[4]
    assert "1M/host" in lines[5] and "4M/device" in lines[5]  # (f): each bucket size, both reassemblies
    res = json.load(open(tmp_path / "results.json"))
    assert res["exit"] == 0 and all(x["status"] == "PASSED" for x in res["results"])
    g = next(x for x in res["results"] if x["name"].startswith("g_"))["details"]
    assert g["params_m"] == 0 and g["bucket_mib"] > 0  # the tiny Qwen2-shaped model through ZeRO-3


def test_run_kit_exits_1_when_every_check_skipped(kit):
    r = subprocess.run([sys.executable, os.path.join(KIT_SRC, "run_kit.py"), "--kit", kit, "--device", "cpu",
                        "--only", "deepspeed_zero2_bf16,chunked_logprob_memory"],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 1, r.stdout + r.stderr[-2000:]
    assert r.stdout.count("SKIPPED") == 2 and "FAILED: no check passed (2 skipped)" in r.stdout
