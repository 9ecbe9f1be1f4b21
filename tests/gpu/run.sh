#!/usr/bin/env bash
# The GPU checks in one command, on a bare CUDA machine (NVIDIA driver >= 580, Python 3.11 or 3.12):
#
#   tests/gpu/run.sh            # install into .venv-gpu (first time), run every check in tests/gpu
#   PYTHON=python3.12 tests/gpu/run.sh
#
# Installs the pinned GPU set from PyPI into its own venv (.venv-gpu, never the CPU .venv):
# torch 2.13.0 (CUDA 13 build, its own pip call first), then this package with the `gpu` and `test`
# extras (vllm==0.32.0, the CUDA build at the CPU build's version; ray, deepspeed, transformers as
# pyproject.toml pins them). Then runs tests/gpu and prints one line per check:
#   (a) one GPU: NCCL sender + CUDA receiver in two processes, bit-exact, GB/s
#   (b) two GPUs: learner group + vLLM pool through WeightSync.publish, bf16 log-probs agree
#   (c) three GPUs: the same with tensor_parallel_size=2
#   (d) one GPU: a receiver SIGKILLed mid-sync, the sender raises in time, a re-formed group works
#   (f) one GPU: host-staging cost of Qwen2.5-7B-shaped syncs for several bucket sizes
#   (g) one GPU: a ZeRO-3 bf16 learner (Qwen2.5-0.5B shapes) broadcasting over NCCL, bit-exact
#   plus the older GPU checks (DeepSpeed bf16 step, chunked log-prob memory, hf/vLLM generators).
# A check whose hardware is missing is reported SKIPPED with its reason. Exit status 1 (one line
# saying why) when: no Python 3.11/3.12 is found; nvidia-smi lists GPUs that torch cannot see (the
# driver is too old for CUDA 13); any check failed; or no check passed. The decisions live in
# tests/gpu/lib.sh and tests/gpu/summary.py (tested on CPU by tests/gpu_on_cpu/test_gpu_kit.py).
#
# A machine without Ray/vLLM and without network (the lent H100): see tests/gpu/kit (make gpu-kit).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
source tests/gpu/lib.sh

PYTHON="$(pick_python)" || exit 1
VENV="${VENV:-.venv-gpu}"
if [[ ! -f "$VENV/.installed" ]]; then
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q torch==2.13.0   # first and alone: the CUDA wheel vllm==0.32.0 pins
  DS_BUILD_OPS=0 "$VENV/bin/pip" install -q -e ".[gpu,test]"
  touch "$VENV/.installed"
fi
check_gpus_visible "$VENV/bin/python" || exit 1

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false RAY_USAGE_STATS_ENABLED=0 DS_BUILD_OPS=0
unset DS_ACCELERATOR   # each learner actor picks its accelerator from what Ray granted
"$VENV/bin/python" -c "import torch; print(f'torch {torch.__version__}, CUDA {torch.version.cuda}, ' \
  f'{torch.cuda.device_count()} GPU(s): ' + ', '.join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())))"

report="$(mktemp -d)/gpu.xml"
set +e
"$VENV/bin/python" -m pytest -q -s -p no:cacheprovider tests/gpu --junitxml="$report" "$@"
status=$?
set -e
"$VENV/bin/python" tests/gpu/summary.py "$report" "$status"
