#!/usr/bin/env bash
# The GPU checks in one command, on a bare CUDA machine (driver + Python 3.10-3.12, nothing else):
#
#   tests/gpu/run.sh            # install into .venv-gpu (first time), run every check in tests/gpu
#   PYTHON=python3.12 tests/gpu/run.sh
#
# Installs the pinned GPU set from PyPI into its own venv (.venv-gpu, never the CPU .venv):
# torch 2.13.0 (CUDA build, its own pip call first), then this package with the `gpu` and `test`
# extras (vllm==0.32.0, the CUDA build at the CPU build's version; ray, deepspeed, transformers as
# pyproject.toml pins them). Then runs tests/gpu and prints one line per check:
#   (a) one GPU: NCCL sender + CUDA receiver in two processes, bit-exact, GB/s
#   (b) two GPUs: learner group + vLLM pool through Trainer.sync_weights, bf16 log-probs agree
#   (c) three GPUs: the same with tensor_parallel_size=2
#   (d) one GPU: a receiver SIGKILLed mid-sync, the sender raises in time, a re-formed group works
#   plus the older GPU checks (DeepSpeed bf16 step, chunked log-prob memory, hf/vLLM generators).
# A check whose hardware is missing is reported SKIPPED with its reason. Exit status: 1 if any failed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv-gpu}"
if [[ ! -f "$VENV/.installed" ]]; then
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q torch==2.13.0   # first and alone: the CUDA wheel vllm==0.32.0 pins
  DS_BUILD_OPS=0 "$VENV/bin/pip" install -q -e ".[gpu,test]"
  touch "$VENV/.installed"
fi

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false RAY_USAGE_STATS_ENABLED=0 DS_BUILD_OPS=0
unset DS_ACCELERATOR   # each learner actor picks its accelerator from what Ray granted
"$VENV/bin/python" -c "import torch; print(f'torch {torch.__version__}, CUDA {torch.version.cuda}, ' \
  f'{torch.cuda.device_count()} GPU(s): ' + ', '.join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())))"

report="$(mktemp -d)/gpu.xml"
set +e
"$VENV/bin/python" -m pytest -q -s -p no:cacheprovider tests/gpu --junitxml="$report" "$@"
status=$?
set -e
"$VENV/bin/python" - "$report" <<'PY'
import sys
import xml.etree.ElementTree as ET

print("\n== GPU checks ==")
for case in ET.parse(sys.argv[1]).getroot().iter("testcase"):
    name, secs = case.get("name"), float(case.get("time", 0))
    skipped = case.find("skipped")
    failed = case.find("failure") if case.find("failure") is not None else case.find("error")  # Elements without children are falsy
    if failed is not None:
        line = f"FAILED   {(failed.get('message') or '').splitlines()[0][:150] if failed.get('message') else ''}"
    elif skipped is not None:
        line = f"SKIPPED  {skipped.get('message', '')[:150]}"
    else:
        line = "PASSED"
    print(f"{case.get('classname').split('.')[-1]}::{name}  {line}  ({secs:.0f}s)")
PY
exit $status
