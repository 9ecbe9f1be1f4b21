# The decisions of tests/gpu/run.sh, as functions (sourced by run.sh; tests/gpu_on_cpu/test_gpu_kit.py runs
# them with stub `nvidia-smi` / python executables on PATH, since this machine has no GPU).
#
#   pick_python          print the Python to build .venv-gpu with, or fail in one line
#   check_gpus_visible   fail in one line when nvidia-smi lists GPUs that torch cannot see
#
# Why: the pinned wheels (torch 2.13.0, vllm 0.32.0) need Python >= 3.11 (Ubuntu 22.04's python3 is
# 3.10) and are CUDA 13 builds: with an NVIDIA driver < 580 torch sees no GPU, every check skips,
# and a run that tested nothing must not look green.

GPU_PYTHONS=(python3.12 python3.11 python3)   # tried in this order unless $PYTHON names one
DRIVER_NOTE="torch 2.13.0/vLLM 0.32.0 are CUDA 13 builds: driver >= 580"

# "3.12" for a Python executable, empty if it does not run
python_version() {
  "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null
}

# 0 iff version $1 (major.minor) is one the wheels support: 3.11 or 3.12 (pyproject: <3.13)
python_supported() {
  local major=${1%%.*} minor=${1#*.}
  [[ "$major" == 3 && "$minor" =~ ^[0-9]+$ && "$minor" -ge 11 && "$minor" -le 12 ]]
}

pick_python() {
  local candidates=("${GPU_PYTHONS[@]}") seen=() py v
  [[ -n "${PYTHON:-}" ]] && candidates=("$PYTHON")
  for py in "${candidates[@]}"; do
    command -v "$py" >/dev/null 2>&1 || continue
    v=$(python_version "$py")
    [[ -z "$v" ]] && continue
    if python_supported "$v"; then
      echo "$py"
      return 0
    fi
    seen+=("$py is $v")
  done
  echo "tests/gpu/run.sh: needs Python 3.11 or 3.12 for the vllm 0.32.0 / torch 2.13.0 wheels;" \
       "found ${seen[*]:-none of ${candidates[*]}} (set PYTHON=python3.12)" >&2
  return 1
}

# number of GPUs nvidia-smi lists (0 without nvidia-smi or a driver)
smi_gpu_count() {
  command -v nvidia-smi >/dev/null 2>&1 || { echo 0; return; }
  nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true
}

smi_driver_version() {
  nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -n1
}

# $1: the venv's python. Fails when nvidia-smi lists GPUs but torch sees none (an old driver).
check_gpus_visible() {
  local listed seen
  listed=$(smi_gpu_count)
  [[ "$listed" -gt 0 ]] || return 0   # no GPU at all: the checks skip, and "none passed" fails the run
  seen=$("$1" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null | tail -n1)
  if [[ ! "$seen" =~ ^[0-9]+$ || "$seen" -eq 0 ]]; then
    echo "tests/gpu/run.sh: nvidia-smi lists $listed GPU(s) but torch sees none; NVIDIA driver" \
         "$(smi_driver_version) ($DRIVER_NOTE)" >&2
    return 1
  fi
}
